"""DID (Deletion-Insertion Diffusion): pure maths of the forward process, targets, losses and heads.

Spec: `spec/did.md` (arXiv 2603.23507). Conventions used throughout this module:

- `x0` is the clean sequence WITHOUT its BOS, `x0 [B, N]` int32 with lengths `x0_len [B]` (n_b <= N).
- `xt` is the noised sequence WITHOUT BOS, `xt [B, M]` int32 with lengths `xt_len [B]` (m_b <= M, m_b <= n_b),
  and it must be a subsequence of `x0` (see `check_subsequence` / `validate_inputs`).
- Gap g in {0, ..., M} means "after the first g tokens of xt"; the model input is [BOS] + xt and its output
  row r is gap g = r. Rows g > m_b and x0 slots k >= n_b are invalid and hold exact zeros (log: -inf).
- Token ids are >= 0; padding is described by the length arrays only, never by a token id.

Everything is float32 and built from `jax.numpy` / `jax.lax`; the subsequence-counting dynamic program is
two `lax.scan`s over the x0 axis, vectorised over gaps and batch (O(n m) work, no V factor).
"""

from __future__ import annotations

import itertools
from functools import partial
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
_NEG_INF = -jnp.inf
NORMALIZATIONS = ("token", "batch", "sum")


# ---------------------------------------------------------------------------------------------------------------------
# Schedule and forward (deletion) process.
# ---------------------------------------------------------------------------------------------------------------------
def _int32(*arrays) -> tuple[Array, ...]:
  """The token and length inputs of every public function, as int32 arrays."""
  return tuple(jnp.asarray(a, jnp.int32) for a in arrays)


def survival(t: Array | float, eps: float = 0.0) -> Array:
  """Survival probability alpha(t) = 1 - (1 - eps) t of a non-BOS token (same shape as `t`)."""
  return 1.0 - (1.0 - eps) * jnp.asarray(t, jnp.float32)


def loss_weight(t: Array | float) -> Array:
  """DISE/DICE time weight w(t) = sigma(t) / expm1(sigma_bar(t)) = 1 / t (any eps); same shape as `t`."""
  return 1.0 / jnp.asarray(t, jnp.float32)


def _is_single_key(key: Array) -> bool:
  """True for one PRNG key (typed key of shape [] or raw uint32 [2]), False for per-example keys."""
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    return key.ndim == 0
  return key.ndim == 1


@jax.jit
def forward_delete(key: Array, x0: Array, x0_len: Array, t: Array | float, eps: float = 0.0,
                   pad_value: int = 0) -> tuple[Array, Array]:
  """Samples x_t ~ q_t(. | x0): each valid token survives independently with probability alpha(t).

  Kept tokens are compacted to the left in their original order (position = cumsum(keep) - 1, scatter).

  Args:
    key: one PRNG key (typed [] or raw uint32 [2]) or per-example keys ([B] typed or [B, 2] raw).
    x0: int32 [B, N] clean tokens without BOS.
    x0_len: int32 [B] valid lengths n_b.
    t: float [] or [B] diffusion times in [0, 1].
    eps: schedule floor, alpha(1) = eps.
    pad_value: token written into slots >= xt_len.

  Returns:
    xt: int32 [B, N] kept tokens, left-aligned, padded with `pad_value`.
    xt_len: int32 [B] number of kept tokens m_b.
  """
  x0, x0_len = _int32(x0, x0_len)
  b, n = x0.shape
  if _is_single_key(key):
    u = jax.random.uniform(key, (b, n), jnp.float32)
  else:
    u = jax.vmap(lambda k: jax.random.uniform(k, (n,), jnp.float32))(key)
  alpha = jnp.broadcast_to(survival(t, eps), (b,))
  valid = jnp.arange(n)[None, :] < x0_len[:, None]
  keep = valid & (u < alpha[:, None])
  pos = jnp.cumsum(keep, axis=1) - 1
  pos = jnp.where(keep, pos, n)  # n is out of range: dropped by the scatter
  rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, n))
  xt = jnp.full((b, n), pad_value, jnp.int32).at[rows, pos].set(x0, mode="drop")
  return xt, jnp.sum(keep, axis=1).astype(jnp.int32)


