"""Packing the survivors of DID's deletions into model rows (the source of its training speed).

Why training is cheap (`config.did.pack`). The survivors of input rows 2k and 2k+1 are compacted into ONE
model row of `did.pack_len` slots (auto: seq_len + max(seq_len/8, 3 sqrt(seq_len/2) + 4), rounded up to 8),
with segment ids, so the model runs on B/2 rows of ~1.1-1.25 L tokens instead of B rows of L. To make the
pair fit, the two rows get antithetic times: t_a = t_min + (1 - t_min) s_k and t_b = t_min + (1 - t_min)
(1 - s_k) with s_k stratified over the B/2 pairs, so alpha(t_a) + alpha(t_b) = 1 - t_min and a pair's
expected survivors are about one row. Each row's t is still marginally U[t_min, 1] (unbiased loss).
Overflow fallback (a pair whose survivors + BOS slots exceed the row): the pair's stream is cut at the first
event that does not fit, and the cut applies to x0 too (the tail of the last document leaves this step's
loss for both the clean and the noised sequence), so x_t stays a subsequence of the x0 it is scored
against. Metrics `overflow_tokens` / `overflow_rows` count it. With `did.pack=False` each row is one model
row of seq_len + 1 slots (the cost of MDLM plus one BOS).

Targets. The subsequence DP (`dp.log_insertion_weights`) runs once per MODEL row over
x0' = [S_1, x0_1, S_2, x0_2, ...] and x_t' = [S_1, xt_1, S_2, xt_2, ...] where S_j = -j are sentinel
ids that occur once in each: every embedding must map S_j to S_j, so the count factorises over
documents and the DP's posterior weights equal the per-document ones; gap g' of x_t' is model row g' - 1.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from dlm_jax.diffusion import masked

Array = jax.Array


def auto_pack_len(seq_len: int) -> int:
  """Model row length for the survivors of 2 rows of `seq_len` (about 3 standard deviations of slack)."""
  extra = max(seq_len // 8, int(math.ceil(3.0 * math.sqrt(seq_len / 2.0))) + 4)
  return -(-(seq_len + extra) // 8) * 8


@dataclasses.dataclass(frozen=True)
class Layout:
  """Static shapes of the model rows built from data rows of length `seq_len`."""
  rows_per_model_row: int  # K: data rows whose survivors share one model row (1 or 2)
  model_len: int           # slots per model row (BOS slots included)
  dp_len: int              # slots of the DP's clean sequence x0' per model row (sentinels included)

  @classmethod
  def make(cls, seq_len: int, pack: bool, pack_len: int = 0) -> "Layout":
    if not pack:
      return cls(1, seq_len + 1, seq_len + 1)
    return cls(2, pack_len or auto_pack_len(seq_len), 2 * (seq_len + 1))


def pack_survivors(tokens: Array, segment_ids: Array, keep: Array, t: Array, special: Array,
                   layout: Layout, bos_id: int, pad_id: int) -> dict[str, Array]:
  """Builds model rows from the survivors of K data rows each, plus the matching DP inputs.

  Every data row contributes, in order, one event pair per position: a BOS slot where a segment starts
  (a sentinel in the DP sequences) and its token if it is content (x0) and kept (x_t). Events are
  cumulatively counted; everything from the first event that overflows `dp_len` (x0') or `model_len` (x_t')
  on is dropped from both, so the kept prefix is consistent.

  Args:
    tokens, segment_ids: int32 [B, L] data rows (segment id 0 = padding); B divisible by K.
    keep: bool [B, L] deletion draw (True = survives); only read on content tokens.
    t: float32 [B] diffusion time of each data row.
    special: bool [B, L] tokens that are never part of x0 (BOS, PAD, MASK ids).
    layout: static shapes; bos_id, pad_id: ids written into the model rows.

  Returns:
    dict with, for G = B / K model rows:
      tokens, segment_ids, positions: int32 [G, Lm] model input ([BOS] + x_t per segment, PAD elsewhere);
      t: float32 [G, Lm] time of each slot's document (1 on padding);
      t_rows: float32 [G, K] time of each source row; t_index: int32 [G, Lm] its source row (0 on
        padding), so the network's time conditioning runs K times per model row, not Lm times;
      n_missing: float32 [G, Lm] n - m of each slot's document;
      x0 [G, N'], x0_len [G], xt [G, Lm], xt_len [G]: DP inputs with sentinels -j for segment j;
      n_tokens [G] content tokens scored, kept [G] survivors placed, overflow_tokens [G] survivors cut,
      overflow_content [G] clean tokens cut.
  """
  k, lm, nd = layout.rows_per_model_row, layout.model_len, layout.dp_len
  b, length = tokens.shape
  g, w = b // k, k * length
  i32 = jnp.int32
  tok = tokens.reshape(g, w).astype(i32)
  seg = segment_ids.reshape(g, w)
  valid = seg > 0
  content = valid & ~special.reshape(g, w)
  kept = content & keep.reshape(g, w)
  tt = jnp.repeat(t.astype(jnp.float32), length).reshape(g, w)
  prev = jnp.concatenate([jnp.zeros((g, 1), seg.dtype), seg[:, :-1]], axis=1)
  row_start = (jnp.arange(w) % length == 0)[None, :]
  start = valid & (row_start | (seg != prev))
  mseg = jnp.cumsum(start.astype(i32), axis=1)  # 1-based segment index within the model row
  c0 = jnp.cumsum(start.astype(i32) + content.astype(i32), axis=1)
  ct = jnp.cumsum(start.astype(i32) + kept.astype(i32), axis=1)
  inc = (c0 <= nd) & (ct <= lm)  # a prefix of the event stream (both counts are non-decreasing)

  rows = jnp.broadcast_to(jnp.arange(g)[:, None], (g, w))
  x0_bos = jnp.where(inc & start, c0 - content - 1, nd)
  x0_tok = jnp.where(inc & content, c0 - 1, nd)
  xt_bos = jnp.where(inc & start, ct - kept - 1, lm)
  xt_tok = jnp.where(inc & kept, ct - 1, lm)
  sentinel = -mseg

  def put(shape, fill, dtype, writes):
    out = jnp.full(shape, fill, dtype)
    for pos, val in writes:
      out = out.at[rows, pos].set(jnp.asarray(val, dtype), mode="drop")
    return out

  x0 = put((g, nd), 0, i32, [(x0_bos, sentinel), (x0_tok, tok)])
  xt = put((g, lm), 0, i32, [(xt_bos, sentinel), (xt_tok, tok)])
  m_tok = put((g, lm), pad_id, i32, [(xt_bos, jnp.full_like(tok, bos_id)), (xt_tok, tok)])
  m_seg = put((g, lm), 0, i32, [(xt_bos, mseg), (xt_tok, mseg)])
  m_t = put((g, lm), 1.0, jnp.float32, [(xt_bos, tt), (xt_tok, tt)])
  src = jnp.broadcast_to((jnp.arange(w, dtype=i32) // length)[None, :], (g, w))
  m_src = put((g, lm), 0, i32, [(xt_bos, src), (xt_tok, src)])  # which of the k source rows
  is_bos = put((g, lm), False, bool, [(xt_bos, jnp.ones_like(start))])
  idx = jnp.arange(lm, dtype=i32)[None, :]
  first = jax.lax.cummax(jnp.where(is_bos, idx, 0), axis=1)
  m_pos = jnp.where(m_seg > 0, idx - first, 0)

  # n - m per (model row, segment), read back at each slot.
  nseg = w + 1
  gid = (rows * nseg + mseg).reshape(-1)
  n_seg = jax.ops.segment_sum((inc & content).reshape(-1).astype(jnp.float32), gid, num_segments=g * nseg)
  m_seg_count = jax.ops.segment_sum((inc & kept).reshape(-1).astype(jnp.float32), gid,
                                    num_segments=g * nseg)
  slot_gid = jnp.arange(g)[:, None] * nseg + m_seg
  n_missing = jnp.where(m_seg > 0, (n_seg - m_seg_count)[slot_gid], 0.0)

  count = lambda x: jnp.sum(x, axis=1).astype(i32)  # noqa: E731
  n_bos = count(inc & start)
  return dict(tokens=m_tok, segment_ids=m_seg, positions=m_pos, t=m_t, n_missing=n_missing,
              t_rows=t.astype(jnp.float32).reshape(g, k), t_index=m_src,
              x0=x0, x0_len=n_bos + count(inc & content), xt=xt, xt_len=n_bos + count(inc & kept),
              n_tokens=count(inc & content), kept=count(inc & kept),
              overflow_tokens=count(kept & ~inc), overflow_content=count(content & ~inc))


def antithetic_times(key: Array, num_pairs: int, t_min: float, pair_index: Array | None = None,
                     num_pairs_total: int | None = None) -> Array:
  """t [2 P]: rows 2k, 2k+1 get t_min + (1 - t_min) s_k and t_min + (1 - t_min)(1 - s_k), s_k stratified.

  The strata are over `num_pairs_total` pairs (default P), pair k being pair `pair_index[k]` of
  them (default k): a micro-batch draws the times its pairs have in the whole batch.
  """
  s = masked.sample_times(key, num_pairs, 0.0, "stratified", global_batch=num_pairs_total,
                          index=pair_index)
  ta = t_min + (1.0 - t_min) * s
  tb = t_min + (1.0 - t_min) * (1.0 - s)
  return jnp.stack([ta, tb], axis=1).reshape(-1)
