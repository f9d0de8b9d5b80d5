"""Fused flash attention in Pallas (forward and backward) for GPU (Triton) and TPU (Mosaic).

Implements the attention contract of the model layer (`dlm_jax.models.attention`):

    flash_attention(q, k, v, q_segment_ids, kv_segment_ids, *, causal=False) -> out

  q: [B, Lq, H, D], k/v: [B, Lk, H, D] (same dtype: float32 or bfloat16)
  q_segment_ids: [B, Lq] int32, kv_segment_ids: [B, Lk] int32
  out: [B, Lq, H, D] in q's dtype

A query attends to a key iff both carry the same segment id and that id is not 0, and, when
`causal`, the key position is not after the query position. Rows with no allowed key give
exactly 0 and zero gradients.

Algorithm. The forward pass streams key/value blocks through an online softmax (running row
max `m`, running denominator `l`, float32 accumulator), never forming an [Lq, Lk] matrix; it
saves the per-row log-sum-exp `lse = m + log(l)` (float32). The backward pass recomputes the
probabilities block by block from `lse`, uses `delta = rowsum(dO * O)` (computed in float32
by XLA before the kernels), and runs two fused kernels: one over query blocks for dq, one over
key blocks for dk and dv. The softmax scale D**-0.5 is applied inside the kernels.

Lowerings.
  * GPU (Pallas Triton): arrays stay in [B, L, H, D]; grid (B, H, query blocks) for the
    forward and dq kernels, (B, H, key blocks) for the dk/dv kernel; the inner loop over the
    other sequence axis is a `fori_loop` (bounded by the diagonal when causal). Blocks are
    powers of two in [16, 256].
  * TPU (Pallas Mosaic): arrays are transposed to [B, H, L, D]; grid (B, H, query blocks,
    key blocks) with the last axis a sequential reduction over VMEM scratch accumulators
    (swapped for the dk/dv kernel). Blocks are multiples of 128. Untested on TPU hardware:
    checked in TPU interpret mode on CPU and by lowering to Mosaic ahead of time.

Lengths that are not a multiple of the block size are padded internally with segment id 0
and sliced back. On CPU both lowerings run in Pallas interpret mode (`interpret=True`); the
TPU-style kernels then run under the TPU interpreter (`pltpu.InterpretParams()`, what
`pltpu.force_tpu_interpret_mode()` installs).

This module imports jax only. The model layer (`dlm_jax.models.attention`, backend 'pallas')
runs it per device shard inside the sharded step and falls back to the XLA path where allowed.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

SUPPORTED_HEAD_DIMS = (64, 128)
SUPPORTED_DTYPES = ("float32", "bfloat16")
BACKENDS = ("gpu", "tpu")

# Default blocks: (forward block_q, forward block_k, backward block_q, backward block_k).
_GPU_DEFAULT_BLOCKS = (128, 64, 64, 64)
_TPU_DEFAULT_BLOCKS = (128, 128, 128, 128)
_GPU_BLOCK_RANGE = (16, 256)
_TPU_BLOCK_MULTIPLE = 128


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static kernel settings (hashable: a non-differentiable argument of the custom VJP)."""
  backend: str
  causal: bool
  fwd_block_q: int
  fwd_block_k: int
  bwd_block_q: int
  bwd_block_k: int
  interpret: bool
  num_warps: int = 4
  num_stages: int = 2


# ----------------------------------------------------------------------------- validation


def default_platform() -> str:
  """JAX's default platform named as a kernel lowering ('gpu' for cuda/rocm)."""
  platform = jax.default_backend()
  return "gpu" if platform in ("gpu", "cuda", "rocm") else platform


def resolve_backend(backend: Optional[str], interpret: bool) -> str:
  """Chooses the kernel lowering: 'gpu' or 'tpu'.

  Args:
    backend: None (from the default JAX backend), 'gpu' or 'tpu'.
    interpret: whether the kernels run in Pallas interpret mode (any host, CPU included).

  Returns:
    'gpu' or 'tpu'.

  Raises:
    ValueError: unknown backend, or backend None with no GPU/TPU and no interpret mode.
  """
  if backend is not None and backend not in BACKENDS:
    raise ValueError(f"backend={backend!r} is not supported; choose None or one of {BACKENDS}.")
  platform = default_platform()
  if backend is None:
    if platform in BACKENDS:
      return platform
    if interpret:
      return "gpu"  # GPU-style kernels interpret fastest on CPU.
    raise ValueError(
        f"Pallas flash attention needs a GPU or TPU backend, found {platform!r}; pass "
        "interpret=True to run the kernels in Pallas interpret mode (slow, for tests).")
  # An explicit backend other than the default one is allowed without interpret mode: that is
  # ahead-of-time lowering for another platform (`.lower(lowering_platforms=...)`).
  return backend