# ---------------------------------------------------------------------------------------------------------------------
# Input checks.
# ---------------------------------------------------------------------------------------------------------------------


@jax.jit
def check_subsequence(x0: Array, x0_len: Array, xt: Array, xt_len: Array) -> Array:
  """Jittable greedy test that xt[b, :m_b] is a subsequence of x0[b, :n_b] with valid lengths.

  Args:
    x0: int [B, N]; x0_len: int [B]; xt: int [B, M]; xt_len: int [B].

  Returns:
    bool [B]: True where 0 <= m_b <= n_b <= N, m_b <= M and xt is a subsequence of x0.
  """
  x0, xt, x0_len, xt_len = _int32(x0, xt, x0_len, xt_len)
  b, n = x0.shape
  m = xt.shape[1]

  xt_pad = jnp.concatenate([xt, jnp.zeros((b, 1), jnp.int32)], axis=1)  # gather target at j <= m

  def step(j, inputs):
    k, col = inputs
    target = jnp.take_along_axis(xt_pad, jnp.clip(j, 0, m)[:, None], axis=1)[:, 0]
    hit = (k < x0_len) & (j < xt_len) & (col == target)
    return j + hit.astype(jnp.int32), None

  j, _ = jax.lax.scan(step, jnp.zeros((b,), jnp.int32), (jnp.arange(n), x0.T))
  ok_len = (x0_len >= 0) & (x0_len <= n) & (xt_len >= 0) & (xt_len <= m) & (xt_len <= x0_len)
  return ok_len & (j == xt_len)


def validate_inputs(x0, x0_len, xt, xt_len) -> None:
  """Host-side check of DP inputs; raises ValueError naming the first problem found.

  Args:
    x0: int [B, N]; x0_len: int [B]; xt: int [B, M]; xt_len: int [B] (numpy or jax arrays).

  Raises:
    ValueError: wrong ranks or batch sizes, lengths out of range, xt_len > x0_len, or xt not a subsequence of x0.
  """
  x0, xt = np.asarray(x0), np.asarray(xt)
  x0_len, xt_len = np.asarray(x0_len), np.asarray(xt_len)
  if x0.ndim != 2 or xt.ndim != 2:
    raise ValueError(f"x0 and xt must be [B, N] and [B, M] token arrays; got shapes {x0.shape} and {xt.shape}.")
  b, n = x0.shape
  m = xt.shape[1]
  if xt.shape[0] != b or x0_len.shape != (b,) or xt_len.shape != (b,):
    raise ValueError(f"batch sizes differ: x0 {x0.shape}, xt {xt.shape}, x0_len {x0_len.shape}, "
                     f"xt_len {xt_len.shape} (lengths must be [B]).")
  for name, lens, cap in (("x0_len", x0_len, n), ("xt_len", xt_len, m)):
    bad = np.nonzero((lens < 0) | (lens > cap))[0]
    if bad.size:
      raise ValueError(f"{name}[{bad[0]}] = {lens[bad[0]]} is out of range [0, {cap}].")
  bad = np.nonzero(xt_len > x0_len)[0]
  if bad.size:
    i = bad[0]
    raise ValueError(f"xt_len[{i}] = {xt_len[i]} > x0_len[{i}] = {x0_len[i]}: deletion cannot lengthen a sequence.")
  for i in range(b):
    it = iter(x0[i, :x0_len[i]].tolist())
    if not all(any(tok == c for c in it) for tok in xt[i, :xt_len[i]].tolist()):
      raise ValueError(f"example {i}: xt[:{xt_len[i]}] = {xt[i, :xt_len[i]].tolist()} is not a subsequence of "
                       f"x0[:{x0_len[i]}] = {x0[i, :x0_len[i]].tolist()}.")


# ---------------------------------------------------------------------------------------------------------------------
# Subsequence-counting dynamic program (log space).
# ---------------------------------------------------------------------------------------------------------------------


def _logsumexp(x: Array, axis: int) -> Array:
  """logsumexp that returns -inf (not NaN) when every entry is -inf or the axis is empty."""
  if x.shape[axis] == 0:
    axis = axis % x.ndim
    return jnp.full(x.shape[:axis] + x.shape[axis + 1:], _NEG_INF, x.dtype)
  mx = jnp.max(x, axis=axis, keepdims=True)
  mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
  return jnp.log(jnp.sum(jnp.exp(x - mx), axis=axis)) + jnp.squeeze(mx, axis)


