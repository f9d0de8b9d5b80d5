"""DID output heads: insertion log-scores from the network's token logits and one scalar per row.

- seqnorm (fixed length): a row softmax scaled by n - m, so the scores' total mass is n - m;
- count-softmax (variable length): each row predicts how many tokens are still to insert there.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from dlm_jax.methods.did.dp import _NEG_INF, _logsumexp

Array = jax.Array


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