def _check_block(name: str, value: int, backend: str) -> None:
  if not isinstance(value, int) or isinstance(value, bool):
    raise ValueError(f"{name}={value!r} must be an int.")
  if backend == "gpu":
    lo, hi = _GPU_BLOCK_RANGE
    if value < lo or value > hi or value & (value - 1):
      raise ValueError(
          f"{name}={value} is not supported on GPU; use a power of two in [{lo}, {hi}] "
          f"(16, 32, 64, 128, 256).")
  elif value <= 0 or value % _TPU_BLOCK_MULTIPLE:
    raise ValueError(
        f"{name}={value} is not supported on TPU; use a positive multiple of "
        f"{_TPU_BLOCK_MULTIPLE} (128, 256, 512, ...).")


def validate_options(backend: str, block_q: Optional[int], block_k: Optional[int]) -> None:
  """Checks block sizes for a lowering; raises ValueError naming the setting."""
  if block_q is not None:
    _check_block("block_q", block_q, backend)
  if block_k is not None:
    _check_block("block_k", block_k, backend)


def validate_inputs(q: jax.Array, k: jax.Array, v: jax.Array, q_segment_ids: jax.Array,
                    kv_segment_ids: jax.Array) -> None:
  """Checks shapes, dtypes and head dim against what the kernels support.

  Raises:
    ValueError: naming the unsupported setting and the supported values.
  """
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q, k, v must be [B, L, H, D]; got shapes {q.shape}, {k.shape}, {v.shape}.")
  b, lq, h, d = q.shape
  if k.shape != v.shape or k.shape[0] != b or k.shape[2:] != (h, d):
    raise ValueError(f"k and v must be [B, Lk, H, D] matching q {q.shape}; got {k.shape}, "
                     f"{v.shape}.")
  lk = k.shape[1]
  if q_segment_ids.shape != (b, lq) or kv_segment_ids.shape != (b, lk):
    raise ValueError(
        f"segment ids must be q_segment_ids [B, Lq]={(b, lq)} and kv_segment_ids "
        f"[B, Lk]={(b, lk)}; got {q_segment_ids.shape} and {kv_segment_ids.shape}.")
  if not (jnp.issubdtype(q_segment_ids.dtype, jnp.integer)
          and jnp.issubdtype(kv_segment_ids.dtype, jnp.integer)):
    raise ValueError(f"segment ids must be integers; got {q_segment_ids.dtype}, "
                     f"{kv_segment_ids.dtype}.")
  dtypes = {jnp.dtype(x.dtype).name for x in (q, k, v)}
  if len(dtypes) != 1 or next(iter(dtypes)) not in SUPPORTED_DTYPES:
    raise ValueError(f"dtype {sorted(dtypes)} is not supported by the Pallas flash-attention "
                     f"kernel; q, k, v must share one of {SUPPORTED_DTYPES}.")
  if d not in SUPPORTED_HEAD_DIMS:
    raise ValueError(f"head dim D={d} is not supported by the Pallas flash-attention kernel; "
                     f"supported head dims: {SUPPORTED_HEAD_DIMS}.")


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _fit_block(block: int, length: int, backend: str) -> int:
  """Shrinks a block for short sequences (keeps it valid for the lowering)."""
  if backend == "gpu":
    return max(_GPU_BLOCK_RANGE[0], min(block, pl.next_power_of_2(length)))
  return max(_TPU_BLOCK_MULTIPLE, min(block, _round_up(length, _TPU_BLOCK_MULTIPLE)))


def _make_config(backend: str, causal: bool, lq: int, lk: int, block_q: Optional[int],
                 block_k: Optional[int], interpret: bool) -> _Config:
  defaults = _GPU_DEFAULT_BLOCKS if backend == "gpu" else _TPU_DEFAULT_BLOCKS
  fq, fk, bq, bk = defaults
  if block_q is not None:
    fq = bq = block_q
  if block_k is not None:
    fk = bk = block_k
  return _Config(
      backend=backend, causal=bool(causal),
      fwd_block_q=_fit_block(fq, lq, backend), fwd_block_k=_fit_block(fk, lk, backend),
      bwd_block_q=_fit_block(bq, lq, backend), bwd_block_k=_fit_block(bk, lk, backend),
      interpret=bool(interpret))


