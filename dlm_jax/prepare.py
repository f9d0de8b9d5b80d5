r"""Prepares a corpus as TFDS ArrayRecord files that dlm-jax reads without TensorFlow.

  # OpenWebText from a local copy (a folder of .txt files or openwebtext.tar.xz); no internet needed.
  python -m dlm_jax.prepare --dataset=openwebtext --source_dir=/data/openwebtext \
      --data_dir=/data/tensorflow_datasets

  # LM1B through the TFDS catalogue: DOWNLOADS about 1.7 GB from the internet (statmt.org), so run it on a
  # machine with network access and copy data_dir over. Needs `pip install importlib_resources`.
  python -m dlm_jax.prepare --dataset=lm1b --data_dir=/data/tensorflow_datasets

Then train with config.data.source='tfds', config.data.tfds_name='openwebtext_local' (or 'lm1b') and
config.data.tfds_data_dir set to the same data_dir (configs/*_owt.py set the first two).
"""
from __future__ import annotations

import os

from absl import app
from absl import flags
from absl import logging

from dlm_jax.run import cli

_DATASET = flags.DEFINE_enum("dataset", None, ["openwebtext", "lm1b"], "Corpus to prepare.")
_SOURCE_DIR = flags.DEFINE_string(
    "source_dir", None, "openwebtext only: folder (or archive) holding your local copy of the corpus.")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "TFDS data folder to write to (default: $TFDS_DATA_DIR or ~/tensorflow_datasets).")


def prepare(dataset: str, *, data_dir: str | None, source_dir: str | None = None) -> str:
  """Prepares `dataset` as ArrayRecord under `data_dir`; returns the folder it was written to.

  Raises:
    ValueError: a missing or unneeded `source_dir`, or an unknown dataset.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if data_dir:
    data_dir = os.path.expanduser(data_dir)
  if dataset == "openwebtext":
    if not source_dir:
      raise ValueError("--dataset=openwebtext needs --source_dir=<folder with the .txt files or "
                       "openwebtext.tar.xz>; nothing is downloaded.")
    from dlm_jax.data.owt_builder import OpenWebTextLocal  # pylint: disable=g-import-not-at-top
    builder = OpenWebTextLocal(data_dir=data_dir, file_format="array_record")
    config = tfds.download.DownloadConfig(manual_dir=os.path.expanduser(source_dir))
  elif dataset == "lm1b":
    if source_dir:
      raise ValueError("--dataset=lm1b downloads from the TFDS catalogue's source; --source_dir is not used.")
    logging.warning("lm1b: downloading about 1.7 GB from the internet (needs network access).")
    builder = tfds.builder("lm1b", data_dir=data_dir, file_format="array_record")
    config = tfds.download.DownloadConfig()
  else:
    raise ValueError(f"unknown dataset {dataset!r}; choose 'openwebtext' or 'lm1b'.")
  builder.download_and_prepare(download_config=config)
  splits = {name: split.num_examples for name, split in builder.info.splits.items()}
  logging.info("prepared %s at %s: %s", dataset, builder.data_dir, splits)
  print(f"Prepared {dataset} in {builder.data_dir}: {splits}")
  return str(builder.data_dir)


def main(argv: list[str]) -> None:
  cli.quiet_library_logs()
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    prepare(_DATASET.value, data_dir=_DATA_DIR.value, source_dir=_SOURCE_DIR.value)
  except (ValueError, FileNotFoundError) as e:
    raise app.UsageError(str(e)) from e


if __name__ == "__main__":
  flags.mark_flag_as_required("dataset")
  app.run(main)