@partial(jax.jit, static_argnames=("renormalize",))
def log_insertion_weights(x0: Array, x0_len: Array, xt: Array, xt_len: Array,
                          renormalize: bool = True) -> tuple[Array, Array]:
  """Posterior deletion weights W[k, g] = P[k, g] S[k+1, g] / N in log space.

  W[b, k, g] is the posterior probability that x0 slot k was deleted and lies in gap g of xt. It sums over g to
  P(slot k deleted | xt, x0) and over (k, g) to n_b - m_b.

  Args:
    x0: int [B, N] clean tokens (no BOS); x0_len: int [B].
    xt: int [B, M] noised tokens (no BOS), a subsequence of x0; xt_len: int [B].
    renormalize: divide by the per-slot count N_k (equal to N in exact arithmetic) instead of the global N;
      removes most float32 drift on long sequences.

  Returns:
    logN: float32 [B], log N(xt, x0) from the prefix table (-inf if xt is not a subsequence).
    logW: float32 [B, N, M+1], -inf at k >= n_b, g > m_b and wherever W = 0. Gradients are stopped.
  """
  x0, xt, x0_len, xt_len = _int32(x0, xt, x0_len, xt_len)
  b, n = x0.shape
  m = xt.shape[1]
  xt_valid = jnp.arange(m)[None, :] < xt_len[:, None]  # [B, M]
  k_valid = (jnp.arange(n)[None, :] < x0_len[:, None]).T  # [N, B]
  g_valid = jnp.arange(m + 1)[None, :] <= xt_len[:, None]  # [B, M+1]
  neg = jnp.float32(_NEG_INF)

  def eq_of(col, kv):  # [B], [B] -> [B, M]: x0[:, k] == xt[:, g] on valid pairs only.
    return (col[:, None] == xt) & xt_valid & kv[:, None]

  # Prefix: carry log P[a, :] [B, M+1]; emits log P[k, :] before consuming column k.
  def prefix_step(carry, inputs):
    col, kv = inputs
    eq = eq_of(col, kv)
    new_tail = jnp.logaddexp(carry[:, 1:], jnp.where(eq, carry[:, :-1], neg))
    new = jnp.concatenate([jnp.zeros((b, 1), jnp.float32), new_tail], axis=1)
    return new, carry

  p_init = jnp.concatenate([jnp.zeros((b, 1), jnp.float32), jnp.full((b, m), neg)], axis=1)
  p_final, pre = jax.lax.scan(prefix_step, p_init, (x0.T, k_valid))  # pre: [N, B, M+1]
  log_n = jnp.take_along_axis(p_final, xt_len[:, None], axis=1)[:, 0]  # [B]

  # Suffix: carry log S[k+1, :]; step k emits log W[k, :] (it needs pre[k] and S[k+1]).
  def suffix_step(carry, inputs):
    col, kv, pre_k = inputs
    eq = eq_of(col, kv)
    skip = pre_k + carry  # log P[k, g] S[k+1, g]
    if renormalize:
      use = jnp.where(eq, pre_k[:, :-1] + carry[:, 1:], neg)  # embeddings that use slot k
      log_nk = jnp.logaddexp(_logsumexp(skip, axis=1), _logsumexp(use, axis=1))
    else:
      log_nk = log_n
    ok = kv & jnp.isfinite(log_nk)
    logw = jnp.where(ok[:, None] & g_valid, skip - jnp.where(ok, log_nk, 0.0)[:, None], neg)
    new_head = jnp.logaddexp(carry[:, :-1], jnp.where(eq, carry[:, 1:], neg))
    new = jnp.concatenate([new_head, carry[:, -1:]], axis=1)
    return new, logw

  s_init = jnp.where(jnp.arange(m + 1)[None, :] >= xt_len[:, None], 0.0, neg).astype(jnp.float32)
  _, logw = jax.lax.scan(suffix_step, s_init, (x0.T, k_valid, pre), reverse=True)
  logw = jnp.transpose(logw, (1, 0, 2))  # [B, N, M+1]
  return jax.lax.stop_gradient(log_n), jax.lax.stop_gradient(logw)


