"""grain input pipelines: documents -> tokens -> packed or padded rows -> per-process batches.

The train loop calls:

  it = make_lm_iterator(source, tokenizer, seq_len=L, global_batch_size=B,
                        process_index=jax.process_index(), process_count=jax.process_count(), seed=s)
  batch = next(it)   # {'tokens', 'segment_ids', 'positions'}: int32 numpy arrays [B // process_count, L]

and checkpoints `it` with Orbax (`grain.checkpoint.CheckpointSave(it)` / `CheckpointRestore(it)` inside
`ocp.args.Composite`), or with `it.get_state()` / `it.set_state(state)` (a JSON-serialisable dict).

Batch layout (every row has length `seq_len`):
  tokens       int32, token ids; padding holds `tokenizer.pad_id` (padding is *defined* by segment_ids == 0).
  segment_ids  int32, 1..k numbering the documents (or document chunks) in the row, 0 = padding.
  positions    int32, position within the segment, 0 at its first token (the BOS for a document start).

Packing:
  'pack'  Documents ([BOS] + ids + [EOS]) are concatenated and cut into rows of `seq_len` (grain's
          `ConcatThenSplitIterDataset`). A document that does not fit in the rest of a row is split: its
          continuation starts the next row as a new segment (segment id 1 there), with positions restarting
          at 0 and *no* BOS inserted; so positions are always < seq_len and every token is used once per
          epoch. Only the end of a finite pass leaves padding.
  'pad'   One document per row: [BOS] + ids + [EOS] truncated to `seq_len` (a truncated document loses its
          tail and its EOS) and padded; segment id 1 on the document, 0 on padding.

Sharding: with `process_count` P, process p reads only documents p, p+P, p+2P, ... (a grain slice of the
source), shuffles them with `seed` (reshuffled each epoch), and batches `global_batch_size // P` rows.
Empty or whitespace-only documents, and documents that tokenize to nothing, are skipped.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import grain
import numpy as np

from dlm_jax.data.tokenizers import Tokenizer

__all__ = ["make_lm_dataset", "make_lm_iterator", "make_eval_iterator", "describe_batch", "FEATURES"]

FEATURES = ("tokens", "segment_ids", "positions")
PACKING = ("pack", "pad")


# ---------------------------------------------------------------------------------------------------------
# Element transforms (classes, so that they pickle for grain's multiprocessing).


class _Tokenize(grain.transforms.Map):
  """str document -> {'tokens': int32 [n]} with BOS/EOS; None for documents with no tokens."""

  def __init__(self, tokenizer: Tokenizer, add_bos: bool, add_eos: bool):
    self._tok, self._bos, self._eos = tokenizer, add_bos, add_eos

  def tokenize(self, doc: Any) -> np.ndarray | None:
    if isinstance(doc, bytes):
      doc = doc.decode("utf-8", errors="replace")
    elif isinstance(doc, Mapping) and "text" in doc:
      return self.tokenize(doc["text"])
    if not isinstance(doc, str):
      raise TypeError(f"a document source must return str (or bytes, or a dict with 'text'), got "
                      f"{type(doc).__name__}; fix the source passed to the data pipeline.")
    if not doc.strip():
      return None
    ids = self._tok.encode(doc)
    if not ids:
      return None
    ids = ([self._tok.bos_id] if self._bos else []) + ids + ([self._tok.eos_id] if self._eos else [])
    return np.asarray(ids, dtype=np.int32)

  def map(self, element: Any) -> dict[str, np.ndarray] | None:
    ids = self.tokenize(element)
    return None if ids is None else {"tokens": ids}


def _padded_row(ids: np.ndarray | None, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
  """One row: `ids` truncated to seq_len and padded; an all-padding row for None."""
  tokens = np.full((seq_len,), pad_id, dtype=np.int32)
  segment_ids = np.zeros((seq_len,), dtype=np.int32)
  positions = np.zeros((seq_len,), dtype=np.int32)
  if ids is not None:
    n = min(len(ids), seq_len)
    tokens[:n] = ids[:n]
    segment_ids[:n] = 1
    positions[:n] = np.arange(n, dtype=np.int32)
  return {"tokens": tokens, "segment_ids": segment_ids, "positions": positions}


class _PadRow(grain.transforms.Map):
  """{'tokens': [n]} -> one padded row."""

  def __init__(self, seq_len: int, pad_id: int):
    self._seq_len, self._pad_id = seq_len, pad_id

  def map(self, element: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return _padded_row(element["tokens"], self._seq_len, self._pad_id)


class _FinishPacked(grain.transforms.Map):
  """Renames ConcatThenSplit's outputs and fills padding with pad_id."""

  def __init__(self, pad_id: int):
    self._pad_id = pad_id

  def map(self, element: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    segment_ids = np.asarray(element["tokens_segment_ids"], dtype=np.int32)
    tokens = np.where(segment_ids > 0, element["tokens"], self._pad_id).astype(np.int32)
    positions = np.where(segment_ids > 0, element["tokens_positions"], 0).astype(np.int32)
    return {"tokens": tokens, "segment_ids": segment_ids, "positions": positions}


class _StackAndPad:
  """batch_fn: stacks rows and adds all-padding rows (segment_ids 0) up to `batch_size`."""

  def __init__(self, batch_size: int, seq_len: int, pad_id: int):
    self._batch_size, self._seq_len, self._pad_id = batch_size, seq_len, pad_id

  def __call__(self, rows: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    rows = list(rows)
    rows += [_padded_row(None, self._seq_len, self._pad_id)] * (self._batch_size - len(rows))
    return {k: np.stack([r[k] for r in rows]) for k in FEATURES}


class _TakeRows(grain.transforms.Map):
  """Keeps rows [start, stop) of a batch (this process's part of a global batch)."""

  def __init__(self, start: int, stop: int):
    self._start, self._stop = start, stop

  def map(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v[self._start:self._stop] for k, v in batch.items()}


class _EvalPadRow(grain.transforms.Map):
  """Row j of this process's eval stream -> the padded row of its global document (or padding)."""

  def __init__(self, source: Any, tokenize: _Tokenize, *, seq_len: int, pad_id: int, process_index: int,
               local_batch: int, global_batch: int):
    self._source, self._tokenize = source, tokenize
    self._seq_len, self._pad_id = seq_len, pad_id
    self._process_index, self._local, self._global = process_index, local_batch, global_batch

  def map(self, j: int) -> dict[str, np.ndarray]:
    b, r = divmod(int(j), self._local)
    index = b * self._global + self._process_index * self._local + r
    ids = self._tokenize.tokenize(self._source[index]) if index < len(self._source) else None
    return _padded_row(ids, self._seq_len, self._pad_id)


# ---------------------------------------------------------------------------------------------------------
# Packing whose state survives a JSON round trip (what grain.checkpoint and Orbax write).


class _JsonSafeStateIterator(grain.DatasetIterator):
  """Passes elements through; restores tuples that JSON turned into lists in the packing state.

  `ConcatThenSplitIterDataset` keeps `remainder_slices` as tuples and compares them with a tuple
  sentinel, so a state that went through JSON (lists) would restore wrongly without this.
  """

  def __init__(self, parent: grain.DatasetIterator):
    super().__init__(parent)

  def __next__(self):
    return next(self._parent)

  def get_state(self) -> dict[str, Any]:
    return self._parent.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(_lists_to_tuples(state))


def _lists_to_tuples(state: Any) -> Any:
  if isinstance(state, Mapping):
    out = {}
    for k, v in state.items():
      if k == "remainder_slices" and isinstance(v, Mapping):
        out[k] = {name: tuple(sl) for name, sl in v.items()}
      else:
        out[k] = _lists_to_tuples(v)
    return out
  return state


class _JsonSafeState(grain.IterDataset):
  def __init__(self, parent: grain.IterDataset):
    super().__init__(parent)

  def __iter__(self) -> grain.DatasetIterator:
    return _JsonSafeStateIterator(self._parent.__iter__())


def _pack(ds: grain.IterDataset, seq_len: int, pad_id: int) -> grain.IterDataset:
  ds = grain.experimental.ConcatThenSplitIterDataset(ds, length_struct={"tokens": seq_len})
  return _JsonSafeState(ds).map(_FinishPacked(pad_id))


# ---------------------------------------------------------------------------------------------------------
# Public API.


def _check_args(source: Any, tokenizer: Tokenizer, seq_len: int, global_batch_size: int, process_index: int,
                process_count: int, packing: str) -> int:
  """Validates the common arguments; returns the local batch size."""
  if not isinstance(tokenizer, Tokenizer):
    raise TypeError(f"tokenizer must be a dlm_jax.data.tokenizers.Tokenizer, got {type(tokenizer).__name__}.")
  if not isinstance(seq_len, (int, np.integer)) or seq_len < 2:
    raise ValueError(f"seq_len must be an int >= 2, got {seq_len!r}; fix config.data.seq_len.")
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count}).")
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of the number of "
                     f"processes ({process_count}); fix config.train.global_batch_size.")
  if packing not in PACKING:
    raise ValueError(f"packing must be one of {PACKING}, got {packing!r}; fix config.data.packing.")
  try:
    n = len(source)
  except TypeError as e:
    raise TypeError(f"the document source must have __len__ and __getitem__, got {type(source).__name__}.") from e
  if n == 0:
    raise ValueError(f"the document source {source!r} is empty; fix config.data (dataset, path or split).")
  return global_batch_size // process_count


