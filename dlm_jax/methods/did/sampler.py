"""DID's decoder ("did"): tau-leaping insertions from [BOS] (spec/did.md, "Sampler").

Time grid t_i = 1 - i / T, i = 0..T-1. At step i every open gap r of [BOS] + x_t independently draws one outcome:
"insert v after token r" with weight kappa s[r, v] or "no insertion" with weight max(0, 1 - kappa sum_v s[r, v]),
normalised by the total, with kappa = 1 / (T - i) (`kappa_last` on the last step). All rows act at once, so a step
inserts at most one token per gap. Shapes are static: a buffer of `capacity + 1` slots (BOS included) plus a length
per sample; insertions that do not fit are dropped (left to right, so every existing token is kept) and counted.

Categorical draws use Gumbel-max on the log-weights in float64 when `jax_enable_x64` is on. With x64 off they fall
back to float32, whose uniforms cap the Gumbel noise near 15.9 (about 36 in float64) and slightly sharpen rare
outcomes (arXiv 2409.02908); enable x64 (`jax.config.update("jax_enable_x64", True)`) for evaluation runs.

Two implementations draw from the same distribution:
- the reference (`did_sample`, sample.reference=True): every step builds the [B, R, V] scores and draws one
  categorical over V + 1 outcomes per row; its cache keeps [B, R, V] scores;
- the fast path (`fast_did_sample`, the default): a row's outcome is "insert" with probability
  min(1, kappa * mass_r), mass_r = sum_v s[r, v] (what the count / seqnorm head says per row, no V-wide work), and
  the inserted token follows s[r, .] / mass_r; so each open row first draws "insert or not" (float64 Bernoulli) and
  only the rows that insert get the output head and a float64 categorical over V (a two-stage inverse CDF,
  `categorical_inverse_cdf`; gathered up to a static budget,
  in further chunks when more rows insert: exact). Its cache holds the trunk's hidden states [B, R, d] and the row
  masses, and the trunk runs only for the samples that need it. It also takes infilling: insertions allowed only
  in marked gaps (`GapLayout.open_after`); a token inserted in an open gap leaves both gaps around it open.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

import flax.struct

from dlm_jax.config import ConfigError
from dlm_jax.sampling import sparse
from dlm_jax.sampling.common import categorical_inverse_cdf
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
                 kappa_last: Array, num_steps: Array, use_cache: bool, bos_id: int, stop: Array | None = None):
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
  stop = num_steps if stop is None else stop  # stop < num_steps: only the first steps (benchmarks)
  tok, lens, nfe, dropped, _, _, _ = jax.lax.fori_loop(jnp.int32(0), stop, body, init)
  return tok, lens, nfe, dropped


def did_sample(score_fn: ScoreFn, key: Array, batch_size: int, num_steps: int, capacity: int, bos_id: int,
               prompt: Array | None = None, prompt_len: Array | None = None, kappa_last: float = 1.0,
               use_cache: bool = False, pad_id: int = -1, steps_run: int | None = None
               ) -> tuple[Array, Array, Array, Array]:
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
    steps_run: run only the first steps_run steps of the num_steps grid (timing a long run in part);
      None runs them all.

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
                                         use_cache, bos_id,
                                         None if steps_run is None else jnp.asarray(steps_run, jnp.int32))
  n_out = lens - 1
  out = jnp.where(jnp.arange(capacity)[None, :] < n_out[:, None], tok[:, 1:], pad_id)
  return out, n_out, nfe, dropped


# -- the fast path: "insert or not" from the row mass, the token only where inserting -----------
@flax.struct.dataclass
class GapLayout:
  """Where the insertion decoder may insert, per row (prompts and infilling).

  Attributes:
    tokens: [B, C+1] int32, BOS then the given tokens (anything past `lengths`).
    lengths: [B] int32 given tokens plus BOS.
    open_after: [B, C+1] int32, the span id of the gap right after token r (> 0: open to
      insertions; 0: closed). Tokens inserted in span k carry k, so the gaps around them stay open.
  """
  tokens: Array
  lengths: Array
  open_after: Array


def gap_layout(rows: list[tuple[list[int], list[int]]], capacity: int, bos_id: int) -> GapLayout:
  """A host `GapLayout` from per-row (given token ids, open gaps).

  Args:
    rows: per row (ids without BOS, span ids (or bools) of its len(ids) + 1 gaps: the gap right
      after BOS, then the gap after each id; 0/False = closed).
    capacity: tokens after BOS the buffer holds (given tokens included).
    bos_id: BOS id.
  """
  b, r = len(rows), capacity + 1
  tokens = np.full((b, r), bos_id, np.int32)
  open_after = np.zeros((b, r), np.int32)
  lengths = np.zeros((b,), np.int32)
  for i, (ids, opened) in enumerate(rows):
    if len(ids) >= r:
      raise ValueError(f"row {i}: {len(ids)} given tokens do not leave room for an insertion within "
                       f"sample.capacity={capacity}.")
    if len(opened) != len(ids) + 1:
      raise ValueError(f"row {i}: {len(opened)} open flags for {len(ids)} tokens (need one per gap, "
                       f"{len(ids) + 1}).")
    tokens[i, 1:1 + len(ids)] = ids
    open_after[i, :len(ids) + 1] = opened
    lengths[i] = len(ids) + 1
  return GapLayout(tokens=tokens, lengths=lengths, open_after=open_after)


def _carry_spans(open_after: Array, inserted: Array, lengths: Array, insert: Array
                 ) -> tuple[Array, Array]:
  """Span ids and inserted flags after `apply_insertions` (the same index arithmetic applied to
  them): moved tokens keep theirs; a token inserted after row r is inserted, in r's span."""
  spans, _, _ = apply_insertions(open_after, lengths, insert, open_after, pad_value=0)
  flags, _, _ = apply_insertions(inserted.astype(jnp.int32), lengths, insert,
                                 jnp.ones_like(open_after), pad_value=0)
  return spans, flags.astype(bool)


