"""ARITH-CHAIN (spec/trims.md, "Toy reproduction on CPU"): chained +/* arithmetic mod 100 with an
optional swapped rendering per step; exact answers and an exact "valid trace" check. Host-side
numpy, deterministic from its seed. Registered as the data source 'arith'.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np

from dlm_jax.data.base import DataSource
from dlm_jax.data.tasks import sft
from dlm_jax.data.tasks.common import TaskIterator, TaskTokenizer, prompt_response_rows, seed_of
from dlm_jax.config import ConfigError

Seed = Union[int, Sequence[int], np.random.SeedSequence]

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


def arith_tokenizer() -> TaskTokenizer:
  return TaskTokenizer("arith", ARITH_SYMBOLS, bos=BOS, eos=EOS, pad=PAD, mask=MASK)


def _iterator(config: Any, split: str, batch_size: int, num_batches: Optional[int]):
  d = config.data
  task = ArithChain()
  need = task.prompt_len + task.response_len
  if d.seq_len != need:
    raise ConfigError(f"config.data.seq_len must be {need} for ARITH-CHAIN "
                      f"(prompt {task.prompt_len} + response {task.response_len}).")
  if d.path and split == "train":
    return sft.scored_set_iterator(config, batch_size, shuffle=True, num_batches=num_batches)

  def make(i):
    return prompt_response_rows(task.generate(seed_of(config.seed, split, i), batch_size),
                                i * batch_size)
  return TaskIterator(make, batch_size, num_batches)


def parse_arith_spec(spec: str) -> dict[str, int]:
  """'arith:seed=11,n=1000[,kmax=3,swap=1]' -> dict; errors name the bad part."""
  body = spec[len("arith:"):] if spec.startswith("arith:") else spec
  out = dict(seed=11, n=1000, kmax=3, swap=1)
  for part in filter(None, body.split(",")):
    if "=" not in part:
      raise sft.SFTDataError(f"--data={spec!r}: expected key=value in {part!r} (keys: {sorted(out)}).")
    k, v = part.split("=", 1)
    if k not in out:
      raise sft.SFTDataError(f"--data={spec!r}: unknown key {k!r} (keys: {sorted(out)}).")
    try:
      out[k] = int(v)
    except ValueError:
      raise sft.SFTDataError(f"--data={spec!r}: {k} must be an integer, got {v!r}.") from None
  if out["n"] < 1:
    raise sft.SFTDataError(f"--data={spec!r}: n must be >= 1.")
  return out


def arith_set(spec: str) -> sft.SFTSet:
  """A generated ARITH-CHAIN set: `generate(seed, n)` (example i depends only on (seed, i))."""
  a = parse_arith_spec(spec)
  task = ArithChain(kmax=a["kmax"], swap=bool(a["swap"]))
  ex = task.generate(a["seed"], a["n"])
  resp_len = (ex["response"] != EOS).sum(1).astype(np.int32)
  return sft.SFTSet(prompt=ex["prompt"], response=ex["response"],
                example_id=np.arange(a["n"], dtype=np.int32), response_len=resp_len,
                extra=dict(answer=ex["answer"], num_steps=ex["num_steps"]), spec=spec)


SOURCE = DataSource(
    "arith", make_tokenizer=lambda config: arith_tokenizer(),
    train_iterator=lambda config, tok: _iterator(config, "train", config.train.global_batch_size,
                                                 None),
    eval_iterator=lambda config, tok, bs: _iterator(config, "validation", bs,
                                                    config.train.eval_batches))