@jax.jit
def log_count_tables(x0: Array, x0_len: Array, xt: Array, xt_len: Array) -> tuple[Array, Array]:
  """Full prefix and suffix tables in log space (debugging and tests; the loss never needs them whole).

  Args:
    x0: int [B, N]; x0_len: int [B]; xt: int [B, M]; xt_len: int [B].

  Returns:
    logP: float32 [B, N+1, M+1], logP[a, g] = log N(xt[:g], x0[:a]) (rows a > n_b repeat row n_b).
    logS: float32 [B, N+1, M+1], logS[a, g] = log N(xt[g:m], x0[a:n]) (rows a > n_b repeat row n_b).
  """
  x0, xt, x0_len, xt_len = _int32(x0, xt, x0_len, xt_len)
  b, n = x0.shape
  m = xt.shape[1]
  xt_valid = jnp.arange(m)[None, :] < xt_len[:, None]
  k_valid = (jnp.arange(n)[None, :] < x0_len[:, None]).T
  neg = jnp.float32(_NEG_INF)

  def prefix_step(carry, inputs):
    col, kv = inputs
    eq = (col[:, None] == xt) & xt_valid & kv[:, None]
    tail = jnp.logaddexp(carry[:, 1:], jnp.where(eq, carry[:, :-1], neg))
    new = jnp.concatenate([jnp.zeros((b, 1), jnp.float32), tail], axis=1)
    return new, new

  def suffix_step(carry, inputs):
    col, kv = inputs
    eq = (col[:, None] == xt) & xt_valid & kv[:, None]
    head = jnp.logaddexp(carry[:, :-1], jnp.where(eq, carry[:, 1:], neg))
    new = jnp.concatenate([head, carry[:, -1:]], axis=1)
    return new, new

  p_init = jnp.concatenate([jnp.zeros((b, 1), jnp.float32), jnp.full((b, m), neg)], axis=1)
  _, p_rows = jax.lax.scan(prefix_step, p_init, (x0.T, k_valid))
  s_init = jnp.where(jnp.arange(m + 1)[None, :] >= xt_len[:, None], 0.0, neg).astype(jnp.float32)
  _, s_rows = jax.lax.scan(suffix_step, s_init, (x0.T, k_valid), reverse=True)
  log_p = jnp.concatenate([p_init[None], p_rows], axis=0)
  log_s = jnp.concatenate([s_rows, s_init[None]], axis=0)
  return (jax.lax.stop_gradient(jnp.transpose(log_p, (1, 0, 2))),
          jax.lax.stop_gradient(jnp.transpose(log_s, (1, 0, 2))))


def _masked_ids(x0: Array, x0_len: Array) -> Array:
  """x0 with slots k >= n_b replaced by -1 (one_hot of -1 is all zeros)."""
  n = x0.shape[1]
  return jnp.where(jnp.arange(n)[None, :] < x0_len[:, None], x0, -1)


def _safe_log(x: Array) -> Array:
  """log x with exact -inf at x <= 0 and no NaN."""
  return jnp.where(x > 0, jnp.log(jnp.where(x > 0, x, 1.0)), _NEG_INF)


@partial(jax.jit, static_argnames=("vocab_size", "renormalize"))
def log_insertion_targets(x0: Array, x0_len: Array, xt: Array, xt_len: Array, vocab_size: int,
                          renormalize: bool = True) -> Array:
  """Dense log targets log rho[g, v] = log N(Ins(xt, g, v), x0) / N(xt, x0); for small V and tests.

  Args:
    x0: int [B, N]; x0_len: int [B]; xt: int [B, M]; xt_len: int [B]; vocab_size: V (ids must be < V).
    renormalize: see `log_insertion_weights`.

  Returns:
    float32 [B, M+1, V]: log rho, -inf where rho = 0 (ids absent from x0, gaps g > m_b).
  """
  x0, x0_len = _int32(x0, x0_len)
  _, logw = log_insertion_weights(x0, x0_len, xt, xt_len, renormalize)
  onehot = jax.nn.one_hot(_masked_ids(x0, x0_len), vocab_size, dtype=jnp.float32)  # [B, N, V]
  rho = jnp.einsum("bkg,bkv->bgv", jnp.exp(logw), onehot, precision=jax.lax.Precision.HIGHEST)
  return jax.lax.stop_gradient(_safe_log(rho))