# ----------------------------------------------------------------------------- shared maths


def _block_mask(q_seg, k_seg, q_pos, k_pos, causal: bool):
  """Allowed-pair mask for one block; all arguments broadcast to [bq, bk]."""
  mask = (q_seg == k_seg) & (k_seg != 0)
  if causal:
    mask = mask & (q_pos >= k_pos)
  return mask


def _dot(a, b, contract_a: int = 1, contract_b: int = 0):
  """2-D matmul with float32 accumulation; contract_* pick the contracted axes."""
  return lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())),
                         preferred_element_type=jnp.float32)


def _online_softmax_step(s, mask, m_prev, l_prev, acc_prev, v, keepdims):
  """One key block of the online softmax.

  Args:
    s: [bq, bk] float32 scaled logits.
    mask: [bq, bk] bool.
    m_prev, l_prev: running max and denominator, [bq] (GPU) or [bq, 1] (TPU).
    acc_prev: [bq, D] float32 running numerator.
    v: [bk, D] values.
    keepdims: True for [bq, 1] row statistics.

  Returns:
    (m_new, l_new, acc_new).
  """
  s = jnp.where(mask, s, -jnp.inf)
  m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=keepdims))
  m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
  alpha = jnp.exp(m_prev - m_safe)
  p = jnp.exp(s - _col(m_safe))
  l_new = alpha * l_prev + jnp.sum(p, axis=1, keepdims=keepdims)
  acc_new = acc_prev * _col(alpha) + _dot(p.astype(v.dtype), v)
  return m_new, l_new, acc_new


def _col(x):
  """A row statistic as a [bq, 1] column ([bq] -> [bq, 1]; [bq, 1] unchanged)."""
  return x[:, None] if x.ndim == 1 else x


def _finalize(m, l, acc):
  """Normalised output and log-sum-exp (0 for rows with no allowed key)."""
  empty = l == 0.0
  out = acc / _col(jnp.where(empty, 1.0, l))
  lse = jnp.where(empty, 0.0, m + jnp.log(jnp.where(empty, 1.0, l)))
  return out, lse


def _probs(s, mask, lse):
  """Recomputed softmax probabilities [bq, bk] from the saved log-sum-exp."""
  return jnp.exp(jnp.where(mask, s, -jnp.inf) - _col(lse))


# ----------------------------------------------------------------------------- GPU (Triton)


def _gpu_fwd_kernel(q_ref, k_ref, v_ref, qseg_ref, kseg_ref, o_ref, lse_ref, *, scale, causal,
                    block_q, block_k, num_k_blocks):
  """Grid (B, H, q blocks). q_ref [bq, D]; k_ref, v_ref [Lk, D]; qseg [bq]; kseg [Lk]."""
  qi = pl.program_id(2)
  q = q_ref[...]
  q_seg = qseg_ref[...][:, None]
  q_pos = (qi * block_q + jnp.arange(block_q, dtype=jnp.int32))[:, None]
  d = q.shape[-1]

  def body(j, carry):
    m, l, acc = carry
    start = pl.multiple_of(j * block_k, block_k)
    k = k_ref[pl.ds(start, block_k), :]
    v = v_ref[pl.ds(start, block_k), :]
    k_seg = kseg_ref[pl.ds(start, block_k)][None, :]
    k_pos = (start + jnp.arange(block_k, dtype=jnp.int32))[None, :]
    s = _dot(q, k, 1, 1) * scale
    mask = _block_mask(q_seg, k_seg, q_pos, k_pos, causal)
    return _online_softmax_step(s, mask, m, l, acc, v, keepdims=False)

  upper = num_k_blocks
  if causal:
    upper = jnp.minimum(num_k_blocks, lax.div((qi + 1) * block_q + block_k - 1, block_k))
  init = (jnp.full((block_q,), -jnp.inf, jnp.float32), jnp.zeros((block_q,), jnp.float32),
          jnp.zeros((block_q, d), jnp.float32))
  m, l, acc = lax.fori_loop(0, upper, body, init)
  out, lse = _finalize(m, l, acc)
  o_ref[...] = out.astype(o_ref.dtype)
  lse_ref[...] = lse


