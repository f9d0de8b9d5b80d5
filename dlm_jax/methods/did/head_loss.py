"""DID's V-wide head and loss on chunks of each device's own model rows.

The insertion scores of a model row are [Lm, V] float32 (1152 x 50258 = 231 MB at the paper
size), and the head, the seqnorm/count-softmax normalisation and the DISE/DICE terms each make
tensors of that size and their gradients. Computed over the whole batch at once, a few copies of
[rows, Lm, V] dominate the step's memory. Here:

* the per-row function runs inside `shard_map` over the mesh's batch axes, on the device's own
  model rows (no global gather can make a device compute other devices' rows);
* those rows go through `lax.map` in chunks, each under `jax.checkpoint`: the forward pass keeps
  only each chunk's inputs, the backward pass recomputes one chunk's [c, Lm, V] tensors at a time
  (one extra head matmul, about a third of the head's training FLOPs, for a peak of one chunk).

The result is the same function of the same inputs as running the per-row function on the whole
batch (tests/test_did_method.py compares them).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from dlm_jax import parallel

Array = jax.Array

# A chunk holds about this many bytes of [c, Lm, V] float32.
CHUNK_BYTES = 1 << 28


def chunk_size(rows: int, per_row_bytes: int, chunk_bytes: int) -> int:
  """The largest divisor of `rows` whose chunk stays under `chunk_bytes` (at least 1)."""
  target = max(1, chunk_bytes // max(per_row_bytes, 1))
  return max(c for c in range(1, rows + 1) if rows % c == 0 and c <= target)


def _map_chunks(fn, hp, h, m, vocab, chunk_bytes):
  rows, length = h.shape[0], h.shape[1]
  c = chunk_size(rows, 4 * length * vocab, chunk_bytes)
  if c == rows:
    return fn(hp, h, m)
  split = lambda x: x.reshape((rows // c, c) + x.shape[1:])  # noqa: E731
  body = jax.checkpoint(lambda xs: fn(hp, xs[0], xs[1]))
  outs = jax.lax.map(body, (split(h), jax.tree.map(split, m)))
  return jax.tree.map(lambda x: x.reshape((rows,) + x.shape[2:]), outs)


def chunked_gap_losses(hp: dict[str, Any], h: Array, m: dict[str, Array],
                       fn: Callable[[dict[str, Any], Array, dict[str, Array]], Any],
                       chunk_bytes: int | None = None) -> Any:
  """`fn(hp, h, m)` over model rows, per device and in chunks; same result as `fn` on all rows.

  Args:
    hp: head parameters (replicated per device; their gradients are summed over devices).
    h: [G, Lm, d] hidden states of the model rows.
    m: per-row inputs, every leaf with leading dimension G (segment ids, DP weights, ...).
    fn: per-rows function returning arrays with leading dimension G (e.g. DISE and DICE [G, Lm]).
    chunk_bytes: float32 [c, Lm, V] bytes per chunk (default CHUNK_BYTES).
  """
  chunk_bytes = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
  keys = ("segment_ids", "n_missing", "x0", "x0_len", "logw", "wt")
  m = {k: m[k] for k in keys if k in m}
  vocab = hp["kernel"].shape[1]
  mesh = parallel.active_mesh()
  batch_axes = parallel.split_axes(mesh, h.shape[0])[0] if mesh is not None else ()
  if not batch_axes:
    return _map_chunks(fn, hp, h, m, vocab, chunk_bytes)
  rows = lambda x: P(batch_axes, *([None] * (x.ndim - 1)))  # noqa: E731
  in_specs = (jax.tree.map(lambda _: P(), hp), rows(h), jax.tree.map(rows, m))
  out_specs = P(batch_axes, None)
  sharded = jax.shard_map(lambda hp, h, m: _map_chunks(fn, hp, h, m, vocab, chunk_bytes),
                          mesh=mesh, in_specs=in_specs, out_specs=out_specs)
  return sharded(hp, h, m)
