"""Multi-head attention for the denoisers: the contract, the XLA reference, and the backend registry.

Every attention backend in dlm-jax shares one contract:

    attend(q, k, v, q_segment_ids, kv_segment_ids, *, causal=False) -> out

  q: [B, Lq, H, D], k/v: [B, Lk, H, D] (same dtype: float32 or bfloat16)
  q_segment_ids: [B, Lq] int32, kv_segment_ids: [B, Lk] int32
  out: [B, Lq, H, D] in q's dtype

A query attends to a key iff both carry the same segment id and that id is not 0 (0 marks
padding), and, when `causal`, the key position is not after the query position. A query row
with no allowed key (a fully padded row) returns exactly zero, never NaN. Logits and the
softmax are computed in float32 whatever the input dtype.

`config.model.attention` names a registered backend ('xla': the reference below; 'pallas': our
flash kernels in `dlm_jax.kernels`) or 'auto' (a kernel on GPU/TPU, XLA on CPU). A new backend is
one function `make(fallback_ok, **options) -> attend` plus one line in `BACKENDS`. Kernel backends
run per device shard inside the sharded step (`shard_map`: batch over ('data', 'fsdp'), heads
over 'tensor'); with 'auto' a setting a kernel cannot take falls back to XLA with a warning.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from dlm_jax.config import ConfigError
from dlm_jax.kernels import flash_attention as flash
from dlm_jax.parallel import BATCH_AXES, TENSOR_AXIS

AUTO = "auto"


def attention_mask(q_segment_ids: jax.Array, kv_segment_ids: jax.Array,
                   causal: bool = False) -> jax.Array:
  """Boolean mask [B, 1, Lq, Lk]: True where a query may attend to a key."""
  q = q_segment_ids[:, :, None]
  kv = kv_segment_ids[:, None, :]
  mask = (q == kv) & (kv != 0)
  if causal:
    lq, lk = q_segment_ids.shape[1], kv_segment_ids.shape[1]
    mask = mask & (jnp.arange(lq)[:, None] >= jnp.arange(lk)[None, :])[None]
  return mask[:, None]


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                  q_segment_ids: jax.Array, kv_segment_ids: jax.Array, *,
                  causal: bool = False) -> jax.Array:
  """Reference attention: materialises the [B, H, Lq, Lk] logits; see module docstring."""
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k,
                      preferred_element_type=jnp.float32) * scale
  mask = attention_mask(q_segment_ids, kv_segment_ids, causal)
  logits = jnp.where(mask, logits, -jnp.inf)
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  p = jnp.exp(logits - row_max)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(denom == 0.0, 1.0, denom)
  out = jnp.einsum("bhqk,bkhd->bqhd", p.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  return out.astype(q.dtype)


# -- running a kernel per device shard -----------------------------------------------------------
def _mesh_specs(mesh: Any, batch: int, heads: int) -> tuple[P, P]:
  """PartitionSpecs ([B, L, H, D], [B, L]) splitting batch and heads over the mesh.

  An axis that is absent, manual already, or does not divide its dimension is left out (the
  work is then replicated over it, which stays correct).
  """
  shape = dict(mesh.shape)
  manual = set(getattr(mesh, "manual_axes", ()) or ())
  usable = lambda a: a in shape and a not in manual and shape[a] > 1  # noqa: E731
  batch_axes = []
  size = 1
  for a in BATCH_AXES:
    if usable(a) and batch % (size * shape[a]) == 0:
      batch_axes.append(a)
      size *= shape[a]
  head_axis = TENSOR_AXIS if usable(TENSOR_AXIS) and heads % shape[TENSOR_AXIS] == 0 else None
  b = tuple(batch_axes) if batch_axes else None
  return P(b, None, head_axis, None), P(b, None)


def _active_mesh(mesh: Any) -> Any:
  if mesh is not None:
    return mesh
  abstract = jax.sharding.get_abstract_mesh()
  if abstract is None or abstract.empty:
    return None
  return abstract


def per_shard(fn: Callable[..., jax.Array], mesh: Any = None) -> Callable[..., jax.Array]:
  """`fn(q, k, v, q_seg, kv_seg)` run on each device's shard of a sharded call (or directly)."""

  def attend(q, k, v, q_segment_ids, kv_segment_ids):
    active = _active_mesh(mesh)
    if active is None or math.prod(dict(active.shape).values()) == 1:
      return fn(q, k, v, q_segment_ids, kv_segment_ids)
    x_spec, seg_spec = _mesh_specs(active, q.shape[0], q.shape[2])
    if x_spec == P(None, None, None, None):
      return fn(q, k, v, q_segment_ids, kv_segment_ids)
    sharded = jax.shard_map(fn, mesh=active, in_specs=(x_spec, x_spec, x_spec, seg_spec, seg_spec),
                            out_specs=x_spec, check_vma=False)
    return sharded(q, k, v, q_segment_ids, kv_segment_ids)

  return attend