@jax.jit
def compact_targets(x0: Array, x0_len: Array, logW: Array) -> tuple[Array, Array, Array]:  # noqa: N803
  """Targets grouped by the distinct tokens of each x0 (segment-sum of W by token id), for large V.

  Args:
    x0: int [B, N]; x0_len: int [B]; logW: float32 [B, N, M+1] from `log_insertion_weights`.

  Returns:
    rho: float32 [B, N, M+1], rho[b, s, g] = rho[g, seg_token[b, s]] for segment s; 0 for invalid segments.
    seg_token: int32 [B, N], token id of segment s (0 where invalid).
    seg_valid: bool [B, N], True for the first (number of distinct ids in x0[b, :n_b]) segments.
  """
  x0, x0_len = _int32(x0, x0_len)
  b, n = x0.shape
  valid = jnp.arange(n)[None, :] < x0_len[:, None]
  sort_key = jnp.where(valid, x0, jnp.iinfo(jnp.int32).max)
  perm = jnp.argsort(sort_key, axis=1, stable=True)
  sorted_ids = jnp.take_along_axis(sort_key, perm, axis=1)
  start = jnp.concatenate([jnp.ones((b, 1), bool), sorted_ids[:, 1:] != sorted_ids[:, :-1]], axis=1)
  seg_sorted = jnp.cumsum(start, axis=1) - 1  # [B, N]
  rows = jnp.arange(b)[:, None]
  seg_of_slot = jnp.zeros((b, n), jnp.int32).at[rows, perm].set(seg_sorted.astype(jnp.int32))
  sorted_valid = jnp.take_along_axis(valid, perm, axis=1)
  n_distinct = jnp.sum(start & sorted_valid, axis=1)  # [B]
  seg_valid = jnp.arange(n)[None, :] < n_distinct[:, None]
  seg_token = jnp.zeros((b, n), jnp.int32).at[rows, seg_sorted].set(jnp.where(sorted_valid, sorted_ids, 0))
  seg_token = jnp.where(seg_valid, seg_token, 0)
  w = jnp.exp(logW)
  rho = jax.vmap(lambda wi, si: jax.ops.segment_sum(wi, si, num_segments=n))(w, seg_of_slot)
  rho = jnp.where(seg_valid[:, :, None], rho, 0.0)
  return jax.lax.stop_gradient(rho), seg_token, seg_valid


# ---------------------------------------------------------------------------------------------------------------------
# Losses.
# ---------------------------------------------------------------------------------------------------------------------


