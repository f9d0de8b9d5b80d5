"""What the synthetic tasks share: a fixed-vocabulary tokenizer and a stateless batch iterator.

Batches are pure functions of (seed, split, batch index), so an iterator's checkpointed state is
one integer and every process draws the same global batch and keeps its own rows.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable

import jax
import numpy as np

from dlm_jax.config import ConfigError


class TaskTokenizer:
  """Fixed-vocabulary tokenizer of a synthetic task (ids are the task's own symbols)."""

  def __init__(self, name: str, symbols: tuple[str, ...], bos: int, eos: int, pad: int, mask: int):
    self.name = name
    self.symbols = symbols
    self.bos_id, self.eos_id, self.pad_id, self.mask_id = bos, eos, pad, mask
    self.vocab_size = len(symbols)
    self._index = {s: i for i, s in enumerate(symbols)}

  def encode(self, text: str) -> list[int]:
    out = []
    for ch in text:
      if ch.isspace():
        continue
      if ch not in self._index:
        raise ValueError(f"{self.name}: character {ch!r} is not in the task's vocabulary.")
      out.append(self._index[ch])
    return out

  def decode(self, ids) -> str:
    special = {self.bos_id, self.eos_id, self.pad_id, self.mask_id}
    return "".join(self.symbols[int(i)] for i in ids
                   if 0 <= int(i) < self.vocab_size and int(i) not in special)

  def decode_batch(self, batch) -> list[str]:
    return [self.decode(r) for r in np.asarray(batch)]

  def fingerprint(self) -> str:
    return hashlib.sha256(("|".join(self.symbols) + self.name).encode()).hexdigest()[:16]


def seed_of(*parts: Any) -> int:
  h = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
  return int.from_bytes(h[:8], "little")


class TaskIterator:
  """Local batches of batch i = make_global(i) restricted to this process's rows.

  State is {"n": next batch index}; get_state/set_state are dicts (JSON-safe).
  """

  def __init__(self, make_global: Callable[[int], dict[str, np.ndarray]], global_batch: int,
               num_batches: int | None = None):
    pc, pi = jax.process_count(), jax.process_index()
    if global_batch % pc:
      raise ConfigError(f"config.train.global_batch_size={global_batch} is not "
                                   f"divisible by the {pc} processes.")
    self._make = make_global
    self._local = global_batch // pc
    self._lo = pi * self._local
    self._n = 0
    self._limit = num_batches

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._limit is not None and self._n >= self._limit:
      raise StopIteration
    batch = self._make(self._n)
    self._n += 1
    return {k: v[self._lo:self._lo + self._local] for k, v in batch.items()}

  def get_state(self) -> dict[str, int]:
    return {"n": self._n}

  def set_state(self, state: dict[str, int]) -> None:
    self._n = int(state["n"])


def prompt_response_rows(ex: dict[str, np.ndarray], start_id: int) -> dict[str, np.ndarray]:
  """Model rows [prompt][response] of prompt/response arrays: response slots maskable, buckets (if any)
  on the response, example ids from `ex` (else start_id + row)."""
  prompt, response = ex["prompt"], ex["response"]
  b, p = prompt.shape
  r = response.shape[1]
  tokens = np.concatenate([prompt, response], axis=1).astype(np.int32)
  maskable = np.zeros_like(tokens, bool)
  maskable[:, p:] = True
  out = dict(tokens=tokens, segment_ids=np.ones_like(tokens),
             positions=np.broadcast_to(np.arange(p + r, dtype=np.int32), tokens.shape).copy(),
             maskable=maskable,
             example_id=np.asarray(ex.get("example_id", start_id + np.arange(b)), np.int32))
  if "buckets" in ex:
    buckets = np.zeros_like(tokens, np.int32)
    buckets[:, p:] = ex["buckets"]
    out["buckets"] = buckets
  return out
