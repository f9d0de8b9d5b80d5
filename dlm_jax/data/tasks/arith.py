"""Synthetic tasks with exact answers or exact likelihoods, plus prompt/response JSONL loading.

- ARITH-CHAIN (spec/trims.md, "Toy reproduction on CPU"): chained +/* arithmetic mod 100 with an optional swapped
  rendering per step; exact answers and an exact "valid trace" check.
- HMM-16 (spec/decoding.md): 8 hidden states, 16 symbols; exact log-likelihood by the forward algorithm (float64).
  `HMM16VarLen` (spec/did.md): length n ~ U{8..32}, then HMM-16 for n steps; log p includes log(1/25).
- `load_prompt_response_jsonl`: real SFT data, one JSON object per line.

Everything here is host-side numpy and deterministic from its seed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import numpy as np

Seed = Union[int, Sequence[int], np.random.SeedSequence]

# ---------------------------------------------------------------------------------------------------------------
# ARITH-CHAIN
# ---------------------------------------------------------------------------------------------------------------

PLUS, TIMES, EQUALS, RESERVED, ARROW, QUERY, BOS, EOS, PAD, MASK = 10, 11, 12, 13, 14, 15, 16, 17, 18, 19
ARITH_VOCAB_SIZE = 20
ARITH_SYMBOLS = tuple("0123456789") + ("+", "*", "=", "~", ">", "?", "^", "$", ".", "_")
"""One character per token id for `detokenize`: BOS '^', EOS '$', PAD '.', MASK '_', reserved '~'."""

SPLIT_IDS = {"train": 0, "validation": 1, "test": 2}
_SPLIT_TAG = 0x41524954  # "ARIT": keeps split streams apart from plain integer seeds such as 11 or 123.


def detokenize(ids: Sequence[int]) -> str:
  """ARITH-CHAIN token ids -> one character each (see `ARITH_SYMBOLS`; '#' for ids outside the vocabulary)."""
  return "".join(ARITH_SYMBOLS[i] if 0 <= i < ARITH_VOCAB_SIZE else "#" for i in np.asarray(ids).ravel().tolist())


def _rng(seed: Seed) -> np.random.Generator:
  return np.random.default_rng(seed)


@dataclasses.dataclass(frozen=True)
class ArithChain:
  """ARITH-CHAIN generator and checker.

  Per example: k ~ U{1..kmax}; a0 ~ U{0..99}; for j = 1..k: op_j ~ U{+, *}; d_j ~ U{1..9} for '+', U{2, 3} for '*';
  r_j = (r_{j-1} op_j d_j) mod 100 (r_0 = a0); s_j ~ U{0, 1} if swap else 0.
  Prompt [P = 4 + 2 kmax]: BOS tens(a0) units(a0) op_1 d_1 ... op_k d_k '?' PAD...
  Response [R = 7 kmax + 4]: per step, s_j = 0: tens(r_{j-1}) units(r_{j-1}) op_j d_j '=' tens(r_j) units(r_j);
  s_j = 1: d_j op_j tens(r_{j-1}) units(r_{j-1}) '=' tens(r_j) units(r_j); then '>' tens(r_k) units(r_k); EOS to R.

  Attributes:
    kmax: maximum number of steps.
    swap: whether each step may use the swapped rendering.
  """
  kmax: int = 3
  swap: bool = True

  def __post_init__(self):
    if not isinstance(self.kmax, (int, np.integer)) or self.kmax < 1:
      raise ValueError(f"kmax must be an int >= 1, got {self.kmax!r}")

  @property
  def prompt_len(self) -> int:
    return 4 + 2 * self.kmax

  @property
  def response_len(self) -> int:
    return 7 * self.kmax + 4

  @property
  def vocab_size(self) -> int:
    return ARITH_VOCAB_SIZE

  @property
  def num_draws(self) -> int:
    """Uniforms consumed per example (row-major, so `generate(seed, n)[:m] == generate(seed, m)`)."""
    return 2 + 4 * self.kmax

  def generate(self, seed: Seed, n: int) -> dict[str, np.ndarray]:
    """n examples, deterministic from `seed` (anything `np.random.default_rng` accepts).

    Example i depends only on (seed, i): a prefix of a larger draw equals the smaller draw.

    Returns:
      dict with prompt int32 [n, P], response int32 [n, R], answer int32 [n] (r_k), num_steps int32 [n] (k),
      swapped int8 [n, kmax] (s_j, 0 beyond k).
    """
    if n < 0:
      raise ValueError(f"n must be >= 0, got {n}")
    kmax = self.kmax
    u = _rng(seed).random((n, self.num_draws))
    k = 1 + np.floor(u[:, 0] * kmax).astype(np.int64)
    a0 = np.floor(u[:, 1] * 100).astype(np.int64)
    us = u[:, 2:].reshape(n, kmax, 4)
    op = np.floor(us[..., 0] * 2).astype(np.int64)  # 0 '+', 1 '*'
    d = np.where(op == 0, 1 + np.floor(us[..., 1] * 9), 2 + np.floor(us[..., 2] * 2)).astype(np.int64)
    s = np.floor(us[..., 3] * 2).astype(np.int64) if self.swap else np.zeros((n, kmax), np.int64)
    return self.render_batch(k, a0, PLUS + op, d, s)

  def render_batch(self, num_steps: np.ndarray, a0: np.ndarray, op_tokens: np.ndarray, d: np.ndarray,
                   swapped: np.ndarray) -> dict[str, np.ndarray]:
    """Token arrays of given examples (no randomness).

    Args:
      num_steps: [n] k in 1..kmax.
      a0: [n] start values in 0..99.
      op_tokens: [n, kmax] PLUS or TIMES (entries beyond k ignored).
      d: [n, kmax] operands (entries beyond k ignored).
      swapped: [n, kmax] 0/1 rendering flags (entries beyond k ignored).

    Returns:
      dict as `generate`.
    """
    kmax = self.kmax
    k = np.asarray(num_steps, np.int64)
    a0 = np.asarray(a0, np.int64)
    n = k.shape[0]
    opt = np.asarray(op_tokens, np.int64).reshape(n, kmax)
    d = np.asarray(d, np.int64).reshape(n, kmax)
    steps = np.arange(kmax)[None, :] < k[:, None]
    s = np.where(steps, np.asarray(swapped, np.int64).reshape(n, kmax), 0)
    if n and (k.min() < 1 or k.max() > kmax or a0.min() < 0 or a0.max() > 99
              or not np.isin(opt[steps], (PLUS, TIMES)).all() or d[steps].min() < 0 or d[steps].max() > 9):
      raise ValueError("render_batch: k must be in 1..kmax, a0 in 0..99, ops PLUS/TIMES and d single digits")

    prompt = np.full((n, self.prompt_len), PAD, np.int32)
    response = np.full((n, self.response_len), EOS, np.int32)
    rows = np.arange(n)
    prompt[:, 0] = BOS
    prompt[:, 1], prompt[:, 2] = a0 // 10, a0 % 10
    r_prev = a0.copy()
    for j in range(kmax):
      act = steps[:, j]
      oj, dj = opt[:, j], d[:, j]
      r = np.where(oj == PLUS, (r_prev + dj) % 100, (r_prev * dj) % 100)
      prompt[act, 3 + 2 * j] = oj[act]
      prompt[act, 4 + 2 * j] = dj[act]
      plain = np.stack([r_prev // 10, r_prev % 10, oj, dj, np.full(n, EQUALS), r // 10, r % 10], 1)
      swap = np.stack([dj, oj, r_prev // 10, r_prev % 10, np.full(n, EQUALS), r // 10, r % 10], 1)
      block = np.where((s[:, j] == 1)[:, None], swap, plain)
      response[act, 7 * j:7 * j + 7] = block[act]
      r_prev = np.where(act, r, r_prev)
    prompt[rows, 3 + 2 * k] = QUERY
    response[rows, 7 * k] = ARROW
    response[rows, 7 * k + 1] = r_prev // 10
    response[rows, 7 * k + 2] = r_prev % 10
    return dict(prompt=prompt, response=response, answer=r_prev.astype(np.int32), num_steps=k.astype(np.int32),
                swapped=s.astype(np.int8))

  def render(self, a0: int, steps: Sequence[tuple[str, int]], swapped: Sequence[int] = ()) -> dict[str, np.ndarray]:
    """One example from its parameters, e.g. render(37, [("+", 5), ("*", 3), ("+", 9)], (0, 1, 0)).

    Returns:
      dict as `generate` with n = 1 (prompt [1, P], response [1, R], answer [1], ...).
    """
    k = len(steps)
    if not 1 <= k <= self.kmax:
      raise ValueError(f"need 1..{self.kmax} steps, got {k}")
    names = {"+": PLUS, "*": TIMES}
    if any(o not in names for o, _ in steps):
      raise ValueError(f"step operators must be '+' or '*', got {[o for o, _ in steps]}")
    pad = self.kmax - k
    ops = [names[o] for o, _ in steps] + [PLUS] * pad
    ds = [int(dj) for _, dj in steps] + [1] * pad
    sw = list(swapped) or [0] * k
    if len(sw) != k:
      raise ValueError(f"swapped must have one flag per step ({k}), got {len(sw)}")
    return self.render_batch(np.array([k]), np.array([a0]), np.array([ops]), np.array([ds]), np.array([sw + [0] * pad]))

  def split(self, name: str, n: int, stream: int = 0) -> dict[str, np.ndarray]:
    """Examples of the "train" / "validation" / "test" split: seeds (tag, split id, stream) never coincide across
    splits nor with plain integer seeds. Splits are disjoint as random streams; the finite task space (146,300
    distinct prompts at kmax = 3) means identical prompts can still occur in several splits."""
    if name not in SPLIT_IDS:
      raise ValueError(f"split must be one of {sorted(SPLIT_IDS)}, got {name!r}")
    return self.generate((_SPLIT_TAG, SPLIT_IDS[name], int(stream)), n)

  def stream(self, seed: int, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """An endless stream of fresh batches: batch i = generate((seed, i), batch_size)."""
    i = 0
    while True:
      yield self.generate((int(seed), i), batch_size)
      i += 1

  def render_text(self, example: dict[str, Any]) -> str:
    """Readable form of one example: '^37+5*3+9? -> 37+5=42 3*42=26 26+9=35 >35$'.

    Prompt padding and the EOS fill after the first EOS are left out; response steps are separated by spaces.
    """
    prompt = np.asarray(example["prompt"]).ravel().tolist()
    response = np.asarray(example["response"]).ravel().tolist()
    if PAD in prompt:
      prompt = prompt[:prompt.index(PAD)]
    if EOS in response:
      response = response[:response.index(EOS) + 1]
    if ARROW in response:
      a = response.index(ARROW)
      body, tail = response[:a], response[a:]
    else:
      body, tail = response, []
    chunks = [detokenize(body[i:i + 7]) for i in range(0, len(body), 7)]
    return f"{detokenize(prompt)} -> " + " ".join(chunks + ([detokenize(tail)] if tail else []))

  def parse_prompt(self, prompt: Sequence[int]) -> Optional[tuple[int, list[tuple[int, int]]]]:
    """(a0, [(op token, d), ...]) from a well-formed prompt, else None."""
    p = np.asarray(prompt).ravel().tolist()
    if len(p) != self.prompt_len or p[0] != BOS or not (p[1] < 10 and p[2] < 10) or QUERY not in p:
      return None
    q = p.index(QUERY)
    k = (q - 3) // 2
    if q < 5 or (q - 3) % 2 or k > self.kmax or any(x != PAD for x in p[q + 1:]):
      return None
    ops = [(p[3 + 2 * j], p[4 + 2 * j]) for j in range(k)]
    for o, dj in ops:
      if not ((o == PLUS and 1 <= dj <= 9) or (o == TIMES and dj in (2, 3))):
        return None
    return 10 * p[1] + p[2], ops

  def is_valid_trace(self, prompt: Sequence[int], response: Sequence[int]) -> bool:
    """True iff `response` equals one of the 2^k correct renderings of `prompt` (only the plain one if not swap).

    A malformed prompt gives False.
    """
    parsed = self.parse_prompt(prompt)
    resp = np.asarray(response).ravel().tolist()
    if parsed is None or len(resp) != self.response_len:
      return False
    r_prev, ops = parsed
    for j, (o, dj) in enumerate(ops):
      r = (r_prev + dj) % 100 if o == PLUS else (r_prev * dj) % 100
      plain = [r_prev // 10, r_prev % 10, o, dj, EQUALS, r // 10, r % 10]
      swapped = [dj, o, r_prev // 10, r_prev % 10, EQUALS, r // 10, r % 10]
      block = resp[7 * j:7 * j + 7]
      if block != plain and not (self.swap and block == swapped):
        return False
      r_prev = r
    k = len(ops)
    tail = [ARROW, r_prev // 10, r_prev % 10] + [EOS] * (self.response_len - 7 * k - 3)
    return resp[7 * k:] == tail

  def valid_traces(self, prompts: np.ndarray, responses: np.ndarray) -> np.ndarray:
    """`is_valid_trace` per row: prompts [n, P], responses [n, R] -> bool [n]."""
    return np.array([self.is_valid_trace(p, r) for p, r in zip(np.asarray(prompts), np.asarray(responses))], bool)


def parse_answers(responses: np.ndarray) -> np.ndarray:
  """Answers of many responses: [n, R] -> int32 [n], the two digits after the first '>' or -1."""
  r = np.atleast_2d(np.asarray(responses))
  n, length = r.shape
  is_arrow = r == ARROW
  has = is_arrow.any(1)
  pos = np.argmax(is_arrow, 1)
  ok = has & (pos + 2 < length)
  rows = np.arange(n)
  tens = r[rows, np.minimum(pos + 1, length - 1)]
  units = r[rows, np.minimum(pos + 2, length - 1)]
  ok &= (tens >= 0) & (tens <= 9) & (units >= 0) & (units <= 9)
  return np.where(ok, 10 * tens + units, -1).astype(np.int32)


def parse_answer(response_tokens: Sequence[int]) -> int:
  """The answer of one response: the two tokens after the first '>' as a number 0..99, or -1 when '>' is missing,
  too close to the end, or followed by a non-digit."""
  return int(parse_answers(np.asarray(response_tokens).reshape(1, -1))[0])


def exact_match(pred_responses: np.ndarray, answers: Sequence[int]) -> np.ndarray:
  """bool [n]: the parsed answer of each predicted response [n, R] equals answers [n]."""
  return parse_answers(pred_responses) == np.asarray(answers).ravel()


# ---------------------------------------------------------------------------------------------------------------
# HMM-16
# ---------------------------------------------------------------------------------------------------------------

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
# Prompt/response JSONL
# ---------------------------------------------------------------------------------------------------------------


def load_prompt_response_jsonl(path: Union[str, os.PathLike], tokenizer_encode: Callable[[str], Sequence[int]],
                               max_len: int, prompt_key: str = "prompt",
                               response_key: str = "response") -> list[dict[str, Any]]:
  """Read SFT pairs: one JSON object per line with string fields `prompt_key` and `response_key`.

  Blank lines are skipped. Each example is {"prompt": int32 [P], "response": int32 [R], "example_id": int (0-based
  index among the examples), "line": int (1-based line number)}.

  Args:
    path: the .jsonl file.
    tokenizer_encode: text -> token ids.
    max_len: the largest allowed P + R.
    prompt_key: field holding the prompt text.
    response_key: field holding the response text.

  Raises:
    FileNotFoundError: the file does not exist.
    ValueError: naming the file and line, for a line that is not a JSON object, lacks a field, has a non-string
      field, an empty response, or P + R > max_len; and for a file without any example.
  """
  path = os.fspath(path)
  if max_len < 2:
    raise ValueError(f"max_len must be >= 2, got {max_len}")
  examples = []
  with open(path, "r", encoding="utf-8") as f:
    for lineno, line in enumerate(f, start=1):
      if not line.strip():
        continue
      where = f"{path}:{lineno}"
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
      if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
      for key in (prompt_key, response_key):
        if key not in obj:
          raise ValueError(f"{where}: missing field {key!r} (fields present: {sorted(obj)})")
        if not isinstance(obj[key], str):
          raise ValueError(f"{where}: field {key!r} must be a string, got {type(obj[key]).__name__}")
      prompt = np.asarray(list(tokenizer_encode(obj[prompt_key])), np.int32)
      response = np.asarray(list(tokenizer_encode(obj[response_key])), np.int32)
      if response.size == 0:
        raise ValueError(f"{where}: field {response_key!r} encodes to no tokens")
      total = prompt.size + response.size
      if total > max_len:
        raise ValueError(f"{where}: prompt + response is {total} tokens ({prompt.size} + {response.size}), "
                         f"longer than max_len = {max_len}")
      examples.append({"prompt": prompt, "response": response, "example_id": len(examples), "line": lineno})
  if not examples:
    raise ValueError(f"{path}: no examples (the file is empty or blank)")
  return examples