@jax.jit
def gap_loss_terms(log_scores: Array, x0: Array, x0_len: Array, logW: Array, row_valid: Array,  # noqa: N803
                   allowed_mask: Array | None = None) -> tuple[Array, Array, Array, Array]:
  """Per-row pieces of DISE/DICE for scores and DP weights that are already aligned row by row.

  Row r of `log_scores` and column r of `logW` must describe the same gap. This is what packed training uses: the
  DP runs over whole packed rows (documents separated by unique sentinel ids) and its gap columns are sliced to
  the model's rows, so one call serves rows that hold several documents noised at different times.

  Args:
    log_scores: float [B, R, V] model log-scores, row r = one gap.
    x0: int [B, N] clean tokens of the DP (ids < 0 are sentinels with zero weight); x0_len: int [B].
    logW: float32 [B, N, R] log posterior deletion weights (from `log_insertion_weights`, gap columns aligned).
    row_valid: bool [B, R] rows that are real gaps (others contribute exact zeros).
    allowed_mask: optional bool broadcastable to [B, R, V]; False columns count as log-score -inf.

  Returns:
    s: [B, R] sum_v exp(out), cross: [B, R] sum_{k} W[k, r] out[r, x0[k]], ent: [B, R] sum_v rho log rho,
    rho: [B, R] sum_v rho (= sum_k W[k, r]); all float32 and 0 on invalid rows.
  """
  log_scores = jnp.asarray(log_scores, jnp.float32)
  x0, x0_len = _int32(x0, x0_len)
  b, r, v = log_scores.shape
  if logW.shape != (b, x0.shape[1], r):
    raise ValueError(f"logW has shape {logW.shape}; expected [B, N, R] = {(b, x0.shape[1], r)}.")
  row_valid = jnp.asarray(row_valid, bool)
  keep = jnp.broadcast_to(row_valid[:, :, None], log_scores.shape)
  if allowed_mask is not None:
    keep = keep & jnp.broadcast_to(jnp.asarray(allowed_mask, bool), log_scores.shape)
  out = jnp.where(keep, log_scores, _NEG_INF)  # masked before exp: no 0 * inf in the gradient
  s_g = jnp.sum(jnp.exp(out), axis=2)

  logw = jnp.where(row_valid[:, None, :], logW, _NEG_INF)
  w = jnp.exp(logw)  # [B, N, R]
  ids = jnp.clip(x0, 0, v - 1)  # invalid slots and sentinels have w = 0
  idx = jnp.broadcast_to(ids[:, None, :], (b, r, x0.shape[1]))
  out_k = jnp.take_along_axis(out, idx, axis=2)  # [B, R, N] = out[b, g, x0[b, k]]
  w_t = jnp.swapaxes(w, 1, 2)
  cross_g = jnp.sum(jnp.where(w_t > 0, w_t * out_k, 0.0), axis=2)

  rho_c, _, _ = compact_targets(x0, x0_len, logw)
  ent_g = jnp.sum(jnp.where(rho_c > 0, rho_c * _safe_log(rho_c), 0.0), axis=1)
  rho_g = jnp.sum(w, axis=1)  # sums to n - m up to rounding
  return s_g, cross_g, ent_g, rho_g


@jax.jit
def _loss_terms(log_scores: Array, x0: Array, x0_len: Array, xt: Array, xt_len: Array,
                allowed_mask: Array | None) -> tuple[Array, Array, Array, Array]:
  """Per-sequence (sum s, sum rho out, sum rho log rho, sum rho), each float32 [B]; see `dise_loss`."""
  x0, x0_len, xt_len = _int32(x0, x0_len, xt_len)
  r = log_scores.shape[1]
  m = xt.shape[1]
  if r != m + 1:
    raise ValueError(f"log_scores has {r} rows but xt has M = {m} slots; expected M + 1 = {m + 1} rows.")
  row_valid = jnp.arange(r)[None, :] <= xt_len[:, None]  # [B, M+1]
  _, logw = log_insertion_weights(x0, x0_len, xt, xt_len)
  terms = gap_loss_terms(log_scores, x0, x0_len, logw, row_valid, allowed_mask)
  return tuple(jnp.sum(x, axis=1) for x in terms)


def _reduce(per_seq: Array, x0_len: Array, normalize: str) -> tuple[Array, dict]:
  if normalize not in NORMALIZATIONS:
    raise ValueError(f"normalize must be one of {NORMALIZATIONS}; got {normalize!r}.")
  nll_sum = jnp.sum(per_seq)
  token_count = jnp.sum(jnp.asarray(x0_len, jnp.int32))
  if normalize == "token":
    loss = nll_sum / jnp.maximum(token_count, 1).astype(jnp.float32)
  elif normalize == "batch":
    loss = nll_sum / per_seq.shape[0]
  else:
    loss = nll_sum
  return loss, {"per_seq": per_seq, "nll_sum": nll_sum, "token_count": token_count}