# -- backends ------------------------------------------------------------------------------------
def _make_xla(fallback_ok: bool = False, **options) -> Callable[..., jax.Array]:
  del fallback_ok, options
  return xla_attention


def make_pallas_attention(fallback_ok: bool = False, block_q: Optional[int] = None,
                 block_k: Optional[int] = None, interpret: Optional[bool] = None,
                 backend: Optional[str] = None,
                 mesh: Optional[jax.sharding.Mesh] = None) -> Callable[..., jax.Array]:
  """Our Pallas flash kernels (Triton on GPU, Mosaic on TPU), per device shard.

  Args:
    fallback_ok: when the kernel cannot handle a setting (head dim, dtype, block size, no
      GPU/TPU), log a warning and use `xla_attention` instead of raising ValueError.
    block_q, block_k: block sizes (None: the lowering's defaults).
    interpret: Pallas interpret mode; None means True only on CPU (slow, for tests).
    backend: None, 'gpu' or 'tpu' (see `flash.flash_attention`).
    mesh: mesh to shard over; None uses the mesh set with `jax.set_mesh`, if any.
  """
  auto_interpret = interpret is None
  if auto_interpret:
    interpret = flash.default_platform() not in flash.BACKENDS
    if interpret and not fallback_ok:
      logging.warning("Pallas flash attention on %r runs in interpret mode: correct but slow.",
                      jax.default_backend())
  try:
    resolved = flash.resolve_backend(backend, interpret)
    flash.validate_options(resolved, block_q, block_k)
    if interpret and auto_interpret and fallback_ok:
      raise ValueError(f"no GPU or TPU (default backend {jax.default_backend()!r})")
  except ValueError as e:
    if not fallback_ok:
      raise
    logging.warning("Pallas flash attention unavailable (%s); falling back to XLA attention.", e)
    return xla_attention

  kernel = functools.partial(flash.flash_attention, block_q=block_q, block_k=block_k,
                             backend=resolved, interpret=interpret)

  def attend(q: jax.Array, k: jax.Array, v: jax.Array, q_segment_ids: jax.Array,
             kv_segment_ids: jax.Array, causal: bool = False) -> jax.Array:
    try:
      flash.validate_inputs(q, k, v, q_segment_ids, kv_segment_ids)
    except ValueError as e:
      if not fallback_ok:
        raise
      logging.warning("Pallas flash attention cannot take this input (%s); using XLA.", e)
      return xla_attention(q, k, v, q_segment_ids, kv_segment_ids, causal=causal)
    return per_shard(functools.partial(kernel, causal=causal), mesh)(
        q, k, v, q_segment_ids, kv_segment_ids)

  return attend


def _check_pallas(model_cfg: Any) -> None:
  hd = model_cfg.d_model // model_cfg.num_heads
  if hd not in flash.SUPPORTED_HEAD_DIMS:
    raise ConfigError(f"config.model.attention: 'pallas' supports head dimensions "
                      f"{' and '.join(map(str, flash.SUPPORTED_HEAD_DIMS))}, got {hd}; use 'xla' "
                      "or 'auto'.")


@dataclasses.dataclass(frozen=True)
class Backend:
  """A registered attention backend: `make(fallback_ok, **options) -> attend`, its config check,
  and the platforms it runs on natively ('auto' picks the first backend listing the platform)."""
  name: str
  make: Callable[..., Callable[..., jax.Array]]
  check: Callable[[Any], None] = lambda model_cfg: None
  platforms: tuple[str, ...] = ()


BACKENDS: dict[str, Backend] = {b.name: b for b in (
    Backend("pallas", make_pallas_attention, _check_pallas, platforms=("tpu", "gpu")),
    Backend("xla", _make_xla, platforms=("cpu", "tpu", "gpu")),
)}


def names() -> tuple[str, ...]:
  return tuple(BACKENDS) + (AUTO,)


def resolve_impl(impl: str, platform: Optional[str] = None) -> str:
  """The backend 'auto' stands for on `platform` (default: JAX's default backend); validates."""
  if impl != AUTO and impl not in BACKENDS:
    raise ConfigError(
        f"config.model.attention={impl!r} is not supported; choose one of {names()}.")
  if impl == AUTO:
    platform = platform or jax.default_backend()
    platform = "gpu" if platform in ("cuda", "rocm") else platform
    return next(b.name for b in BACKENDS.values() if platform in b.platforms)
  return impl


def check_config(model_cfg: Any) -> None:
  """Start-up check of config.model.attention (ConfigError naming the field)."""
  name = resolve_impl(model_cfg.attention) if model_cfg.attention != AUTO else AUTO
  if name != AUTO:
    BACKENDS[name].check(model_cfg)


def get_attention_fn(impl: str, **options) -> Callable[..., jax.Array]:
  """Returns an `attend(q, k, v, q_seg, kv_seg, causal=...)` function for a backend name."""
  resolved = resolve_impl(impl)
  return BACKENDS[resolved].make(fallback_ok=(impl == AUTO), **options)