def _gpu_dq_kernel(q_ref, k_ref, v_ref, qseg_ref, kseg_ref, do_ref, lse_ref, delta_ref, dq_ref,
                   *, scale, causal, block_q, block_k, num_k_blocks):
  """Grid (B, H, q blocks): dq = scale * sum_k dS K with dS = P * (dO V^T - delta)."""
  qi = pl.program_id(2)
  q = q_ref[...]
  do = do_ref[...]
  lse = lse_ref[...]
  delta = delta_ref[...]
  q_seg = qseg_ref[...][:, None]
  q_pos = (qi * block_q + jnp.arange(block_q, dtype=jnp.int32))[:, None]

  def body(j, dq):
    start = pl.multiple_of(j * block_k, block_k)
    k = k_ref[pl.ds(start, block_k), :]
    v = v_ref[pl.ds(start, block_k), :]
    k_seg = kseg_ref[pl.ds(start, block_k)][None, :]
    k_pos = (start + jnp.arange(block_k, dtype=jnp.int32))[None, :]
    s = _dot(q, k, 1, 1) * scale
    p = _probs(s, _block_mask(q_seg, k_seg, q_pos, k_pos, causal), lse)
    dp = _dot(do, v, 1, 1)
    ds = p * (dp - delta[:, None])
    return dq + _dot(ds.astype(k.dtype), k)

  upper = num_k_blocks
  if causal:
    upper = jnp.minimum(num_k_blocks, lax.div((qi + 1) * block_q + block_k - 1, block_k))
  dq = lax.fori_loop(0, upper, body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _gpu_dkv_kernel(q_ref, k_ref, v_ref, qseg_ref, kseg_ref, do_ref, lse_ref, delta_ref, dk_ref,
                    dv_ref, *, scale, causal, block_q, block_k, num_q_blocks):
  """Grid (B, H, k blocks): dv = sum_q P^T dO, dk = scale * sum_q dS^T Q."""
  kj = pl.program_id(2)
  k = k_ref[...]
  v = v_ref[...]
  k_seg = kseg_ref[...][None, :]
  k_pos = (kj * block_k + jnp.arange(block_k, dtype=jnp.int32))[None, :]

  def body(i, carry):
    dk, dv = carry
    start = pl.multiple_of(i * block_q, block_q)
    q = q_ref[pl.ds(start, block_q), :]
    do = do_ref[pl.ds(start, block_q), :]
    lse = lse_ref[pl.ds(start, block_q)]
    delta = delta_ref[pl.ds(start, block_q)]
    q_seg = qseg_ref[pl.ds(start, block_q)][:, None]
    q_pos = (start + jnp.arange(block_q, dtype=jnp.int32))[:, None]
    s = _dot(q, k, 1, 1) * scale
    p = _probs(s, _block_mask(q_seg, k_seg, q_pos, k_pos, causal), lse)
    dv = dv + _dot(p.astype(do.dtype), do, 0, 0)
    dp = _dot(do, v, 1, 1)
    ds = p * (dp - delta[:, None])
    dk = dk + _dot(ds.astype(q.dtype), q, 0, 0)
    return dk, dv

  lower = 0
  if causal:
    lower = lax.div(kj * block_k, block_q)
  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(lower, num_q_blocks, body, (zeros, zeros))
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _gpu_params(cfg: _Config):
  return pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _gpu_fwd(q, k, v, qseg, kseg, cfg: _Config):
  """q [B, Lq, H, D], k/v [B, Lk, H, D], seg [B, L] -> (out [B, Lq, H, D], lse [B, H, Lq])."""
  b, lq, h, d = q.shape
  lk = k.shape[1]
  bq, bk = cfg.fwd_block_q, cfg.fwd_block_k
  kernel = functools.partial(_gpu_fwd_kernel, scale=d ** -0.5, causal=cfg.causal, block_q=bq,
                             block_k=bk, num_k_blocks=lk // bk)
  return pl.pallas_call(
      kernel,
      grid=(b, h, lq // bq),
      in_specs=[
          pl.BlockSpec((None, bq, None, d), lambda b_, h_, i: (b_, i, h_, 0)),
          pl.BlockSpec((None, lk, None, d), lambda b_, h_, i: (b_, 0, h_, 0)),
          pl.BlockSpec((None, lk, None, d), lambda b_, h_, i: (b_, 0, h_, 0)),
          pl.BlockSpec((None, bq), lambda b_, h_, i: (b_, i)),
          pl.BlockSpec((None, lk), lambda b_, h_, i: (b_, 0)),
      ],
      out_specs=[
          pl.BlockSpec((None, bq, None, d), lambda b_, h_, i: (b_, i, h_, 0)),
          pl.BlockSpec((None, None, bq), lambda b_, h_, i: (b_, h_, i)),
      ],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, h, lq), jnp.float32)],
      compiler_params=_gpu_params(cfg),
      interpret=cfg.interpret,
      name="dlm_flash_fwd_gpu",
  )(q, k, v, qseg, kseg)