def dise_loss(log_scores: Array, x0: Array, x0_len: Array, xt: Array, xt_len: Array, t: Array | float,
              normalize: str = "token", allowed_mask: Array | None = None) -> tuple[Array, dict]:
  """Diffusion insertion score entropy (variable length):

    DISE = w(t) sum_{g <= m, v} [ s - rho log s + rho (log rho - 1) ],  s = exp(log_scores), w(t) = 1/t.

  Each summand is >= 0 with equality at s = rho. With no deletion (xt = x0) or empty x0, rho = 0 and the loss is
  w(t) sum s (finite); it is exactly 0 only if the model puts no insertion mass anywhere.

  Args:
    log_scores: float [B, M+1, V] model log-scores; row g = gap g; rows g > m_b are ignored.
    x0: int [B, N]; x0_len: int [B]; xt: int [B, M]; xt_len: int [B] (xt a subsequence of x0).
    t: float [] or [B] diffusion times (> 0).
    normalize: "token" (sum / sum_b n_b, at least 1), "batch" (sum / B) or "sum" (sum over the batch).
    allowed_mask: optional bool broadcastable to [B, M+1, V]; False columns count as log-score -inf.

  Returns:
    loss: float32 scalar.
    aux: {"per_seq": [B] nats (weighted by w(t)), "nll_sum": scalar, "token_count": int32 sum_b n_b}.
  """
  s_sum, cross, ent, rho_sum = _loss_terms(log_scores, x0, x0_len, xt, xt_len, allowed_mask)
  wt = jnp.broadcast_to(loss_weight(t), s_sum.shape)
  per_seq = wt * (s_sum - cross + ent - rho_sum)
  return _reduce(per_seq, x0_len, normalize)


def dice_loss(log_scores: Array, x0: Array, x0_len: Array, xt: Array, xt_len: Array, t: Array | float,
              normalize: str = "token", allowed_mask: Array | None = None) -> tuple[Array, dict]:
  """Diffusion insertion cross entropy (fixed length, seqnorm head): DICE = w(t) sum rho (log rho - log s).

  Equal to `dise_loss` whenever sum_{g, v} s = n - m. Exactly 0 when xt = x0 or x0 is empty. Arguments and
  returns as in `dise_loss`.
  """
  _, cross, ent, _ = _loss_terms(log_scores, x0, x0_len, xt, xt_len, allowed_mask)
  wt = jnp.broadcast_to(loss_weight(t), cross.shape)
  per_seq = wt * (ent - cross)
  return _reduce(per_seq, x0_len, normalize)


# ---------------------------------------------------------------------------------------------------------------------
# Output heads (pure functions of the network's logits).
# ---------------------------------------------------------------------------------------------------------------------


def _token_log_softmax(token_logits: Array, disallowed_ids: Sequence[int] | Array) -> Array:
  """log_softmax over allowed columns of [B, S, V]; disallowed columns are -inf."""
  token_logits = jnp.asarray(token_logits, jnp.float32)
  v = token_logits.shape[-1]
  ids = jnp.asarray(disallowed_ids, jnp.int32).reshape(-1)
  banned = jnp.zeros((v,), bool).at[ids].set(True, mode="drop")
  masked = jnp.where(banned, _NEG_INF, token_logits)
  return jnp.where(banned, _NEG_INF, jax.nn.log_softmax(masked, axis=-1))


@jax.jit
def seqnorm_head(token_logits: Array, row_logits: Array, row_valid: Array, n_missing: Array,
                 disallowed_ids: Sequence[int] | Array = ()) -> Array:
  """Fixed-length head: out[r, v] = log_softmax_v(token)[v] + log_softmax_{valid r}(row)[r] + log(n - m + 1e-4).

  So sum_{r, v} exp(out) = n - m + 1e-4 over valid rows.

  Args:
    token_logits: float [B, S, V]; row_logits: float [B, S]; row_valid: bool [B, S] (gaps that may receive
      insertions: r <= m and, when conditioning, not inside the prompt); n_missing: [B] = n - m.
    disallowed_ids: ids whose column is -inf (BOS, PAD, MASK).

  Returns:
    float32 [B, S, V] log-scores; -inf on invalid rows and disallowed columns.
  """
  tok = _token_log_softmax(token_logits, disallowed_ids)
  row_valid = jnp.asarray(row_valid, bool)
  rows = jnp.where(row_valid, jnp.asarray(row_logits, jnp.float32), _NEG_INF)
  row_lse = _logsumexp(rows, axis=1)[:, None]
  row_lp = jnp.where(row_valid, rows - jnp.where(jnp.isfinite(row_lse), row_lse, 0.0), _NEG_INF)
  log_mass = jnp.log(jnp.asarray(n_missing, jnp.float32) + 1e-4)[:, None, None]
  return tok + row_lp[:, :, None] + log_mass