def make_lm_dataset(source: Any, tokenizer: Tokenizer, *, seq_len: int, global_batch_size: int,
                    process_index: int = 0, process_count: int = 1, seed: int = 0, shuffle: bool = True,
                    num_epochs: int | None = None, packing: str = "pack", add_bos: bool = True,
                    add_eos: bool = True, drop_remainder: bool = True, read_threads: int = 4,
                    prefetch_buffer_size: int = 64) -> grain.IterDataset:
  """The grain `IterDataset` behind `make_lm_iterator` (same arguments); e.g. to add `mp_prefetch`."""
  local_batch = _check_args(source, tokenizer, seq_len, global_batch_size, process_index, process_count,
                            packing)
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f"num_epochs must be None (repeat forever) or >= 1, got {num_epochs}.")
  if len(source) < process_count:
    raise ValueError(f"the source has {len(source)} documents, fewer than the {process_count} processes "
                     "that share it; use a larger dataset/split.")
  ds = grain.MapDataset.source(source)
  ds = ds[process_index::process_count]  # this process's documents only
  if shuffle:
    ds = ds.shuffle(seed=seed)
  if num_epochs != 1:
    ds = ds.repeat(num_epochs)  # reshuffled each epoch
  ds = ds.map(_Tokenize(tokenizer, add_bos, add_eos))  # None (skipped below) for empty documents
  if packing == "pad":
    ds = ds.map(_PadRow(seq_len, tokenizer.pad_id))
  read_options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch_buffer_size)
  it_ds = ds.to_iter_dataset(read_options)
  if packing == "pack":
    it_ds = _pack(it_ds, seq_len, tokenizer.pad_id)
  return it_ds.batch(local_batch, drop_remainder=drop_remainder,
                     batch_fn=_StackAndPad(local_batch, seq_len, tokenizer.pad_id))


