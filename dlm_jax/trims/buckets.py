"""TRIMS difficulty buckets (offline, host side; spec/trims.md).

Each response's slots are ranked by teacher difficulty into K per-response quantile buckets
(1 = hardest, K = easiest, 0 = never mask: prompt and padding), stored with the data as int8.
The bucket ORDER of a masking scheme is applied here ("hard_first", "easy_first", or "random":
hard-first labels permuted within each response, seeded by the example id).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

BUCKET_ORDERS = ("hard_first", "easy_first", "random")

ArrayLike = Union[np.ndarray, jax.Array, Sequence[float]]


def _check_order(order: str) -> None:
  if order not in BUCKET_ORDERS:
    raise ValueError(f"bucket order must be one of {BUCKET_ORDERS}, got {order!r}")


def check_num_buckets(K: int) -> None:
  if not isinstance(K, (int, np.integer)) or K < 1 or K > 127:
    raise ValueError(f"K (number of buckets) must be an int in 1..127 (buckets are int8), got {K!r}")


def assign_buckets(scores: ArrayLike, valid: Optional[ArrayLike] = None, K: int = 8,
                   order: str = "hard_first",
                   seed: Union[int, Sequence[int], np.ndarray, None] = None) -> np.ndarray:
  """Per-response quantile buckets of teacher difficulty (numpy, host side).

  Valid slots are ranked by the key (-score, slot) ascending: hardest first, and on ties the earlier slot counts as
  harder. With rank q in 0..R_v-1 (R_v = number of valid slots of the response), the hard-first bucket is
  b = 1 + floor(K q / R_v): bucket 1 is the hardest, K the easiest, sizes differ by at most one.

  Args:
    scores: [R] or [B, R] float difficulty (teacher NLL or entropy; larger = harder).
    valid: same shape, bool; True on response slots that may be masked (EOS fill included). None = all valid.
    K: number of buckets.
    order: "hard_first" (b as above), "easy_first" (K + 1 - b) or "random" (a uniformly random permutation of the
      hard-first labels among the valid slots of each response, drawn from `np.random.default_rng(seed)`).
    seed: only for order="random": the stable example id, an int for [R] input or a sequence [B] for [B, R].

  Returns:
    int8 array of the shape of `scores`: 1..K on valid slots, 0 elsewhere.

  Raises:
    ValueError: on a bad K/order, mismatched shapes, NaN scores on valid slots or a missing seed for "random".
  """
  check_num_buckets(K)
  _check_order(order)
  d = np.asarray(scores, dtype=np.float64)
  if d.ndim not in (1, 2):
    raise ValueError(f"scores must be [R] or [B, R], got shape {d.shape}")
  v = np.ones(d.shape, bool) if valid is None else np.asarray(valid, dtype=bool)
  if v.shape != d.shape:
    raise ValueError(f"valid has shape {v.shape}, scores has shape {d.shape}")
  if np.isnan(d[v]).any():
    raise ValueError("scores contain NaN on valid slots")
  squeeze = d.ndim == 1
  d2, v2 = np.atleast_2d(d), np.atleast_2d(v)
  n_rows, r = d2.shape
  idx = np.broadcast_to(np.arange(r), d2.shape)
  # np.lexsort sorts by the last key first: invalid slots last, then -score ascending, then slot index.
  sort_order = np.lexsort((idx, np.where(v2, -d2, 0.0), ~v2), axis=-1)
  rank = np.empty_like(sort_order)
  np.put_along_axis(rank, sort_order, idx, axis=-1)
  r_v = v2.sum(-1, keepdims=True)
  b = 1 + (K * rank) // np.maximum(r_v, 1)
  b = np.where(v2, b, 0)
  if order == "easy_first":
    b = np.where(v2, K + 1 - b, 0)
  elif order == "random":
    if seed is None:
      raise ValueError("order='random' needs seed = the example id (an int, or [B] ids for [B, R] scores)")
    seeds = np.atleast_1d(np.asarray(seed))
    if seeds.shape != (n_rows,) or (squeeze and np.ndim(seed) != 0):
      raise ValueError(f"order='random' needs one seed per response: got seed shape {np.shape(seed)} "
                       f"for scores of shape {d.shape}")
    for row in range(n_rows):
      rng = np.random.default_rng(int(seeds[row]))
      b[row, v2[row]] = rng.permutation(b[row, v2[row]])
  out = b.astype(np.int8)
  return out[0] if squeeze else out


def assign_buckets_jnp(scores: jax.Array, valid: Optional[jax.Array] = None, K: int = 8,
                       order: str = "hard_first") -> jax.Array:
  """jax.numpy twin of `assign_buckets` for "hard_first" / "easy_first" (same labels, jit-able, K static).

  Scores are compared in float32 here (float64 on the host), so scores equal only in float32 tie differently.

  Args:
    scores: [..., R] float difficulty.
    valid: [..., R] bool, or None for all valid.
    K: number of buckets (static).
    order: "hard_first" or "easy_first" ("random" is host-only: use `assign_buckets`).

  Returns:
    int8 [..., R]: 1..K on valid slots, 0 elsewhere.
  """
  check_num_buckets(K)
  if order not in ("hard_first", "easy_first"):
    raise ValueError(f"assign_buckets_jnp supports order 'hard_first' or 'easy_first', got {order!r}")
  d = jnp.asarray(scores, jnp.float32)
  v = jnp.ones(d.shape, bool) if valid is None else jnp.asarray(valid, bool)
  r = d.shape[-1]
  # Stable sort on (invalid, -score): ties keep slot order, so the earlier slot counts as harder.
  key = jnp.where(v, -d, 0.0)
  idx = jnp.broadcast_to(jnp.arange(r, dtype=jnp.int32), d.shape)
  sort_order = jnp.lexsort((idx, key, ~v), axis=-1)
  rank = jnp.zeros(d.shape, jnp.int32)
  rank = jnp.put_along_axis(rank, sort_order, idx, axis=-1, inplace=False)
  r_v = jnp.maximum(v.sum(-1, keepdims=True), 1).astype(jnp.int32)
  b = 1 + (K * rank) // r_v
  if order == "easy_first":
    b = K + 1 - b
  return jnp.where(v, b, 0).astype(jnp.int8)


def bucket_sizes(buckets: ArrayLike, K: int) -> np.ndarray:
  """Counts per bucket 1..K of one response ([R]) or summed over responses ([B, R]) -> int64 [K]."""
  b = np.asarray(buckets).ravel()
  return np.bincount(b[b > 0].astype(np.int64), minlength=K + 1)[1:K + 1]
