"""DID losses: DISE (variable length) and DICE (fixed length with the seqnorm head), spec/did.md.

Per sequence, with out = log-scores and s = exp(out) over allowed columns:
  DISE = w(t) sum_{r,v} [ s - rho out + rho (log rho - 1) ],  DICE = w(t) sum_{r,v} rho (log rho - out),
w(t) = 1/t. Everything float32; conventions in `dlm_jax.methods.did.noise`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

from dlm_jax.methods.did.dp import _NEG_INF, _safe_log, compact_targets, log_insertion_weights
from dlm_jax.methods.did.noise import as_int32, loss_weight

NORMALIZATIONS = ("token", "batch", "sum")


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
  x0, x0_len = as_int32(x0, x0_len)
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
  x0, x0_len, xt_len = as_int32(x0, x0_len, xt_len)
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