def make_lm_iterator(source: Any, tokenizer: Tokenizer, *, seq_len: int, global_batch_size: int,
                     process_index: int = 0, process_count: int = 1, seed: int = 0, shuffle: bool = True,
                     num_epochs: int | None = None, packing: str = "pack", add_bos: bool = True,
                     add_eos: bool = True, drop_remainder: bool = True, read_threads: int = 4,
                     prefetch_buffer_size: int = 64) -> grain.DatasetIterator:
  """A checkpointable iterator of this process's training batches.

  Args:
    source: random-access documents (`len`, `[i] -> str`), e.g. from `dlm_jax.data.sources`.
    tokenizer: a `Tokenizer`.
    seq_len: row length L.
    global_batch_size: rows per step over all processes; must be divisible by `process_count`.
    process_index, process_count: this process and the number of processes (`jax.process_index()`,
      `jax.process_count()`); each process reads a disjoint 1/process_count of the documents.
    seed: shuffle seed (deterministic; each epoch is shuffled differently).
    shuffle: shuffle the documents (False: source order, for tests and debugging).
    num_epochs: passes over the data; None repeats forever.
    packing: 'pack' (concatenate and split documents into rows) or 'pad' (one document per row).
    add_bos, add_eos: add BOS / EOS around every document.
    drop_remainder: drop the last incomplete batch of a finite run; if False it is filled with
      all-padding rows (segment_ids 0) so every batch has the same shape.
    read_threads, prefetch_buffer_size: grain `ReadOptions` for reading and tokenizing.

  Returns:
    A `grain.DatasetIterator` (with `get_state()` / `set_state()`) yielding dicts of int32 numpy arrays
    `tokens`, `segment_ids`, `positions`, each `[global_batch_size // process_count, seq_len]`.
  """
  return iter(make_lm_dataset(
      source, tokenizer, seq_len=seq_len, global_batch_size=global_batch_size, process_index=process_index,
      process_count=process_count, seed=seed, shuffle=shuffle, num_epochs=num_epochs, packing=packing,
      add_bos=add_bos, add_eos=add_eos, drop_remainder=drop_remainder, read_threads=read_threads,
      prefetch_buffer_size=prefetch_buffer_size))