@jax.jit
def segment_seqnorm_head(token_logits: Array, row_logits: Array, row_segment: Array, n_missing: Array,
                         disallowed_ids: Sequence[int] | Array = ()) -> Array:
  """`seqnorm_head` for packed rows: the row softmax runs within each segment (document) of a row.

  out[r, v] = log_softmax_v(token)[v] + log_softmax_{r' in seg(r)}(row)[r] + log(n_seg - m_seg + 1e-4).

  Args:
    token_logits: float [B, S, V]; row_logits: float [B, S].
    row_segment: int [B, S] segment id of each row (> 0); 0 marks rows that may not receive insertions.
    n_missing: float [B, S] n - m of the row's segment (any value on rows with segment 0).
    disallowed_ids: ids whose column is -inf (BOS, PAD, MASK).

  Returns:
    float32 [B, S, V] log-scores; -inf on rows with segment 0 and on disallowed columns.
  """
  tok = _token_log_softmax(token_logits, disallowed_ids)
  row_segment = jnp.asarray(row_segment, jnp.int32)
  b, s = row_segment.shape
  valid = row_segment > 0
  rows = jnp.where(valid, jnp.asarray(row_logits, jnp.float32), _NEG_INF)
  gid = (jnp.arange(b)[:, None] * (s + 1) + row_segment).reshape(-1)  # one id per (row, segment)
  flat = rows.reshape(-1)
  mx = jax.ops.segment_max(flat, gid, num_segments=b * (s + 1))
  mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
  tot = jax.ops.segment_sum(jnp.where(valid.reshape(-1), jnp.exp(flat - mx[gid]), 0.0), gid,
                            num_segments=b * (s + 1))
  lse = (jnp.log(jnp.maximum(tot, 1e-30)) + mx)[gid].reshape(b, s)
  row_lp = jnp.where(valid, rows - lse, _NEG_INF)
  log_mass = jnp.log(jnp.maximum(jnp.asarray(n_missing, jnp.float32), 0.0) + 1e-4)
  return tok + (row_lp + log_mass)[:, :, None]


@jax.jit
def count_softmax_head(token_logits: Array, row_logits: Array, max_log_count: float,
                       disallowed_ids: Sequence[int] | Array = ()) -> Array:
  """Variable-length head: out[r, v] = log_softmax_v(token)[v] + min(row_logits[r], max_log_count).

  Row r predicts L_r (expected tokens still to insert in gap r, capped at exp(max_log_count), e.g. log 1024)
  times a token distribution.

  Args:
    token_logits: float [B, S, V]; row_logits: float [B, S] (u . h_r + c); max_log_count: cap on log L_r.
    disallowed_ids: ids whose column is -inf (BOS, PAD, MASK).

  Returns:
    float32 [B, S, V] log-scores (rows past the length are not masked; the losses ignore them).
  """
  tok = _token_log_softmax(token_logits, disallowed_ids)
  rows = jnp.minimum(jnp.asarray(row_logits, jnp.float32), max_log_count)
  return tok + rows[:, :, None]


# ---------------------------------------------------------------------------------------------------------------------
# Test helpers (pure Python, exponential time: tiny inputs only).
# ---------------------------------------------------------------------------------------------------------------------


def brute_force_count(y: Sequence[int], x: Sequence[int]) -> int:
  """N(y, x): number of index tuples k_1 < ... < k_|y| with x[k_j] = y_j (itertools enumeration)."""
  y, x = list(y), list(x)
  return sum(1 for idx in itertools.combinations(range(len(x)), len(y)) if all(x[i] == c for i, c in zip(idx, y)))


def brute_force_targets(x0: Sequence[int], xt: Sequence[int], vocab_size: int) -> tuple[int, np.ndarray]:
  """(N(xt, x0), rho [m+1, V] float64) with rho[g, v] = N(Ins(xt, g, v), x0) / N(xt, x0) by enumeration."""
  xt = list(xt)
  n_base = brute_force_count(xt, x0)
  rho = np.zeros((len(xt) + 1, vocab_size))
  for g in range(len(xt) + 1):
    for v in set(x0):
      rho[g, v] = brute_force_count(xt[:g] + [v] + xt[g:], x0) / n_base if n_base else np.nan
  return n_base, rho
