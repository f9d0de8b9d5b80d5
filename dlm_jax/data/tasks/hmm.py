"""HMM-16 (spec/decoding.md): 8 hidden states, 16 symbols; exact log-likelihood by the forward algorithm
(float64). `HMM16VarLen` (spec/did.md): length n ~ U{8..32}, then HMM-16 for n steps; log p includes
log(1/25). Host-side numpy, deterministic from its seed. Registered as two data sources:

  hmm         rows [BOS] + 32 symbols (data.seq_len = 33), every slot one segment.
  hmm_varlen  rows [BOS] + n symbols, n ~ U{data.min_len .. data.seq_len - 1}, then padding. With
              data.pad_as_token=False (DID) the padding is outside the document (segment id 0, never
              noised or scored); with True (the RADD-style masked baseline) the padding is PAD tokens
              inside the segment, masked and predicted like any symbol, and a sample's length is the
              position of its first PAD.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import numpy as np

from dlm_jax.data.base import DataSource, require
from dlm_jax.data.tasks.common import TaskIterator, TaskTokenizer, seed_of

HMM_NUM_SYMBOLS = 16
HMM_BOS, HMM_MASK, HMM_PAD = 16, 17, 18
"""Project ids for models over HMM-16 data: symbols 0..15, then BOS, MASK, PAD (a model may use a prefix)."""


def _logsumexp(a: np.ndarray, axis: int) -> np.ndarray:
  """log sum exp along axis, exact -inf when every term is -inf."""
  m = np.max(a, axis=axis, keepdims=True)
  m = np.where(np.isfinite(m), m, 0.0)
  with np.errstate(divide="ignore"):
    out = np.log(np.sum(np.exp(a - m), axis=axis, keepdims=True)) + m
  return np.squeeze(out, axis=axis)


def _rng_from(seed_or_key: Any) -> np.random.Generator:
  """numpy Generator from an int / sequence seed or from a JAX PRNG key (its key data seeds the generator)."""
  if isinstance(seed_or_key, np.random.Generator):
    return seed_or_key
  if type(seed_or_key).__module__.split(".")[0] in ("jax", "jaxlib"):
    import jax  # deferred: the numpy paths never need jax.
    if jax.dtypes.issubdtype(seed_or_key.dtype, jax.dtypes.prng_key):
      seed_or_key = jax.random.key_data(seed_or_key)
    return np.random.default_rng(np.asarray(seed_or_key).astype(np.uint64).ravel().tolist())
  return np.random.default_rng(seed_or_key)


def _categorical(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
  """One draw per row of probs [n, K] by inverse CDF in float64."""
  cdf = np.cumsum(probs, axis=-1)
  u = rng.random(probs.shape[0]) * cdf[:, -1]
  return np.minimum((u[:, None] >= cdf).sum(-1), probs.shape[1] - 1)


@dataclasses.dataclass(frozen=True, eq=False)
class HMM16:
  """The HMM-16 source (no RNG in its parameters); `smoothed()` gives the evaluator.

  Attributes:
    A: [8, 8] transitions, A[i, i] = 0.85, A[i, i+1] = 0.10, A[i, i+3] = 0.05 (mod 8); doubly stochastic.
    B: [8, 16] emissions, B[z, (2z + j) mod 16] = (0.4, 0.3, 0.2, 0.1)[j].
    pi: [8] uniform start distribution.
  """
  A: np.ndarray = dataclasses.field(default=None, repr=False)
  B: np.ndarray = dataclasses.field(default=None, repr=False)
  pi: np.ndarray = dataclasses.field(default=None, repr=False)
  delta: float = 0.0

  NUM_STATES = 8
  VOCAB_SIZE = HMM_NUM_SYMBOLS

  def __post_init__(self):
    s, v = self.NUM_STATES, self.VOCAB_SIZE
    if self.A is None:
      a = np.zeros((s, s))
      for i in range(s):
        a[i, i] += 0.85
        a[i, (i + 1) % s] += 0.10
        a[i, (i + 3) % s] += 0.05
      object.__setattr__(self, "A", a)
    if self.B is None:
      b = np.zeros((s, v))
      for z in range(s):
        for j, p in enumerate((0.4, 0.3, 0.2, 0.1)):
          b[z, (2 * z + j) % v] += p
      object.__setattr__(self, "B", b)
    if self.pi is None:
      object.__setattr__(self, "pi", np.full(s, 1.0 / s))

  def smoothed(self, delta: float = 1e-3) -> "HMM16":
    """Evaluator: A_s = (1 - delta) A + delta / 8, B_s = (1 - delta) B + delta / 16 (finite NLL everywhere)."""
    return HMM16(A=(1 - delta) * self.A + delta / self.NUM_STATES,
                 B=(1 - delta) * self.B + delta / self.VOCAB_SIZE, pi=self.pi.copy(), delta=delta)

  def stationary(self) -> np.ndarray:
    """Stationary law of A, [8] (uniform, since A is doubly stochastic)."""
    w, vecs = np.linalg.eig(self.A.T)
    p = np.real(vecs[:, np.argmin(np.abs(w - 1))])
    return p / p.sum()

  def unigram(self) -> np.ndarray:
    """Symbol law under the stationary state law, [16]."""
    return self.stationary() @ self.B

  def unigram_entropy(self) -> float:
    """Entropy (nats) of `unigram()`."""
    p = self.unigram()
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())

  def sample(self, seed_or_key: Any, n: int, L: int) -> np.ndarray:
    """n sequences of length L: int32 [n, L] in 0..15, deterministic from an int seed or a JAX key."""
    rng = _rng_from(seed_or_key)
    x = np.empty((n, L), np.int32)
    z = _categorical(rng, np.broadcast_to(self.pi, (n, self.NUM_STATES)))
    for t in range(L):
      if t > 0:
        z = _categorical(rng, self.A[z])
      x[:, t] = _categorical(rng, self.B[z])
    return x

  def log_prob(self, x: np.ndarray, lengths: Optional[np.ndarray] = None) -> np.ndarray:
    """Exact log p(x) by the forward algorithm in float64 log space.

    Args:
      x: [B, L] int symbols; ids outside 0..15 inside the scored prefix give -inf.
      lengths: optional [B] int in 1..L, score only x[b, :lengths[b]]; None = all L.

    Returns:
      float64 [B] log-likelihoods (-inf for impossible sequences under the unsmoothed source).
    """
    x = np.atleast_2d(np.asarray(x))
    n, length = x.shape
    lens = np.full(n, length) if lengths is None else np.asarray(lengths).ravel()
    if lens.shape != (n,) or (n and (lens.min() < 1 or lens.max() > length)):
      raise ValueError(f"lengths must be [B] in 1..{length}, got {lens}")
    with np.errstate(divide="ignore"):
      log_a, log_b, log_pi = np.log(self.A), np.log(self.B), np.log(self.pi)
    in_vocab = (x >= 0) & (x < self.VOCAB_SIZE)
    xs = np.where(in_vocab, x, 0)
    scored = np.arange(length)[None, :] < lens[:, None]
    bad = (~in_vocab & scored).any(1)
    alpha = log_pi[None, :] + log_b[:, xs[:, 0]].T
    for t in range(1, length):
      new = _logsumexp(alpha[:, :, None] + log_a[None], axis=1) + log_b[:, xs[:, t]].T
      alpha = np.where((t < lens)[:, None], new, alpha)
    out = _logsumexp(alpha, axis=1)
    return np.where(bad, -np.inf, out)


@dataclasses.dataclass(frozen=True, eq=False)
class HMM16VarLen:
  """Variable-length HMM-16 (spec/did.md): n ~ U{min_len..max_len}, then HMM-16 for n steps.

  log p(x) = -log(max_len - min_len + 1) + HMM forward log-likelihood of the first n symbols (log(1/25) by default).

  Attributes:
    hmm: the source (or `HMM16().smoothed()` as evaluator).
    min_len: smallest length.
    max_len: largest length (= padded width).
    pad_id: id written after the end of each sequence.
  """
  hmm: HMM16 = dataclasses.field(default_factory=HMM16)
  min_len: int = 8
  max_len: int = 32
  pad_id: int = HMM_PAD

  @property
  def num_lengths(self) -> int:
    return self.max_len - self.min_len + 1

  def smoothed(self, delta: float = 1e-3) -> "HMM16VarLen":
    """Same length law with the smoothed HMM evaluator."""
    return dataclasses.replace(self, hmm=self.hmm.smoothed(delta))

  def sample(self, seed_or_key: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(x int32 [n, max_len] padded with pad_id, lengths int32 [n])."""
    rng = _rng_from(seed_or_key)
    lengths = rng.integers(self.min_len, self.max_len + 1, size=n).astype(np.int32)
    x = self.hmm.sample(rng, n, self.max_len)
    x = np.where(np.arange(self.max_len)[None, :] < lengths[:, None], x, self.pad_id).astype(np.int32)
    return x, lengths

  def lengths_of(self, x: np.ndarray) -> np.ndarray:
    """Length of each row = position of its first pad_id (max_len if none), int32 [B]."""
    x = np.atleast_2d(np.asarray(x))
    is_pad = x == self.pad_id
    return np.where(is_pad.any(1), np.argmax(is_pad, 1), x.shape[1]).astype(np.int32)

  def log_prob(self, x: np.ndarray, lengths: Optional[np.ndarray] = None) -> np.ndarray:
    """log p(x) float64 [B]; lengths default to `lengths_of(x)`; a length outside min_len..max_len gives -inf."""
    x = np.atleast_2d(np.asarray(x))
    lens = self.lengths_of(x) if lengths is None else np.asarray(lengths).ravel().astype(np.int64)
    ok = (lens >= self.min_len) & (lens <= min(self.max_len, x.shape[1]))
    lp = self.hmm.log_prob(x, np.clip(lens, 1, x.shape[1]))
    return np.where(ok, lp - math.log(self.num_lengths), -np.inf)


