"""One path layer for every file the project reads or writes: local paths and gs:// alike.

Everything goes through etils.epath (as Orbax does), so a workdir, a scored SFT set, a tokenizer
file or a sample folder may be a local path or a `gs://bucket/...` URL. Local paths keep their
POSIX guarantees (`write_*` replace a file atomically: a reader sees the old or the new content,
never half of it); on GCS one upload is one object, which is atomic by itself. Nothing here
renames on GCS (a rename there is a copy and a delete, and slow).

gs:// needs the GCS client libraries of the `[gcp]` extra; without them the first use of a gs://
path raises `MissingExtraError` saying what to install.
"""

from __future__ import annotations

import io
import os
import tempfile
from typing import Iterator

from etils import epath

GCP_EXTRA_HINT = "pip install 'dlm-jax[gcp]'"


class StorageError(OSError):
  """A path cannot be used (missing client libraries, unsupported scheme)."""


class MissingExtraError(StorageError):
  """A gs:// path was used without the [gcp] extra installed."""


_checked_gcs = False


def is_remote(path: str | os.PathLike) -> bool:
  """True for URLs (gs://, s3://, ...), False for local paths."""
  return "://" in os.fspath(path)


def is_gcs(path: str | os.PathLike) -> bool:
  return os.fspath(path).startswith("gs://")


def require_gcs(path: str | os.PathLike = "gs://...") -> None:
  """Raises MissingExtraError unless the GCS client libraries of the [gcp] extra import."""
  global _checked_gcs
  if _checked_gcs:
    return
  missing = []
  for module in ("gcsfs", "google.cloud.storage"):
    try:
      __import__(module)
    except ImportError:
      missing.append(module.split(".")[0] if module == "gcsfs" else "google-cloud-storage")
  if missing:
    raise MissingExtraError(
        f"{os.fspath(path)} is on Google Cloud Storage, which needs the [gcp] extra "
        f"({', '.join(missing)} not installed): {GCP_EXTRA_HINT}")
  _checked_gcs = True


def path(p: str | os.PathLike) -> epath.Path:
  """An epath.Path for `p` (checks the client libraries of a gs:// path first)."""
  s = os.fspath(p)
  if is_gcs(s):
    require_gcs(s)
  elif is_remote(s) and not s.startswith(("s3://", "file://")):
    raise StorageError(f"{s}: unsupported storage scheme; use a local path or gs://bucket/...")
  elif not is_remote(s):
    s = os.path.expanduser(s)
  return epath.Path(s)


def absolute(p: str | os.PathLike) -> str:
  """Local paths made absolute (Orbax needs it); URLs unchanged."""
  s = os.fspath(p)
  return s if is_remote(s) else os.path.abspath(os.path.expanduser(s))


def join(base: str | os.PathLike, *parts: str) -> str:
  """`base/part/...` as a string, for local paths and URLs."""
  s = os.fspath(base)
  if is_remote(s):
    return "/".join([s.rstrip("/")] + [p.strip("/") for p in parts if p])
  return os.path.join(s, *parts)


def exists(p: str | os.PathLike) -> bool:
  return path(p).exists()


def isdir(p: str | os.PathLike) -> bool:
  return path(p).is_dir()


def isfile(p: str | os.PathLike) -> bool:
  q = path(p)
  return q.exists() and not q.is_dir()


def makedirs(p: str | os.PathLike) -> None:
  """Creates a folder (and its parents); on GCS folders are implicit and this writes nothing."""
  if is_remote(p):
    return
  os.makedirs(os.path.expanduser(os.fspath(p)), exist_ok=True)


def read_bytes(p: str | os.PathLike) -> bytes:
  return path(p).read_bytes()


def read_text(p: str | os.PathLike) -> str:
  return path(p).read_text(encoding="utf-8")


def write_bytes(p: str | os.PathLike, data: bytes) -> None:
  """Writes `data` atomically: the file holds the old or the new content, never a mix.

  Local: a temporary file in the same folder, then os.replace. GCS: one upload (an object
  appears whole or not at all). Parent folders are created.
  """
  s = os.fspath(p)
  if is_remote(s):
    path(s).write_bytes(data)
    return
  s = os.path.expanduser(s)
  folder = os.path.dirname(os.path.abspath(s))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(s)}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, s)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_text(p: str | os.PathLike, text: str) -> None:
  write_bytes(p, text.encode("utf-8"))


def remove(p: str | os.PathLike, missing_ok: bool = True) -> None:
  q = path(p)
  if missing_ok and not q.exists():
    return
  q.unlink()


def listdir(p: str | os.PathLike) -> list[str]:
  """Names (not paths) in a folder, sorted; [] when it does not exist."""
  q = path(p)
  if not q.exists():
    return []
  return sorted(c.name for c in q.iterdir())


def walk_files(p: str | os.PathLike) -> Iterator[str]:
  """Every file below folder `p` (recursively), as path strings, sorted."""
  s = os.fspath(p)
  if not is_remote(s):
    s = os.path.expanduser(s)
    yield from sorted(os.path.join(root, n) for root, _, names in os.walk(s) for n in names)
    return
  out = []
  todo = [path(s)]
  while todo:
    for child in todo.pop().iterdir():
      if child.is_dir():
        todo.append(child)
      else:
        out.append(os.fspath(child))
  yield from sorted(out)


def open_binary(p: str | os.PathLike, mode: str = "rb"):
  """A binary file object (read or write) for a local path or a URL."""
  return path(p).open(mode)


def save_npz(p: str | os.PathLike, **arrays) -> None:
  """numpy.savez to a local path or a URL, atomically (see write_bytes)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  write_bytes(p, buf.getvalue())


def load_npz(p: str | os.PathLike) -> dict:
  """All arrays of an .npz file (local or URL) as a dict."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  with np.load(io.BytesIO(read_bytes(p)), allow_pickle=False) as z:
    return {k: z[k] for k in z.files}
