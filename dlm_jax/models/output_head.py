"""The V-wide output head fused with a weighted cross-entropy, run on the masked positions only.

At V = 50k the head (a [N, d] x [d, V] matmul, its softmax and their gradients) is most of a
small denoiser's training step, and its [N, V] float32 logits are the largest tensor of the step.
`masked_head_nll` keeps it cheap and small, and stays exact:

* Fused: the weighted NLL and, in the same pass, its gradients with respect to the hidden states,
  the kernel and the bias (softmax minus one-hot, scaled by the weights) are computed in the custom
  VJP's forward rule; the logits are never kept for the backward pass.
* Masked positions only: it runs on the rows with a nonzero weight (MDLM: the masked tokens, about
  half), gathered up to a static budget; when more rows are scored the dense head runs instead
  (`lax.cond` inside the forward rule, which autodiff never linearises, so the branch not taken
  costs nothing).
* Per device: the selection and the head run inside `shard_map` over the batch axes of the active
  mesh, on each device's LOCAL rows (budget per shard). A selection over the flattened global batch
  would be a global gather that XLA cannot split: every device would compute the head for the whole
  batch (issue 14: f32[263680, 50258] logits, 49 GiB per chip, at the paper size on 16 chips).
* Chunked: rows go through the head `chunk` at a time (`lax.scan`), so at most [chunk, V] logits
  exist at once (about 256 MiB of float32 by default), never [tokens, V].
* Vocabulary-parallel: when the mesh's 'tensor' axis divides V, each device holds V / tensor
  columns of the kernel and the softmax statistics are combined across 'tensor' (`pmax`, `psum`).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Optional, Union

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from dlm_jax import parallel

Budget = Union[int, Callable[[int, int], int]]

# Rows per chunk are chosen so that one chunk's float32 logits take about this many bytes.
CHUNK_BYTES = 1 << 28


def chunk_rows(vocab_local: int, rows: int, chunk_bytes: int = CHUNK_BYTES) -> int:
  """Rows per chunk: ~chunk_bytes of float32 logits, a multiple of 8, at most `rows`."""
  c = max(8, (chunk_bytes // (4 * max(vocab_local, 1))) // 8 * 8)
  return max(1, min(c, rows))


def chunking(rows: int, vocab_local: int, chunk_bytes: int = CHUNK_BYTES) -> tuple[int, int]:
  """(rows per chunk, padded rows): the fewest chunks of at most `chunk_rows` rows covering `rows`,
  sized evenly (a multiple of 8 when there are several), so padding stays under 8 rows a chunk."""
  cap = chunk_rows(vocab_local, rows, chunk_bytes)
  n_chunks = max(1, -(-rows // cap))
  chunk = max(1, -(-rows // n_chunks))  # rows = 0 (a zero budget): one chunk of one padding row
  if n_chunks > 1:
    chunk = -(-chunk // 8) * 8  # <= cap: cap is a multiple of 8 and ceil(rows / n_chunks) <= cap
  return chunk, n_chunks * chunk


def _chunk_nll_and_grads(h, kernel, bias, targets, weights, mask_id, dtype, v_offset,
                         tensor_axis, chunk):
  """sum_i w_i CE_i, CE [K], and the gradients w.r.t. h [K, d], kernel [d, Vl], bias [Vl].

  K is a multiple of `chunk`; the kernel holds columns [v_offset, v_offset + Vl) of the
  vocabulary (all of it unless split over `tensor_axis`).
  """
  k_rows, d = h.shape
  v_local = kernel.shape[1]
  cols = v_offset + jnp.arange(v_local)
  kern = kernel.astype(dtype)

  def body(carry, xs):
    dk_acc, db_acc = carry
    hc, tc, wc = xs
    logits = jax.lax.dot_general(hc.astype(dtype), kern, (((1,), (0,)), ((), ())),
                                 preferred_element_type=jnp.float32)
    if bias is not None:
      logits = logits + bias.astype(jnp.float32)
    if mask_id is not None:  # SUBS: the mask token is never predicted
      logits = jnp.where(cols == mask_id, -jnp.inf, logits)
    m = jnp.max(logits, axis=-1)
    if tensor_axis:
      m = jax.lax.pmax(m, tensor_axis)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    sumexp = jnp.sum(jnp.exp(logits - m[:, None]), axis=-1)
    onehot = cols[None, :] == tc[:, None]
    tgt = jnp.sum(jnp.where(onehot, logits, 0.0), axis=-1)
    if tensor_axis:
      sumexp, tgt = jax.lax.psum((sumexp, tgt), tensor_axis)
    lse = m + jnp.log(sumexp)
    ce = lse - tgt
    probs = jnp.exp(logits - lse[:, None])
    dlogits = wc[:, None] * (probs - onehot.astype(jnp.float32))
    dh = jax.lax.dot_general(dlogits.astype(dtype), kern, (((1,), (1,)), ((), ())),
                             preferred_element_type=jnp.float32)
    if tensor_axis:
      dh = jax.lax.psum(dh, tensor_axis)
    dk_acc = dk_acc + jax.lax.dot_general(hc.astype(dtype), dlogits.astype(dtype),
                                          (((0,), (0,)), ((), ())),
                                          preferred_element_type=jnp.float32)
    if db_acc is not None:
      db_acc = db_acc + jnp.sum(dlogits, axis=0)
    return (dk_acc, db_acc), (ce, dh)

  n_chunks = k_rows // chunk
  xs = (h.reshape(n_chunks, chunk, d), targets.reshape(n_chunks, chunk),
        weights.reshape(n_chunks, chunk))
  init = (jnp.zeros((d, v_local), jnp.float32),
          None if bias is None else jnp.zeros((v_local,), jnp.float32))
  (dk, db), (ce, dh) = jax.lax.scan(body, init, xs)
  ce = ce.reshape(k_rows)
  nll = jnp.sum(jnp.where(weights != 0, weights * ce, 0.0))
  return nll, ce, (dh.reshape(k_rows, d), dk, db)


def _pad_rows(x, rows):
  if x.shape[0] == rows:
    return x
  return jnp.pad(x, [(0, rows - x.shape[0])] + [(0, 0)] * (x.ndim - 1))


def _local_forward(h, kernel, bias, targets, weights, budget, mask_id, dtype, v_offset,
                   tensor_axis, chunk_bytes):
  """One shard: (nll, ce [n], (dh [n, d], dk, db), overflowed) over the rows of this device."""
  n, d = h.shape
  scored = weights != 0
  count = jnp.sum(scored.astype(jnp.int32))
  # Each path in whole chunks of its own size (padding rows have weight 0). Rounding the budget up
  # to the dense path's chunk could reach n and silently make every step dense.
  chunk, budget = chunking(min(budget, n), kernel.shape[1], chunk_bytes)
  dense_chunk, n_pad = chunking(n, kernel.shape[1], chunk_bytes)

  def dense(_):
    nll, ce, (dh, dk, db) = _chunk_nll_and_grads(
        _pad_rows(h, n_pad), kernel, bias, _pad_rows(targets, n_pad), _pad_rows(weights, n_pad),
        mask_id, dtype, v_offset, tensor_axis, dense_chunk)
    return nll, jnp.where(scored, ce[:n], 0.0), (dh[:n], dk, db)

  def sparse(_):
    idx = jnp.nonzero(scored, size=budget, fill_value=0)[0]
    keep = jnp.arange(budget) < count
    w = jnp.where(keep, weights[idx], 0.0)
    nll, ce_k, (dh_k, dk, db) = _chunk_nll_and_grads(h[idx], kernel, bias, targets[idx], w,
                                                     mask_id, dtype, v_offset, tensor_axis, chunk)
    ce = jnp.zeros((n,), jnp.float32).at[idx].add(jnp.where(keep, ce_k, 0.0))
    dh = jnp.zeros((n, d), jnp.float32).at[idx].add(jnp.where(keep[:, None], dh_k, 0.0))
    return nll, ce, (dh, dk, db)

  if budget >= n:
    out = dense(None)
    return out + (jnp.zeros((), jnp.float32),)
  out = jax.lax.cond(count <= budget, sparse, dense, None)
  return out + ((count > budget).astype(jnp.float32),)


def _forward(h, kernel, bias, targets, weights, budget, mask_id, dtype, chunk_bytes):
  """(nll, ce, (dh, dk, db), overflowed shards) with the head run per device shard."""
  lead, d = h.shape[:-1], h.shape[-1]
  rows_per_lead = math.prod(lead[1:]) if len(lead) > 1 else 1
  vocab = kernel.shape[1]
  mesh = parallel.active_mesh()
  batch_axes, tensor_axis = ((), None)
  if mesh is not None:
    batch_axes, tensor_axis = parallel.split_axes(mesh, lead[0], vocab)
  shards = 1
  for a in batch_axes:
    shards *= dict(mesh.shape)[a]
  local_lead = lead[0] // shards
  per_shard = int(budget(local_lead, rows_per_lead) if callable(budget) else budget)
  v_local = vocab // (dict(mesh.shape)[tensor_axis] if tensor_axis else 1)

  def local(h, kernel, bias, targets, weights):
    v_offset = jax.lax.axis_index(tensor_axis) * v_local if tensor_axis else 0
    flat = lambda x: x.reshape((-1,) + x.shape[len(lead):])  # noqa: E731
    nll, ce, (dh, dk, db), over = _local_forward(
        flat(h), kernel, bias, flat(targets), flat(weights), per_shard, mask_id, dtype, v_offset,
        tensor_axis, chunk_bytes)
    if batch_axes:
      nll, dk, db, over = jax.lax.psum((nll, dk, db, over), batch_axes)
    return nll, ce.reshape(h.shape[:-1]), (dh.reshape(h.shape), dk, db), over

  if not batch_axes and not tensor_axis:
    return local(h, kernel, bias, targets, weights)
  b = batch_axes if batch_axes else None
  row = P(b, *([None] * (len(lead) - 1)))
  hid = P(b, *([None] * len(lead)))
  kern, vec = P(None, tensor_axis), P(tensor_axis)
  fn = jax.shard_map(local, mesh=mesh, in_specs=(hid, kern, None if bias is None else vec, row, row),
                     out_specs=(P(), row, (hid, kern, None if bias is None else vec), P()),
                     check_vma=False)
  return fn(h, kernel, bias, targets, weights)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def masked_head_nll_and_overflow(h, kernel, bias, targets, weights, budget, mask_id,
                                 dtype=jnp.float32, chunk_bytes=CHUNK_BYTES):
  """`masked_head_nll` and the number of device shards whose scored rows overflowed the budget
  (they ran the dense head; the result is exact either way)."""
  nll, _, _, over = _forward(h, kernel, bias, targets, weights, budget, mask_id, dtype,
                             chunk_bytes)
  return nll, over


def masked_head_nll(h: jax.Array, kernel: jax.Array, bias: Optional[jax.Array],
                    targets: jax.Array, weights: jax.Array, budget: Budget,
                    mask_id: Optional[int], dtype=jnp.float32,
                    chunk_bytes: int = CHUNK_BYTES) -> jax.Array:
  """sum_i weights_i * CE(h_i @ kernel + bias, targets_i), exact, with a cheap backward pass.

  Args:
    h: [B, ..., d] (or [N, d]) final hidden states (after the final norm); the leading axis is
      the one split over the mesh's batch axes.
    kernel: [d, V]; bias: [V] or None.
    targets: h.shape[:-1] int32 token ids.
    weights: h.shape[:-1] float32; rows with weight 0 are not scored (their logits are never
      formed when at most the budget of rows of a shard are scored).
    budget: rows the sparse head scores PER DEVICE SHARD: an int, or `budget(b_local, rest)` of
      the shard's leading size and the product of the other leading dims (MDLM: `head_budget`).
      A budget >= the shard's rows means always dense.
    mask_id: a vocabulary column excluded from the softmax (SUBS), or None.
    dtype: matmul input dtype (accumulation is float32).
    chunk_bytes: float32 logits per chunk of rows (memory bound of the head).

  Returns:
    The weighted NLL (float32 scalar). Differentiable w.r.t. h, kernel and bias; the gradient
    w.r.t. weights is CE on scored rows and 0 on the others (their CE is never formed).
  """
  return masked_head_nll_and_overflow(h, kernel, bias, targets, weights, budget, mask_id, dtype,
                                      chunk_bytes)[0]


def _fwd(h, kernel, bias, targets, weights, budget, mask_id, dtype, chunk_bytes):
  nll, ce, (dh, dk, db), over = _forward(h, kernel, bias, targets, weights, budget, mask_id,
                                         dtype, chunk_bytes)
  return (nll, over), (ce, dh.astype(h.dtype), dk.astype(kernel.dtype), db)


def _bwd(budget, mask_id, dtype, chunk_bytes, res, g):  # pylint: disable=unused-argument
  ce, dh, dk, db = res
  g = g[0]
  return (g.astype(dh.dtype) * dh, g.astype(dk.dtype) * dk,
          None if db is None else g * db, None, g * ce)


masked_head_nll_and_overflow.defvjp(_fwd, _bwd)