# ---------------------------------------------------------------------------------------------------------------


def hmm_tokenizer() -> TaskTokenizer:
  symbols = tuple("abcdefghijklmnop") + ("^", "_", ".")
  return TaskTokenizer("hmm16", symbols, bos=HMM_BOS, eos=HMM_PAD, pad=HMM_PAD, mask=HMM_MASK)


def _iterator(config: Any, split: str, batch_size: int, num_batches: Optional[int]):
  d = config.data
  source = HMM16()
  length = d.seq_len - 1

  def make(i):
    x = source.sample(seed_of(config.seed, "hmm", split, i), batch_size, length)
    tokens = np.concatenate([np.full((batch_size, 1), HMM_BOS), x], axis=1).astype(np.int32)
    return dict(tokens=tokens, segment_ids=np.ones_like(tokens),
                positions=np.broadcast_to(np.arange(d.seq_len, dtype=np.int32), tokens.shape).copy())
  return TaskIterator(make, batch_size, num_batches)


SOURCE = DataSource(
    "hmm", make_tokenizer=lambda config: hmm_tokenizer(),
    train_iterator=lambda config, tok: _iterator(config, "train", config.train.global_batch_size,
                                                 None),
    eval_iterator=lambda config, tok, bs: _iterator(config, "validation", bs,
                                                    config.train.eval_batches))


