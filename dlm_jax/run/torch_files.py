"""Reading PyTorch checkpoint files (`torch.save`: a Lightning .ckpt, a pytorch_model.bin) without torch.

A `torch.save` file is a zip archive: `<root>/data.pkl` (a pickle of the saved object) and one raw
file per tensor storage (`<root>/data/<key>`). A plain `pickle.load` would run whatever the pickle
names (a Lightning checkpoint pickles its omegaconf config and the tokenizer object), so this
reader unpickles with a restricted `find_class`: torch's tensor-rebuild functions become numpy
constructors, a few harmless containers are allowed, and every other class or function becomes an
inert stand-in (`Opaque`) that records its arguments and runs nothing.

  obj = load("last.ckpt")               # dicts/lists as saved; tensors as numpy arrays
  obj["state_dict"]["backbone.vocab_embed.embedding"]   # np.ndarray [V, d]
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from typing import Any

import ml_dtypes
import numpy as np


class TorchFileError(ValueError):
  """The file is not a `torch.save` zip archive this reader understands."""


# torch's typed storages -> numpy dtypes (the classes that `torch.save` names in a storage's id).
STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_, "UntypedStorage": np.uint8,
}

_SAFE = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set, ("builtins", "frozenset"): frozenset,
    ("builtins", "dict"): dict, ("builtins", "list"): list, ("builtins", "tuple"): tuple,
    ("builtins", "int"): int, ("builtins", "float"): float, ("builtins", "str"): str,
    ("builtins", "bool"): bool, ("builtins", "bytes"): bytes, ("builtins", "complex"): complex,
    ("builtins", "slice"): slice, ("builtins", "range"): range,
}


class Opaque:
  """Stands in for a pickled object of a class we do not load (configs, tokenizers, ...).

  Holds what the pickle gave it (`name`, `args`, `kwargs`, `state`, items), runs no code.
  """
  name = "?"

  def __new__(cls, *args, **kwargs):
    self = object.__new__(cls)
    self.args, self.kwargs, self.state = args, kwargs, None
    self.items, self.mapping = [], {}
    return self

  def __init__(self, *args, **kwargs):  # pylint: disable=unused-argument
    pass

  def __setstate__(self, state):
    self.state = state

  def __setitem__(self, key, value):
    self.mapping[key] = value

  def append(self, value):
    self.items.append(value)

  def extend(self, values):
    self.items.extend(values)

  def __repr__(self):
    return f"<opaque {self.name}>"


def _opaque(name: str) -> type:
  return type(name.rsplit(".", 1)[-1], (Opaque,), {"name": name, "__module__": __name__})


class _StorageType:
  def __init__(self, name: str):
    self.name, self.dtype = name, STORAGE_DTYPES[name]


def _rebuild_tensor(storage, offset, size, stride, *unused):
  """torch._utils._rebuild_tensor(_v2): a strided view of a storage, copied into a numpy array."""
  del unused
  if not isinstance(storage, np.ndarray):
    raise TorchFileError(f"a tensor refers to an unsupported storage {storage!r}.")
  size, stride, offset = tuple(int(s) for s in size), tuple(int(s) for s in stride), int(offset)
  if len(size) != len(stride) or min(size + stride + (offset,), default=0) < 0:
    raise TorchFileError(f"a tensor has an invalid layout (size {size}, stride {stride}).")
  if 0 in size:
    return np.zeros(size, storage.dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= storage.size:
    raise TorchFileError(f"a tensor (size {size}, stride {stride}, offset {offset}) reaches past "
                         f"its storage of {storage.size} elements: the file is damaged.")
  if not size:
    return np.array(storage[offset])
  view = np.lib.stride_tricks.as_strided(storage[offset:], shape=size,
                                         strides=tuple(s * storage.dtype.itemsize for s in stride))
  return np.array(view)


def _rebuild_parameter(data, *unused):
  del unused
  return data


def _rebuild_from_type(func, new_type, args, state):  # torch._tensor._rebuild_from_type_v2
  del new_type, state
  return func(*args)


_TORCH = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
}


class _Unpickler(pickle.Unpickler):
  def __init__(self, data: bytes, read_storage):
    super().__init__(io.BytesIO(data))
    self._read_storage = read_storage

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in _SAFE:
      return _SAFE[(module, name)]
    if (module, name) in _TORCH:
      return _TORCH[(module, name)]
    if module in ("torch", "torch.storage") and name in STORAGE_DTYPES:
      return _StorageType(name)
    return _opaque(f"{module}.{name}")

  def persistent_load(self, pid: Any) -> Any:
    if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
      raise TorchFileError(f"unsupported persistent id {pid!r:.80}.")
    _, storage_type, key, _location, _numel = pid
    if not isinstance(storage_type, _StorageType):
      raise TorchFileError(f"unsupported storage type {storage_type!r}.")
    return self._read_storage(str(key), storage_type.dtype)


def load_bytes(data: bytes, what: str = "the file") -> Any:
  """Unpickles a `torch.save` zip archive given as bytes (see `load`)."""
  try:
    zf = zipfile.ZipFile(io.BytesIO(data))
  except zipfile.BadZipFile as e:
    if data[:2] == b"\x80\x02" or data[:1] == b"\x80":
      raise TorchFileError(f"{what} is in torch's legacy (pre-1.6, non-zip) format; re-save it "
                           "with torch >= 1.6 (torch.save's default) and import that.") from e
    raise TorchFileError(f"{what} is not a torch.save zip archive ({e}).") from e
  with zf:
    pickles = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
      raise TorchFileError(f"{what} is a zip archive without one <root>/data.pkl ({pickles}); "
                           "not a torch.save file.")
    root = pickles[0][:-len("data.pkl")]
    big_endian = False
    if root + "byteorder" in zf.namelist():
      big_endian = zf.read(root + "byteorder").strip() == b"big"
    cache: dict[str, np.ndarray] = {}

    def read_storage(key: str, dtype) -> np.ndarray:
      if key not in cache:
        try:
          raw = zf.read(f"{root}data/{key}")
        except KeyError as e:
          raise TorchFileError(f"{what} lacks the storage {root}data/{key}: truncated?") from e
        arr = np.frombuffer(raw, dtype=dtype)
        cache[key] = arr.byteswap() if big_endian else arr
      return cache[key]

    try:
      return _Unpickler(zf.read(pickles[0]), read_storage).load()
    except TorchFileError:
      raise
    except Exception as e:  # pylint: disable=broad-except  # a damaged or unusual pickle
      raise TorchFileError(f"{what} could not be unpickled ({type(e).__name__}: {e}).") from e


def load(path: str) -> Any:
  """The object a `torch.save` file holds, with tensors as numpy arrays; runs no pickled code.

  Classes other than plain containers come back as `Opaque` stand-ins.
  """
  with open(path, "rb") as f:
    return load_bytes(f.read(), what=repr(path))