def fast_did_sample(features_fn: Callable, token_fn: Callable, key: Array, layout: GapLayout,
                    num_steps: int, kappa_last: float = 1.0, use_cache: bool = False,
                    pad_id: int = -1, bos_id: int = 0, budget: int | None = None
                    ) -> tuple[Array, Array, Array, Array]:
  """Tau-leaping insertions at the cost of the trunk (same distribution as `did_sample`).

  Args:
    features_fn: (tokens [B, R], lengths [B], t [B], open_rows [B, R]) -> (h [B, R, d],
      log_mass [B, R]) (`DID.split_score_fn`).
    token_fn: h [K, d] -> token log-probabilities [K, V] (special ids -inf).
    key: PRNG key; step i draws "insert or not" from fold_in(fold_in(key, i), 0) and the tokens
      from fold_in(fold_in(fold_in(key, i), 1), chunk).
    layout: start state (BOS + given tokens) and the open gaps.
    num_steps: T >= 1.
    kappa_last: kappa of the last step.
    use_cache: reuse a sample's hidden states and masses while its length is unchanged (models
      without time input only).
    pad_id: value of output slots >= lengths.
    bos_id: BOS id (padding inside the buffer).
    budget: inserting rows per head chunk (default: 1/8 of the rows, at least 8).

  Returns:
    (tokens [B, R - 1] (BOS dropped), lengths [B] after BOS, nfe [B], dropped [B],
     span [B, R - 1]: for each output token the span it was inserted in, 0 for given tokens).
  """
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1; got {num_steps}.")
  tokens = jnp.asarray(layout.tokens, jnp.int32)
  lengths = jnp.asarray(layout.lengths, jnp.int32)
  open_after = jnp.asarray(layout.open_after).astype(jnp.int32)
  b, r = tokens.shape
  n = b * r
  if budget is None:
    budget = max(8, -(-n // 64) * 8)
  dt = draw_dtype()
  t0 = jnp.ones((b,), jnp.float32)
  h0, m0 = jax.eval_shape(features_fn, tokens, lengths, t0, open_after > 0)
  row = jnp.arange(r, dtype=jnp.int32)[None, :]

  def body(i, state):
    tok, lens, opn, ins, nfe, dropped, h, log_mass, cache_ok = state
    t = jnp.full((b,), 1.0 - i.astype(jnp.float32) / num_steps, jnp.float32)
    kappa = jnp.where(i == num_steps - 1, kappa_last, 1.0 / (num_steps - i).astype(jnp.float32))
    need = ~cache_ok if use_cache else jnp.ones((b,), bool)
    h, log_mass = sparse.refresh_rows(
        lambda inp: tuple(x.astype(y.dtype) for x, y in zip(features_fn(*inp), (h0, m0))),
        (tok, lens, t, opn > 0), need, (h, log_mass))
    nfe = nfe + need.astype(jnp.int32)
    key_i = jax.random.fold_in(key, i)
    p_insert = jnp.minimum(1.0, kappa.astype(dt) * jnp.exp(log_mass.astype(dt)))
    u = jax.random.uniform(jax.random.fold_in(key_i, 0), (b, r), dt)
    insert = (opn > 0) & (row < lens[:, None]) & (u < p_insert)
    h_flat = h.reshape(n, -1)
    tok_key = jax.random.fold_in(key_i, 1)

    def draw(c, idx, ok, ids):
      lp = token_fn(jnp.take(h_flat, jnp.minimum(idx, n - 1), axis=0))
      v = categorical_inverse_cdf(jax.random.fold_in(tok_key, c), lp)
      return ids.at[jnp.where(ok, idx, n)].set(v, mode="drop")

    ids = sparse.for_selected_rows(insert.reshape(-1), budget, draw,
                                   jnp.zeros((n,), jnp.int32)).reshape(b, r)
    new_tok, new_lens, drop = apply_insertions(tok, lens, insert, ids, bos_id)
    new_open, new_ins = _carry_spans(opn, ins, lens, insert)
    return (new_tok, new_lens, new_open, new_ins, nfe, dropped + drop, h, log_mass,
            new_lens == lens)

  zeros = jnp.zeros((b,), jnp.int32)
  init = (tokens, lengths, open_after, jnp.zeros((b, r), bool), zeros, zeros,
          jnp.zeros(h0.shape, h0.dtype), jnp.zeros(m0.shape, m0.dtype), jnp.zeros((b,), bool))
  tok, lens, opn, ins, nfe, dropped, _, _, _ = jax.lax.fori_loop(0, int(num_steps), body, init)
  n_out = lens - 1
  cap = r - 1
  live = jnp.arange(cap)[None, :] < n_out[:, None]
  out = jnp.where(live, tok[:, 1:], pad_id)
  span = jnp.where(live & ins[:, 1:], opn[:, 1:], 0)
  return out, n_out, nfe, dropped, span


# -- the "did" decoder ---------------------------------------------------------------------------
def sample_insertion(method, params, key, sample_cfg, prompt=None, layout=None) -> dict:
  """Tau-leaping insertions from [BOS] (+ prompt) in sample.num_steps steps, up to sample.capacity tokens.

  `method` is a DID method (score_fn, capacity rules, special ids). `layout` (a `GapLayout`, the default path only)
  gives per-row start tokens and the gaps open to insertions (infilling). Returns tokens [B, capacity] (given +
  generated, pad_id past the length), lengths [B] (generated tokens), total_lengths [B] (given tokens included),
  nfe [B], dropped [B] (insertions past capacity), prompt_len, gen_len.
  """
  s = sample_cfg
  reference = bool(s.get("reference", False))
  num_steps = int(s.num_steps)
  use_cache = method.variant == "fixed"  # no time input: scores change only with the length
  if layout is not None:
    if reference:
      raise ValueError("sample.reference=True runs the original 'did' loop, which takes one prefix prompt; "
                       "infilling runs on the default path (reference=False).")
    layout = jax.tree.map(np.asarray, layout)
    cap = layout.tokens.shape[1] - 1
    if cap + 1 > method.model_cfg.max_len:
      raise ValueError(f"sample.capacity={cap} (+1 for BOS) is longer than model.max_len={method.model_cfg.max_len}.")
    given = layout.lengths - 1
    run = cached(method, ("did_fast", num_steps, cap), lambda: jax.jit(
        lambda params, key, layout: _fast_run(method, params, key, layout, num_steps, cap, use_cache)))
    tokens, n_out, nfe, dropped, span = run(params, key, jax.tree.map(jnp.asarray, layout))
    return dict(tokens=tokens, lengths=n_out - given, total_lengths=n_out, nfe=nfe, dropped=dropped,
                span=span, prompt_len=0, gen_len=cap)
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

  if not reference:
    rows = [(list(row), [0] * plen + [1]) for row in p_ids.tolist()]
    layout = gap_layout(rows, cap, method.ids.bos)
    run = cached(method, ("did_fast", num_steps, cap), lambda: jax.jit(
        lambda params, key, layout: _fast_run(method, params, key, layout, num_steps, cap, use_cache)))
    tokens, n_out, nfe, dropped, _ = run(params, key, jax.tree.map(jnp.asarray, layout))
    return dict(tokens=tokens, lengths=n_out - plen, total_lengths=n_out, nfe=nfe, dropped=dropped,
                prompt_len=plen, gen_len=cap - plen)

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


def _fast_run(method, params, key, layout, num_steps, cap, use_cache):
  features, token_log_probs = method.split_score_fn(params, cap)
  return fast_did_sample(features, token_log_probs, key, layout, num_steps, use_cache=use_cache,
                         pad_id=method.ids.pad, bos_id=method.ids.bos)


def _check(sample_cfg) -> None:
  if sample_cfg.capacity < 0:
    raise ConfigError(f"sample.capacity={sample_cfg.capacity} must be >= 0 (0 = data.seq_len).")


register(Decoder("did", "insertion", sample_insertion, check=_check,
                 options=("num_steps", "capacity", "gen_len", "reference")))