def make_eval_iterator(source: Any, tokenizer: Tokenizer, *, seq_len: int, global_batch_size: int,
                       process_index: int = 0, process_count: int = 1, packing: str = "pad",
                       add_bos: bool = True, add_eos: bool = True,
                       read_threads: int = 4) -> grain.DatasetIterator:
  """A finite iterator over the split, once, in source order; all processes together cover it once.

  Every process yields the same number of batches (multi-host collectives need that). The global stream of
  rows is cut into global batches of `global_batch_size`; process p gets rows
  [p * local, (p + 1) * local) of each, where local = global_batch_size // process_count. The last global
  batch is completed with all-padding rows (segment_ids 0), which carry no loss.

  * 'pad': row i of the global stream is document i (empty documents give all-padding rows); each process
    reads only its own documents.
  * 'pack': rows are packed as in training (no shuffle). Each process tokenizes the whole split to know the
    row boundaries, and keeps its slice of each global batch.

  Args and the batch format are as for `make_lm_iterator`.
  """
  local_batch = _check_args(source, tokenizer, seq_len, global_batch_size, process_index, process_count,
                            packing)
  tokenize = _Tokenize(tokenizer, add_bos, add_eos)
  read_options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=64)
  if packing == "pad":
    num_batches = math.ceil(len(source) / global_batch_size)
    ds = grain.MapDataset.range(num_batches * local_batch).map(_EvalPadRow(
        source, tokenize, seq_len=seq_len, pad_id=tokenizer.pad_id, process_index=process_index,
        local_batch=local_batch, global_batch=global_batch_size))
    it_ds = ds.to_iter_dataset(read_options).batch(local_batch, drop_remainder=False)
  else:
    ds = grain.MapDataset.source(source).map(tokenize)
    it_ds = _pack(ds.to_iter_dataset(read_options), seq_len, tokenizer.pad_id)
    it_ds = it_ds.batch(global_batch_size, drop_remainder=False,
                        batch_fn=_StackAndPad(global_batch_size, seq_len, tokenizer.pad_id))
    start = process_index * local_batch
    it_ds = it_ds.map(_TakeRows(start, start + local_batch))
  return iter(it_ds)


def describe_batch(batch: Mapping[str, np.ndarray], tokenizer: Tokenizer, *, max_chars: int = 120) -> str:
  """A start-up sanity print: shapes, padding fraction, and the first row decoded segment by segment."""
  tokens = np.asarray(batch["tokens"])
  segment_ids = np.asarray(batch["segment_ids"])
  positions = np.asarray(batch["positions"])
  if tokens.ndim != 2 or tokens.shape != segment_ids.shape or tokens.shape != positions.shape:
    raise ValueError(f"describe_batch: expected tokens/segment_ids/positions of one shape [B, L], got "
                     f"{tokens.shape}, {segment_ids.shape}, {positions.shape}.")
  lines = [f"batch: tokens {tokens.shape} {tokens.dtype}, padding {np.mean(segment_ids == 0):.1%}, "
           f"segments per row {np.mean([len(set(r[r > 0].tolist())) for r in segment_ids]):.2f}, "
           f"tokenizer {tokenizer.name} (vocab {tokenizer.vocab_size})"]
  row, seg, pos = tokens[0], segment_ids[0], positions[0]
  for s in sorted(set(seg[seg > 0].tolist())):
    ids = row[seg == s]
    p = pos[seg == s]
    text = tokenizer.decode(ids)
    if len(text) > max_chars:
      text = text[:max_chars] + "..."
    marks = ("BOS " if ids[0] == tokenizer.bos_id else "") + ("EOS" if ids[-1] == tokenizer.eos_id else "")
    lines.append(f"  row 0 segment {s}: {len(ids)} tokens, positions {p[0]}..{p[-1]} {marks.strip()}: "
                 f"{text!r}")
  if not (seg > 0).any():
    lines.append("  row 0 is all padding")
  return "\n".join(lines)