def varlen_rows(x: np.ndarray, lengths: np.ndarray, pad_as_token: bool) -> dict[str, np.ndarray]:
  """Model rows [BOS] + x of variable-length symbols x [B, L] (padded with HMM_PAD past `lengths`).

  pad_as_token=False: segment id 1 on BOS and the n symbols, 0 on the padding (positions 0 there);
  True: one segment over the whole row, the PAD slots are tokens like any other.
  """
  b, length = x.shape
  tokens = np.concatenate([np.full((b, 1), HMM_BOS), x], axis=1).astype(np.int32)
  pos = np.broadcast_to(np.arange(length + 1, dtype=np.int32), tokens.shape)
  if pad_as_token:
    seg = np.ones_like(tokens)
  else:
    seg = (np.arange(length + 1)[None, :] <= np.asarray(lengths)[:, None]).astype(np.int32)
  return dict(tokens=tokens, segment_ids=seg, positions=np.where(seg > 0, pos, 0).astype(np.int32))


def _varlen_source_of(config: Any) -> HMM16VarLen:
  return HMM16VarLen(min_len=int(config.data.min_len), max_len=int(config.data.seq_len) - 1)


def _varlen_iterator(config: Any, split: str, batch_size: int, num_batches: Optional[int]):
  source = _varlen_source_of(config)
  pad_as_token = bool(config.data.pad_as_token)

  def make(i):
    x, lengths = source.sample(seed_of(config.seed, "hmm_varlen", split, i), batch_size)
    return varlen_rows(x, lengths, pad_as_token)
  return TaskIterator(make, batch_size, num_batches)


def _check_varlen(config: Any) -> None:
  d = config.data
  require(1 <= d.min_len <= d.seq_len - 1, "data.min_len",
          f"{d.min_len} must lie in 1..data.seq_len - 1 = {d.seq_len - 1} for data.source="
          "'hmm_varlen' (lengths are U{min_len .. seq_len - 1}; BOS takes one slot).")


VARLEN_SOURCE = DataSource(
    "hmm_varlen", make_tokenizer=lambda config: hmm_tokenizer(),
    train_iterator=lambda config, tok: _varlen_iterator(config, "train", config.train.global_batch_size,
                                                        None),
    eval_iterator=lambda config, tok, bs: _varlen_iterator(config, "validation", bs,
                                                           config.train.eval_batches),
    check=_check_varlen)
