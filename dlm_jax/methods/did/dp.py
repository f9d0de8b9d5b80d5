"""DID training targets: the subsequence-counting dynamic program in log space (spec/did.md).

rho[g, v] = N(Ins(x_t, g, v), x0) / N(x_t, x0) comes from one prefix and one suffix table over x0,
each a `lax.scan` over the x0 axis vectorised over gaps and batch: O(n m) work, no V factor. All
float32; conventions in `dlm_jax.methods.did.noise`.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

from dlm_jax.methods.did.noise import as_int32

_NEG_INF = -jnp.inf


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
  x0, xt, x0_len, xt_len = as_int32(x0, xt, x0_len, xt_len)
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
  x0, xt, x0_len, xt_len = as_int32(x0, xt, x0_len, xt_len)
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
  x0, xt, x0_len, xt_len = as_int32(x0, xt, x0_len, xt_len)
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
  x0, x0_len = as_int32(x0, x0_len)
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
  x0, x0_len = as_int32(x0, x0_len)
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