def _gpu_bwd(q, k, v, qseg, kseg, out, lse, do, cfg: _Config):
  """Returns (dq, dk, dv) in the input dtypes; shapes as in `_gpu_fwd`."""
  b, lq, h, d = q.shape
  lk = k.shape[1]
  bq, bk = cfg.bwd_block_q, cfg.bwd_block_k
  scale = d ** -0.5
  delta = jnp.einsum("blhd,blhd->bhl", do.astype(jnp.float32), out.astype(jnp.float32))

  full_q = pl.BlockSpec((None, lq, None, d), lambda b_, h_, i: (b_, 0, h_, 0))
  full_k = pl.BlockSpec((None, lk, None, d), lambda b_, h_, i: (b_, 0, h_, 0))
  blk_q = pl.BlockSpec((None, bq, None, d), lambda b_, h_, i: (b_, i, h_, 0))
  blk_k = pl.BlockSpec((None, bk, None, d), lambda b_, h_, i: (b_, i, h_, 0))
  row_q = pl.BlockSpec((None, None, bq), lambda b_, h_, i: (b_, h_, i))
  full_row_q = pl.BlockSpec((None, None, lq), lambda b_, h_, i: (b_, h_, 0))

  dq = pl.pallas_call(
      functools.partial(_gpu_dq_kernel, scale=scale, causal=cfg.causal, block_q=bq,
                        block_k=bk, num_k_blocks=lk // bk),
      grid=(b, h, lq // bq),
      in_specs=[blk_q, full_k, full_k,
                pl.BlockSpec((None, bq), lambda b_, h_, i: (b_, i)),
                pl.BlockSpec((None, lk), lambda b_, h_, i: (b_, 0)),
                blk_q, row_q, row_q],
      out_specs=blk_q,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_gpu_params(cfg),
      interpret=cfg.interpret,
      name="dlm_flash_dq_gpu",
  )(q, k, v, qseg, kseg, do, lse, delta)

  dk, dv = pl.pallas_call(
      functools.partial(_gpu_dkv_kernel, scale=scale, causal=cfg.causal, block_q=bq,
                        block_k=bk, num_q_blocks=lq // bq),
      grid=(b, h, lk // bk),
      in_specs=[full_q, blk_k, blk_k,
                pl.BlockSpec((None, lq), lambda b_, h_, i: (b_, 0)),
                pl.BlockSpec((None, bk), lambda b_, h_, i: (b_, i)),
                full_q, full_row_q, full_row_q],
      out_specs=[blk_k, blk_k],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=_gpu_params(cfg),
      interpret=cfg.interpret,
      name="dlm_flash_dkv_gpu",
  )(q, k, v, qseg, kseg, do, lse, delta)
  return dq, dk, dv


# ----------------------------------------------------------------------------- TPU (Mosaic)
# Layout: q/k/v [B, H, L, D]; q segment ids [B, Lq, 1]; kv segment ids [B, 1, Lk];
# lse and delta [B, H, Lq, 1] (row statistics as [rows, 1] columns in VMEM).


def _tpu_positions(qi, kj, block_q, block_k):
  q_pos = qi * block_q + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0)
  k_pos = kj * block_k + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
  return q_pos, k_pos


def _tpu_block_needed(qi, kj, block_q, block_k, causal):
  """Whether block (qi, kj) has any pair on or below the diagonal (always True if not causal)."""
  if not causal:
    return True
  return kj * block_k <= (qi + 1) * block_q - 1


def _run_if(cond, fn):
  if cond is True:
    fn()
  else:
    pl.when(cond)(fn)


def _tpu_fwd_kernel(q_ref, k_ref, v_ref, qseg_ref, kseg_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc,
                    *, scale, causal, block_q, block_k):
  """Grid (B, H, q blocks, k blocks); the k-block axis reduces into VMEM scratch."""
  qi, kj = pl.program_id(2), pl.program_id(3)

  @pl.when(kj == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  def _step():
    s = _dot(q_ref[...], k_ref[...], 1, 1) * scale
    q_pos, k_pos = _tpu_positions(qi, kj, block_q, block_k)
    mask = _block_mask(qseg_ref[...], kseg_ref[...], q_pos, k_pos, causal)
    m, l, acc = _online_softmax_step(s, mask, m_sc[...], l_sc[...], acc_sc[...], v_ref[...],
                                     keepdims=True)
    m_sc[...] = m
    l_sc[...] = l
    acc_sc[...] = acc

  _run_if(_tpu_block_needed(qi, kj, block_q, block_k, causal), _step)

  @pl.when(kj == pl.num_programs(3) - 1)
  def _store():
    out, lse = _finalize(m_sc[...], l_sc[...], acc_sc[...])
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse


def _tpu_dq_kernel(q_ref, k_ref, v_ref, qseg_ref, kseg_ref, do_ref, lse_ref, delta_ref, dq_ref,
                   dq_sc, *, scale, causal, block_q, block_k):
  """Grid (B, H, q blocks, k blocks); accumulates dq over the k-block axis."""
  qi, kj = pl.program_id(2), pl.program_id(3)

  @pl.when(kj == 0)
  def _init():
    dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

  def _step():
    k = k_ref[...]
    s = _dot(q_ref[...], k, 1, 1) * scale
    q_pos, k_pos = _tpu_positions(qi, kj, block_q, block_k)
    p = _probs(s, _block_mask(qseg_ref[...], kseg_ref[...], q_pos, k_pos, causal), lse_ref[...])
    dp = _dot(do_ref[...], v_ref[...], 1, 1)
    ds = p * (dp - delta_ref[...])
    dq_sc[...] += _dot(ds.astype(k.dtype), k)

  _run_if(_tpu_block_needed(qi, kj, block_q, block_k, causal), _step)

  @pl.when(kj == pl.num_programs(3) - 1)
  def _store():
    dq_ref[...] = (dq_sc[...] * scale).astype(dq_ref.dtype)


def _tpu_dkv_kernel(q_ref, k_ref, v_ref, qseg_ref, kseg_ref, do_ref, lse_ref, delta_ref, dk_ref,
                    dv_ref, dk_sc, dv_sc, *, scale, causal, block_q, block_k):
  """Grid (B, H, k blocks, q blocks); accumulates dk, dv over the q-block axis."""
  kj, qi = pl.program_id(2), pl.program_id(3)

  @pl.when(qi == 0)
  def _init():
    dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

  def _step():
    q = q_ref[...]
    do = do_ref[...]
    s = _dot(q, k_ref[...], 1, 1) * scale
    q_pos, k_pos = _tpu_positions(qi, kj, block_q, block_k)
    p = _probs(s, _block_mask(qseg_ref[...], kseg_ref[...], q_pos, k_pos, causal), lse_ref[...])
    dv_sc[...] += _dot(p.T.astype(do.dtype), do)
    dp = _dot(do, v_ref[...], 1, 1)
    ds = p * (dp - delta_ref[...])
    dk_sc[...] += _dot(ds.T.astype(q.dtype), q)

  _run_if(_tpu_block_needed(qi, kj, block_q, block_k, causal), _step)

  @pl.when(qi == pl.num_programs(3) - 1)
  def _store():
    dk_ref[...] = (dk_sc[...] * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _tpu_interpret(cfg: _Config) -> Any:
  return pltpu.InterpretParams() if cfg.interpret else False


def _tpu_params():
  return pltpu.CompilerParams(
      dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))


def _tpu_fwd(q, k, v, qseg, kseg, cfg: _Config):
  """q [B, H, Lq, D], k/v [B, H, Lk, D], qseg [B, Lq, 1], kseg [B, 1, Lk] -> out, lse."""
  b, h, lq, d = q.shape
  lk = k.shape[2]
  bq, bk = cfg.fwd_block_q, cfg.fwd_block_k
  nk = lk // bk
  causal = cfg.causal

  def kv_block(i, j):
    if causal:  # Blocks above the diagonal are skipped: keep the last useful block resident.
      j = jnp.minimum(j, jnp.minimum(nk - 1, lax.div((i + 1) * bq - 1, bk)))
    return j

  kernel = functools.partial(_tpu_fwd_kernel, scale=d ** -0.5, causal=causal, block_q=bq,
                             block_k=bk)
  return pl.pallas_call(
      kernel,
      grid=(b, h, lq // bq, nk),
      in_specs=[
          pl.BlockSpec((None, None, bq, d), lambda b_, h_, i, j: (b_, h_, i, 0)),
          pl.BlockSpec((None, None, bk, d), lambda b_, h_, i, j: (b_, h_, kv_block(i, j), 0)),
          pl.BlockSpec((None, None, bk, d), lambda b_, h_, i, j: (b_, h_, kv_block(i, j), 0)),
          pl.BlockSpec((None, bq, 1), lambda b_, h_, i, j: (b_, i, 0)),
          pl.BlockSpec((None, 1, bk), lambda b_, h_, i, j: (b_, 0, kv_block(i, j))),
      ],
      out_specs=[
          pl.BlockSpec((None, None, bq, d), lambda b_, h_, i, j: (b_, h_, i, 0)),
          pl.BlockSpec((None, None, bq, 1), lambda b_, h_, i, j: (b_, h_, i, 0)),
      ],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, h, lq, 1), jnp.float32)],
      scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                      pltpu.VMEM((bq, d), jnp.float32)],
      compiler_params=_tpu_params(),
      interpret=_tpu_interpret(cfg),
      name="dlm_flash_fwd_tpu",
  )(q, k, v, qseg, kseg)


def _tpu_bwd(q, k, v, qseg, kseg, out, lse, do, cfg: _Config):
  """Returns (dq, dk, dv) in the [B, H, L, D] layout of `_tpu_fwd`."""
  b, h, lq, d = q.shape
  lk = k.shape[2]
  bq, bk = cfg.bwd_block_q, cfg.bwd_block_k
  nq, nk = lq // bq, lk // bk
  scale = d ** -0.5
  causal = cfg.causal
  delta = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)

  # dq: grid (b, h, i, j), reduction over key blocks j.
  def kv_for_q(i, j):
    if causal:
      j = jnp.minimum(j, jnp.minimum(nk - 1, lax.div((i + 1) * bq - 1, bk)))
    return j

  q_spec = pl.BlockSpec((None, None, bq, d), lambda b_, h_, i, j: (b_, h_, i, 0))
  row_spec = pl.BlockSpec((None, None, bq, 1), lambda b_, h_, i, j: (b_, h_, i, 0))
  kv_spec = pl.BlockSpec((None, None, bk, d), lambda b_, h_, i, j: (b_, h_, kv_for_q(i, j), 0))
  dq = pl.pallas_call(
      functools.partial(_tpu_dq_kernel, scale=scale, causal=causal, block_q=bq, block_k=bk),
      grid=(b, h, nq, nk),
      in_specs=[q_spec, kv_spec, kv_spec,
                pl.BlockSpec((None, bq, 1), lambda b_, h_, i, j: (b_, i, 0)),
                pl.BlockSpec((None, 1, bk), lambda b_, h_, i, j: (b_, 0, kv_for_q(i, j))),
                q_spec, row_spec, row_spec],
      out_specs=q_spec,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)],
      compiler_params=_tpu_params(),
      interpret=_tpu_interpret(cfg),
      name="dlm_flash_dq_tpu",
  )(q, k, v, qseg, kseg, do, lse, delta)

  # dk, dv: grid (b, h, j, i), reduction over query blocks i.
  def q_for_kv(j, i):
    if causal:  # Query blocks before the diagonal are skipped.
      i = jnp.maximum(i, lax.div(j * bk, bq))
    return i

  k_spec = pl.BlockSpec((None, None, bk, d), lambda b_, h_, j, i: (b_, h_, j, 0))
  qb_spec = pl.BlockSpec((None, None, bq, d), lambda b_, h_, j, i: (b_, h_, q_for_kv(j, i), 0))
  rowb_spec = pl.BlockSpec((None, None, bq, 1),
                           lambda b_, h_, j, i: (b_, h_, q_for_kv(j, i), 0))

  def dkv_kernel(q_ref, k_ref, v_ref, qseg_ref, kseg_ref, do_ref, lse_ref, delta_ref, dk_ref,
                 dv_ref, dk_sc, dv_sc):
    _tpu_dkv_kernel(q_ref, k_ref, v_ref, qseg_ref, kseg_ref, do_ref, lse_ref, delta_ref, dk_ref,
                    dv_ref, dk_sc, dv_sc, scale=scale, causal=causal, block_q=bq, block_k=bk)

  dk, dv = pl.pallas_call(
      dkv_kernel,
      grid=(b, h, nk, nq),
      in_specs=[qb_spec, k_spec, k_spec,
                pl.BlockSpec((None, bq, 1), lambda b_, h_, j, i: (b_, q_for_kv(j, i), 0)),
                pl.BlockSpec((None, 1, bk), lambda b_, h_, j, i: (b_, 0, j)),
                qb_spec, rowb_spec, rowb_spec],
      out_specs=[k_spec, k_spec],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)],
      compiler_params=_tpu_params(),
      interpret=_tpu_interpret(cfg),
      name="dlm_flash_dkv_tpu",
  )(q, k, v, qseg, kseg, do, lse, delta)
  return dq, dk, dv


