"""What a data source is: a tokenizer, a training iterator and an evaluation iterator from a config.

`config.data.source` names one registered `DataSource` (`dlm_jax.data.sources`). The run layer only
ever calls the four functions below; it never branches on the source's name. Iterators yield
per-process batches of int32 numpy arrays {tokens, segment_ids, positions, [maskable, buckets,
example_id]} and implement get_state()/set_state() so Orbax checkpoints their position.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax

from dlm_jax.config import ConfigError
from dlm_jax.data import pipeline
from dlm_jax.data import tokenizers


def _no_check(config: Any) -> None:
  del config


@dataclasses.dataclass(frozen=True)
class DataSource:
  """A registered data source.

  Attributes:
    name: the value of config.data.source.
    make_tokenizer: (config) -> Tokenizer.
    train_iterator: (config, tokenizer) -> endless, checkpointable iterator of local batches.
    eval_iterator: (config, tokenizer, global batch size) -> finite, deterministic iterator.
    check: (config) -> None; raises ConfigError naming a data.* field (start-up).
    documents: for text sources, (config, split) -> random-access documents (`len`, `[i] -> str`);
      None for generated tasks.
  """
  name: str
  make_tokenizer: Callable[[Any], Any]
  train_iterator: Callable[[Any, Any], Any]
  eval_iterator: Callable[[Any, Any, int], Any]
  check: Callable[[Any], None] = _no_check
  documents: Optional[Callable[[Any, str], Any]] = None


def configured_tokenizer(config: Any, bpe_texts: Optional[Callable[[], list[str]]] = None) -> Any:
  """The tokenizer config.data.tokenizer names; a 'bpe' is trained once (cached) on `bpe_texts()`,
  or on the embedded corpus when that is None."""
  d = config.data
  if d.tokenizer != "bpe":
    return tokenizers.get_tokenizer(d.tokenizer)
  return tokenizers.get_tokenizer("bpe", vocab_size=d.vocab_size,
                                  train_texts=bpe_texts() if bpe_texts else None)


def document_source(name: str, documents: Callable[[Any, str], Any],
                    check: Callable[[Any], None] = _no_check,
                    bpe_on_corpus: bool = True) -> DataSource:
  """A source of text documents read through the grain LM pipeline (packed or padded rows).

  Args:
    name: the source's config name.
    documents: (config, split name) -> random-access documents (`len`, `[i] -> str`).
    check: start-up check of the data.* fields the source reads.
    bpe_on_corpus: train a 'bpe' tokenizer on (up to 200k of) this source's training documents;
      False trains it on the embedded corpus (the tokenizer's default).
  """

  def make_tokenizer(config):
    texts = None
    if bpe_on_corpus:
      def texts():
        src = documents(config, config.data.train_split)
        return [src[i] for i in range(min(len(src), 200_000))]
    return configured_tokenizer(config, texts)

  def train_iterator(config, tokenizer):
    d = config.data
    return pipeline.make_lm_iterator(
        documents(config, d.train_split), tokenizer, seq_len=d.seq_len,
        global_batch_size=config.train.global_batch_size, process_index=jax.process_index(),
        process_count=jax.process_count(), seed=config.seed, shuffle=d.shuffle, packing=d.packing)

  def eval_iterator(config, tokenizer, batch_size):
    d = config.data
    return pipeline.make_eval_iterator(
        documents(config, d.eval_split), tokenizer, seq_len=d.seq_len, global_batch_size=batch_size,
        process_index=jax.process_index(), process_count=jax.process_count(), packing=d.packing)

  return DataSource(name, make_tokenizer, train_iterator, eval_iterator, check, documents)


def require(cond: bool, field: str, msg: str) -> None:
  """Raises ConfigError('config.<field>: <msg>') unless `cond`."""
  if not cond:
    raise ConfigError(f"config.{field}: {msg}")
