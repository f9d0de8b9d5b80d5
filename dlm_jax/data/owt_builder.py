"""`OpenWebTextLocal`: a TFDS builder that prepares a LOCAL copy of OpenWebText as ArrayRecord.

The TFDS catalogue has no OpenWebText, and nothing here downloads it. Give the builder the corpus you
already have (`manual_dir`), in any of these forms (mixed freely, searched recursively):

  * a folder of .txt files, one document per file (what the original dump unpacks to);
  * the original dump `openwebtext.tar.xz`, or its inner `urlsf_subset*.xz` archives (xz-compressed tar files
    of .txt documents), or any .tar / .tar.gz / .tgz / .tar.xz of .txt files; read with the standard
    library as a stream, nothing is unpacked to disk.

Split (deterministic, independent of the machine): documents are visited in sorted path order (archive
members in archive order) and document i is `validation` when i % 200 == 0 (0.5%, as a held-out set
the size MDLM's uses), else `train`. Preparing reads the corpus once per split.

Use `python -m dlm_jax.prepare --dataset=openwebtext --source_dir=... --data_dir=...`, then read it
with `dlm_jax.data.sources.tfds_source('openwebtext', 'train', data_dir)`.
"""
from __future__ import annotations

import io
import lzma
import os
import tarfile
from typing import Iterator

from etils import epath
import tensorflow_datasets as tfds

__all__ = ["OpenWebTextLocal", "iter_documents", "VALIDATION_EVERY"]

VALIDATION_EVERY = 200
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2")


def _decode(data: bytes) -> str:
  return data.decode("utf-8", errors="replace")


def _iter_tar(fileobj: io.IOBase | None, name: str, mode: str) -> Iterator[tuple[str, str]]:
  """Yields (key, text) for .txt members of a tar stream; recurses into nested .xz / tar members."""
  with tarfile.open(name=None if fileobj else name, fileobj=fileobj, mode=mode) as tar:
    for member in tar:
      if not member.isfile():
        continue
      lower = member.name.lower()
      key = f"{name}::{member.name}"
      if lower.endswith(".txt"):
        f = tar.extractfile(member)
        if f is not None:
          yield key, _decode(f.read())
      elif lower.endswith(_TAR_SUFFIXES) or lower.endswith(".xz"):
        f = tar.extractfile(member)
        if f is not None:
          # Nested archive (the OWT dump holds xz-compressed tar files): read it into memory (tens of MB).
          yield from _iter_tar(io.BytesIO(f.read()), key, "r:*")


def iter_documents(source_dir: str) -> Iterator[tuple[str, str]]:
  """Yields (stable key, text) for every document under `source_dir`, in a deterministic order.

  Raises:
    FileNotFoundError: `source_dir` does not exist.
    ValueError: `source_dir` holds no .txt file or supported archive.
  """
  source_dir = os.path.expanduser(str(source_dir))
  if not os.path.exists(source_dir):
    raise FileNotFoundError(f"OpenWebText source {source_dir!r} does not exist; pass --source_dir=<folder with "
                            "the .txt files or openwebtext.tar.xz>.")
  if os.path.isfile(source_dir):
    paths = [source_dir]
  else:
    paths = sorted(os.path.join(root, n) for root, _, names in os.walk(source_dir) for n in names)
  found = False
  for path in paths:
    rel = os.path.relpath(path, source_dir) if path != source_dir else os.path.basename(path)
    lower = path.lower()
    if lower.endswith(".txt"):
      found = True
      with open(path, "rb") as f:
        yield rel, _decode(f.read())
    elif lower.endswith(_TAR_SUFFIXES):
      found = True
      # Stream mode: the 12 GB dump is read once front to back, never seeked.
      yield from _iter_tar(None, path, "r|*")
    elif lower.endswith(".xz"):  # an inner urlsf_subset*.xz: an xz-compressed tar.
      found = True
      with lzma.open(path) as f:
        yield from _iter_tar(f, rel, "r|")
  if not found:
    raise ValueError(f"OpenWebText source {source_dir!r} has no .txt files or .tar/.xz archives of them.")


class OpenWebTextLocal(tfds.core.GeneratorBasedBuilder):
  """OpenWebText prepared from a local copy (see the module docstring); features: {'text': Text}."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Local OpenWebText; validation = every 200th document."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Put your copy of OpenWebText (a folder of .txt files, or openwebtext.tar.xz / its urlsf_subset*.xz "
      "files) in the manual folder, or run: python -m dlm_jax.prepare --dataset=openwebtext "
      "--source_dir=/path/to/openwebtext --data_dir=/path/to/tensorflow_datasets")

  def __init__(self, *, file_format: str | None = None, **kwargs):
    """As `GeneratorBasedBuilder`, but ArrayRecord by default (read without TensorFlow)."""
    super().__init__(file_format=file_format or "array_record", **kwargs)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    """This file. (TFDS's default lookup needs the `importlib_resources` package for builders outside it.)"""
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    # Defined outside the TFDS package: DatasetInfo(builder=self, ...) rather than dataset_info_from_configs.
    return tfds.core.DatasetInfo(
        builder=self,
        description=("OpenWebText (Gokaslan & Cohen, 2019), an open reproduction of WebText, prepared from a "
                     "local copy supplied by the user."),
        features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
        supervised_keys=None,
        homepage="https://skylion007.github.io/OpenWebTextCorpus/",
        citation=("@misc{Gokaslan2019OpenWeb, title={OpenWebText Corpus}, author={Aaron Gokaslan and "
                  "Vanya Cohen}, howpublished={\\url{http://Skylion007.github.io/OpenWebTextCorpus}}, "
                  "year={2019}}"),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    source_dir = dl_manager.manual_dir
    return {"train": self._generate_examples(source_dir, "train"),
            "validation": self._generate_examples(source_dir, "validation")}

  def _generate_examples(self, source_dir, split: str):
    for i, (key, text) in enumerate(iter_documents(os.fspath(source_dir))):
      if (i % VALIDATION_EVERY == 0) != (split == "validation"):
        continue
      if not text.strip():
        continue
      yield f"{i:010d}:{key}", {"text": text}