# ----------------------------------------------------------------------------- custom VJP


def _fwd_impl(q, k, v, qseg, kseg, cfg: _Config):
  if cfg.backend == "gpu":
    return _gpu_fwd(q, k, v, qseg, kseg, cfg)
  return _tpu_fwd(q, k, v, qseg, kseg, cfg)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash_core(q, k, v, qseg, kseg, cfg: _Config):
  """Block-aligned inputs in the lowering's layout -> output in that layout."""
  out, _ = _fwd_impl(q, k, v, qseg, kseg, cfg)
  return out


def _flash_core_fwd(q, k, v, qseg, kseg, cfg: _Config):
  out, lse = _fwd_impl(q, k, v, qseg, kseg, cfg)
  return out, (q, k, v, qseg, kseg, out, lse)


def _flash_core_bwd(cfg: _Config, residuals, do):
  q, k, v, qseg, kseg, out, lse = residuals
  bwd = _gpu_bwd if cfg.backend == "gpu" else _tpu_bwd
  dq, dk, dv = bwd(q, k, v, qseg, kseg, out, lse, do.astype(out.dtype), cfg)
  return dq, dk, dv, None, None


_flash_core.defvjp(_flash_core_fwd, _flash_core_bwd)


def _pad_axis(x: jax.Array, axis: int, length: int) -> jax.Array:
  if x.shape[axis] == length:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, length - x.shape[axis])
  return jnp.pad(x, widths)  # zeros: segment id 0 marks padding.


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_segment_ids: jax.Array,
                    kv_segment_ids: jax.Array, *, causal: bool = False,
                    block_q: Optional[int] = None, block_k: Optional[int] = None,
                    backend: Optional[str] = None, interpret: bool = False) -> jax.Array:
  """Fused flash attention with segment ids; differentiable in q, k, v.

  Args:
    q: [B, Lq, H, D] float32 or bfloat16, D in SUPPORTED_HEAD_DIMS.
    k: [B, Lk, H, D], same dtype as q.
    v: [B, Lk, H, D], same dtype as q.
    q_segment_ids: [B, Lq] int; 0 marks padding.
    kv_segment_ids: [B, Lk] int; 0 marks padding.
    causal: additionally forbid keys after the query position.
    block_q: query block (None: lowering default). GPU: power of two in [16, 256];
      TPU: multiple of 128. Shrunk for short sequences.
    block_k: key block, same rules as block_q.
    backend: None (the default JAX backend), 'gpu' (Triton) or 'tpu' (Mosaic). Naming one
      that is not the default backend, without interpret, is for ahead-of-time lowering.
    interpret: run the kernels in Pallas interpret mode (CPU tests).

  Returns:
    [B, Lq, H, D] in q's dtype; exactly 0 on rows with no allowed key.

  Raises:
    ValueError: unsupported shape, dtype, head dim, block size or backend.
  """
  backend = resolve_backend(backend, interpret)
  validate_options(backend, block_q, block_k)
  validate_inputs(q, k, v, q_segment_ids, kv_segment_ids)
  lq, lk = q.shape[1], k.shape[1]
  cfg = _make_config(backend, causal, lq, lk, block_q, block_k, interpret)
  lq_pad = _round_up(lq, math.lcm(cfg.fwd_block_q, cfg.bwd_block_q))
  lk_pad = _round_up(lk, math.lcm(cfg.fwd_block_k, cfg.bwd_block_k))
  qseg = _pad_axis(q_segment_ids.astype(jnp.int32), 1, lq_pad)
  kseg = _pad_axis(kv_segment_ids.astype(jnp.int32), 1, lk_pad)
  q = _pad_axis(q, 1, lq_pad)
  k = _pad_axis(k, 1, lk_pad)
  v = _pad_axis(v, 1, lk_pad)
  if backend == "gpu":
    out = _flash_core(q, k, v, qseg, kseg, cfg)
  else:
    to_bhld = lambda x: jnp.transpose(x, (0, 2, 1, 3))
    out = _flash_core(to_bhld(q), to_bhld(k), to_bhld(v), qseg[:, :, None], kseg[:, None, :],
                      cfg)
    out = to_bhld(out)
  return out[:, :lq]
