"""DID's decoder ("did"): tau-leaping insertions from [BOS] (spec/did.md, "Sampler").

Time grid t_i = 1 - i / T, i = 0..T-1. At step i every open gap r of [BOS] + x_t independently draws one outcome:
"insert v after token r" with weight kappa s[r, v] or "no insertion" with weight max(0, 1 - kappa sum_v s[r, v]),
normalised by the total, with kappa = 1 / (T - i) (`kappa_last` on the last step). All rows act at once, so a step
inserts at most one token per gap. Shapes are static: a buffer of `capacity + 1` slots (BOS included) plus a length
per sample; insertions that do not fit are dropped (left to right, so every existing token is kept) and counted.

Categorical draws use Gumbel-max on the log-weights in float64 when `jax_enable_x64` is on. With x64 off they fall
back to float32, whose uniforms cap the Gumbel noise near 15.9 (about 36 in float64) and slightly sharpen rare
outcomes (arXiv 2409.02908); enable x64 (`jax.config.update("jax_enable_x64", True)`) for evaluation runs.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dlm_jax.config import ConfigError
from dlm_jax.sampling.decoders import Decoder, cached, register

Array = jax.Array
ScoreFn = Callable[[Array, Array, Array], Array]


def draw_dtype() -> jnp.dtype:
  """Float dtype of the categorical draws: float64 when jax_enable_x64 is on, float32 otherwise."""
  return jnp.dtype(jax.dtypes.canonicalize_dtype(jnp.float64))


def apply_insertions(tokens: Array, lengths: Array, insert: Array, insert_ids: Array,
                     pad_value: int = 0) -> tuple[Array, Array, Array]:
  """Inserts token insert_ids[b, r] right after tokens[b, r] wherever insert[b, r], all rows at once.

  The new index of old token r is r + (number of accepted insertions in rows < r) (exclusive cumsum); the token
  inserted after r goes to that index + 1. Only the first R - lengths[b] insertions (in row order) fit; the rest are
  dropped, so existing tokens are never lost.

  Args:
    tokens: int32 [B, R] buffer; slots >= lengths[b] are padding.
    lengths: int32 [B] current lengths (<= R).
    insert: bool [B, R] insertion flags; rows >= lengths[b] are ignored.
    insert_ids: int32 [B, R] token to insert after row r.
    pad_value: value written into the new buffer's slots >= new lengths.

  Returns:
    tokens: int32 [B, R] new buffer.
    lengths: int32 [B] new lengths.
    dropped: int32 [B] insertions that did not fit.
  """
  b, r = tokens.shape
  pos = jnp.arange(r)[None, :]
  insert = insert & (pos < lengths[:, None])
  room = r - lengths
  accepted = insert & (jnp.cumsum(insert, axis=1) <= room[:, None])
  dropped = jnp.sum(insert, axis=1) - jnp.sum(accepted, axis=1)
  acc_i = accepted.astype(jnp.int32)
  shift = jnp.cumsum(acc_i, axis=1) - acc_i  # exclusive cumsum
  old_pos = jnp.where(pos < lengths[:, None], pos + shift, r)  # index r is out of range: the scatter drops it
  new_pos = jnp.where(accepted, pos + shift + 1, r)
  rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, r))
  out = jnp.full((b, r), pad_value, tokens.dtype)
  out = out.at[rows, old_pos].set(tokens, mode="drop")
  out = out.at[rows, new_pos].set(insert_ids.astype(tokens.dtype), mode="drop")
  return out, (lengths + jnp.sum(acc_i, axis=1)).astype(jnp.int32), dropped.astype(jnp.int32)


def _draw_insertions(key: Array, log_scores: Array, kappa: Array, lengths: Array,
                     first_open: Array) -> tuple[Array, Array]:
  """One tau-leaping draw per row: returns (insert bool [B, R], ids int32 [B, R])."""
  dt = draw_dtype()
  ls = log_scores.astype(dt)
  b, r, v = ls.shape
  log_kappa = jnp.log(kappa.astype(dt))
  log_ins = log_kappa + ls  # [B, R, V]
  mass = kappa.astype(dt) * jnp.sum(jnp.exp(ls), axis=-1)  # [B, R]
  stay = jnp.maximum(0.0, 1.0 - mass)
  log_stay = jnp.where(stay > 0, jnp.log(jnp.where(stay > 0, stay, 1.0)), -jnp.inf)
  logits = jnp.concatenate([log_ins, log_stay[..., None]], axis=-1)  # [B, R, V+1]
  gumbel = jax.random.gumbel(key, logits.shape, dt)
  choice = jnp.argmax(logits + gumbel, axis=-1)
  row = jnp.arange(r)[None, :]
  open_row = (row >= first_open[:, None]) & (row < lengths[:, None])
  return open_row & (choice < v), jnp.minimum(choice, v - 1).astype(jnp.int32)


@partial(jax.jit, static_argnames=("score_fn", "use_cache", "bos_id"))
def _sample_loop(score_fn: ScoreFn, key: Array, tokens: Array, lengths: Array, first_open: Array,
                 kappa_last: Array, num_steps: Array, use_cache: bool, bos_id: int):
  """The whole tau-leaping loop (lax.fori_loop, traced step count) under one jit; see `did_sample`."""
  b, r = tokens.shape

  def scores_of(tok, lens, t):
    return jnp.asarray(score_fn(tok, lens, t), jnp.float32)

  t0 = jnp.ones((b,), jnp.float32)
  cache0 = jax.eval_shape(scores_of, tokens, lengths, t0)
  if cache0.shape[:2] != (b, r):
    raise ValueError(f"score_fn must return [B, capacity + 1, V] = [{b}, {r}, V]; got {cache0.shape}.")

  def body(i, state):
    tok, lens, nfe, dropped, key, cache, cache_ok = state
    t = jnp.full((b,), 1.0 - i.astype(jnp.float32) / num_steps.astype(jnp.float32), jnp.float32)
    kappa = jnp.where(i == num_steps - 1, kappa_last, 1.0 / (num_steps - i).astype(jnp.float32))
    if use_cache:
      need = ~cache_ok
      fresh = jax.lax.cond(jnp.any(need), lambda: scores_of(tok, lens, t), lambda: cache)
      scores = jnp.where(need[:, None, None], fresh, cache)
      nfe = nfe + need.astype(jnp.int32)
    else:
      scores = scores_of(tok, lens, t)
      nfe = nfe + 1
    key, sub = jax.random.split(key)
    insert, ids = _draw_insertions(sub, scores, kappa, lens, first_open)
    new_tok, new_lens, drop = apply_insertions(tok, lens, insert, ids, bos_id)
    return new_tok, new_lens, nfe, dropped + drop, key, scores, new_lens == lens

  zeros = jnp.zeros((b,), jnp.int32)
  init = (tokens, lengths, zeros, zeros, key, jnp.zeros(cache0.shape, jnp.float32), jnp.zeros((b,), bool))
  tok, lens, nfe, dropped, _, _, _ = jax.lax.fori_loop(jnp.int32(0), num_steps, body, init)
  return tok, lens, nfe, dropped


def did_sample(score_fn: ScoreFn, key: Array, batch_size: int, num_steps: int, capacity: int, bos_id: int,
               prompt: Array | None = None, prompt_len: Array | None = None, kappa_last: float = 1.0,
               use_cache: bool = False, pad_id: int = -1) -> tuple[Array, Array, Array, Array]:
  """Generates sequences by tau-leaping insertions from [BOS] (+ prompt) in `num_steps` steps.

  Args:
    score_fn: (tokens int32 [B, capacity+1], lengths int32 [B] incl. BOS, t float32 [B]) -> log-scores
      [B, capacity+1, V], row r = gap right after input token r; rows >= lengths are ignored. Input slots
      >= lengths hold `bos_id` and must be masked by the model. Hashable (it is a static jit argument; pass
      the same function object to avoid recompiles).
    key: PRNG key.
    batch_size: B.
    num_steps: T >= 1.
    capacity: maximum number of tokens after BOS (prompt included).
    bos_id: BOS token id.
    prompt: optional int [P] or [B, P] prefix; gaps strictly inside [BOS] + prompt get no insertions.
    prompt_len: optional int [B] prompt lengths (default P).
    kappa_last: kappa of the last step (1.0; the reference code uses 1.001).
    use_cache: reuse a sample's scores while its length is unchanged. Only valid for models without time input
      (the fixed-length seqnorm model); the forward runs when any sample needs it, NFE counts per sample.
    pad_id: value of output slots >= lengths.

  Returns:
    tokens: int32 [B, capacity] (BOS dropped, prompt kept as prefix, padded with `pad_id`).
    lengths: int32 [B] number of tokens after BOS (prompt included).
    nfe: int32 [B] score_fn evaluations per sample.
    dropped: int32 [B] insertions dropped because the buffer was full.
  """
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1; got {num_steps}.")
  if capacity < 1:
    raise ValueError(f"capacity must be >= 1; got {capacity}.")
  b, r = batch_size, capacity + 1
  tokens = jnp.full((b, r), bos_id, jnp.int32)
  first_open = jnp.zeros((b,), jnp.int32)
  if prompt is not None:
    prompt = jnp.asarray(prompt, jnp.int32)
    if prompt.ndim == 1:
      prompt = jnp.broadcast_to(prompt[None], (b, prompt.shape[0]))
    p = prompt.shape[1]
    if prompt.shape[0] != b or p > capacity:
      raise ValueError(f"prompt must be [P] or [batch_size, P] with P <= capacity = {capacity}; got {prompt.shape}.")
    plen = jnp.full((b,), p, jnp.int32) if prompt_len is None else jnp.asarray(prompt_len, jnp.int32)
    body = jnp.where(jnp.arange(p)[None, :] < plen[:, None], prompt, bos_id)
    tokens = tokens.at[:, 1:1 + p].set(body)
    first_open = plen
  lengths = 1 + first_open
  tok, lens, nfe, dropped = _sample_loop(score_fn, key, tokens, lengths, first_open,
                                         jnp.asarray(kappa_last, jnp.float32), jnp.asarray(num_steps, jnp.int32),
                                         use_cache, bos_id)
  n_out = lens - 1
  out = jnp.where(jnp.arange(capacity)[None, :] < n_out[:, None], tok[:, 1:], pad_id)
  return out, n_out, nfe, dropped


# -- the "did" decoder ---------------------------------------------------------------------------
def sample_insertion(method, params, key, sample_cfg, prompt=None) -> dict:
  """Tau-leaping insertions from [BOS] (+ prompt) in sample.num_steps steps, up to sample.capacity tokens.

  `method` is a DID method (score_fn, capacity rules, special ids). Returns tokens [B, capacity]
  (prompt + generated, pad_id past the length), lengths [B] (generated tokens), total_lengths [B]
  (prompt included), nfe [B], dropped [B] (insertions past capacity), prompt_len, gen_len.
  """
  s = sample_cfg
  b = s.batch_size
  p_ids = np.zeros((b, 0), np.int32)
  if prompt is not None:
    p_ids = np.asarray(prompt, np.int32)
    if p_ids.ndim == 1:
      p_ids = np.tile(p_ids[None], (b, 1))
    if p_ids.shape[1] and np.all(p_ids[:, 0] == method.ids.bos):
      p_ids = p_ids[:, 1:]  # the sampler adds BOS itself
    if np.isin(p_ids, method.disallowed).any():
      raise ValueError("The prompt contains special ids (BOS/PAD/MASK) after its first token.")
  plen = p_ids.shape[1]
  cap = method._capacity(s, plen)  # pylint: disable=protected-access
  num_steps = int(s.num_steps)
  use_cache = method.variant == "fixed"  # no time input: scores change only with the length

  def build():
    def run(params, key, prompt):
      fn = method.score_fn(params, cap, plen)
      return did_sample(fn, key, prompt.shape[0], num_steps, cap, method.ids.bos,
                        prompt=prompt if plen else None, use_cache=use_cache, pad_id=method.ids.pad)
    return jax.jit(run)

  run = cached(method, ("did", num_steps, cap, plen), build)
  tokens, n_out, nfe, dropped = run(params, key, jnp.asarray(p_ids))
  return dict(tokens=tokens, lengths=n_out - plen, total_lengths=n_out, nfe=nfe, dropped=dropped,
              prompt_len=plen, gen_len=cap - plen)


def _check(sample_cfg) -> None:
  if sample_cfg.capacity < 0:
    raise ConfigError(f"sample.capacity={sample_cfg.capacity} must be >= 0 (0 = data.seq_len).")


register(Decoder("did", "insertion", sample_insertion, check=_check,
                 options=("num_steps", "capacity", "gen_len")))
