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

`config.model.attention` names a registered backend or 'auto':
  'xla'     the reference below (materialises the [B, H, Lq, Lk] logits); every platform;
  'pallas'  our flash kernels in `dlm_jax.kernels` (Mosaic on TPU, Triton on GPU);
  'splash'  JAX's TPU splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`), with
            segment ids; wrapped here to honour the contract (scaling, padding rows, lengths that
            are not a multiple of its 128-wide blocks);
  'cudnn'   cuDNN's fused attention (`jax.nn.dot_product_attention(implementation='cudnn')`, GPU
            only). cuDNN takes no segment ids: it gets per-row lengths, so it is exact only when each
            row is one document followed by padding (data.packing='pad', did.pack=False); configs
            that pack several documents into a row are refused at start-up;
  'auto'    per TARGET platform, read from the devices of the mesh being traced for (not from
            `jax.default_backend()`, which is the host's 'cpu' when compiling for a TPU): TPU ->
            'splash', GPU -> 'pallas', CPU -> 'xla'. Each choice's compiled form is tested for its
            platform (tests/test_compile.py: a whole train step compiled for TPU v4, and our Triton
            kernels compiled for an H100 when the CUDA plugin is installed).
A new backend is one function `make(fallback_ok, **options) -> attend` plus one line in
`BACKENDS`. Kernel backends run per device shard inside the sharded step (`shard_map`: batch over
('data', 'fsdp'), heads over 'tensor'); with 'auto' a setting a kernel cannot take falls back to
XLA with a warning.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from dlm_jax import hardware
from dlm_jax import parallel
from dlm_jax.config import ConfigError
from dlm_jax.kernels import flash_attention as flash

AUTO = "auto"


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
  """A warning logged once per process (a model traces its attention once per block)."""
  if message not in _WARNED:
    _WARNED.add(message)
    logging.warning(message)


def target_platform(mesh: Any = None) -> str:
  """'tpu', 'gpu' or 'cpu': what the computation being traced is compiled for.

  From `mesh`'s devices if given, else from the mesh active at trace time (`jax.set_mesh`, which
  `parallel.sharding_context` sets around the train step), else JAX's default backend.
  """
  if mesh is not None and hasattr(mesh, "devices"):
    return hardware.target_platform(list(np.asarray(mesh.devices).flat))
  active = jax.sharding.get_abstract_mesh()
  device = None if active is None or active.empty else getattr(active, "abstract_device", None)
  if device is not None and getattr(device, "platform", None):
    return hardware.target_platform([device])
  return hardware.target_platform(jax.devices()[:1])


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
  """PartitionSpecs ([B, L, H, D], [B, L]) splitting batch and heads over the mesh
  (`parallel.split_axes`: an axis that does not divide its dimension is left out)."""
  batch_axes, head_axis = parallel.split_axes(mesh, batch, heads)
  b = batch_axes if batch_axes else None
  return P(b, None, head_axis, None), P(b, None)


_active_mesh = parallel.active_mesh


def per_shard(fn: Callable[..., jax.Array], mesh: Any = None) -> Callable[..., jax.Array]:
  """`fn(q, k, v, q_seg, kv_seg)` run on each device's shard of a sharded call (or directly)."""

  def attend(q, k, v, q_segment_ids, kv_segment_ids):
    active = _active_mesh(mesh)
    if active is None or math.prod(dict(active.shape).values()) == 1:
      return fn(q, k, v, q_segment_ids, kv_segment_ids)
    # A batch (and head count) that no mesh axis divides still goes through shard_map, with every
    # device computing the whole call: XLA cannot partition a Mosaic/Triton call by itself (the
    # fast samplers run the trunk on a few rows at a time).
    x_spec, seg_spec = _mesh_specs(active, q.shape[0], q.shape[2])
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
  platform = target_platform(mesh)
  auto_interpret = interpret is None
  if auto_interpret:
    interpret = platform not in flash.BACKENDS
    if interpret and not fallback_ok:
      _warn_once(f"Pallas flash attention on {platform!r} runs in interpret mode: correct but "
                 "slow.")
  if backend is None and platform in flash.BACKENDS:
    backend = platform  # the target's lowering, also when compiling ahead of time on a CPU host
  try:
    resolved = flash.resolve_backend(backend, interpret)
    flash.validate_options(resolved, block_q, block_k)
    if interpret and auto_interpret and fallback_ok:
      raise ValueError(f"no GPU or TPU (target platform {platform!r})")
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


# -- splash (JAX's TPU kernel) --------------------------------------------------------------------
SPLASH_BLOCK = 128  # splash's blocks are multiples of 128 that divide the (padded) length


def _splash_block(length: int) -> int:
  """The largest of 512, 256, 128 dividing `length` (a multiple of 128)."""
  return next(b for b in (512, 256, SPLASH_BLOCK) if length % b == 0)


def _splash_kernel(heads: int, lq: int, lk: int, causal: bool, interpret: bool):
  """Built inside the trace (its mask tables become constants of this computation; cached
  kernels would hold tracers of an earlier trace). The mask is processed with NumPy: cheap."""
  from jax.experimental.pallas.ops.tpu import splash_attention as sa  # pylint: disable=g-import-not-at-top
  mask = sa.CausalMask((lq, lk)) if causal else sa.FullMask((lq, lk))
  bq, bk = _splash_block(lq), _splash_block(lk)
  blocks = sa.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq,
                         block_kv_dkv=bk, block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk)
  return sa.make_splash_mha(sa.MultiHeadMask([mask] * heads), block_sizes=blocks, head_shards=1,
                            q_seq_shards=1, interpret=interpret)


def rows_with_a_key(q_segment_ids: jax.Array, kv_segment_ids: jax.Array,
                    causal: bool = False) -> jax.Array:
  """[B, Lq] bool: the query rows that may attend to at least one key (the others return 0).

  A sort per row (O(L log L)), not an [Lq, Lk] comparison: a row has a key iff its segment id is
  not 0 and occurs among the keys (causal: first at a position <= the query's).
  """
  lq, lk = q_segment_ids.shape[1], kv_segment_ids.shape[1]

  def one(qs, ks):
    order = jnp.argsort(ks, stable=True)
    sorted_ids = ks[order]
    idx = jnp.clip(jnp.searchsorted(sorted_ids, qs, side="left"), 0, lk - 1)
    ok = (sorted_ids[idx] == qs) & (qs != 0)
    if causal:
      ok = ok & (order[idx] <= jnp.arange(lq))
    return ok

  return jax.vmap(one)(q_segment_ids, kv_segment_ids)


def _pad_to(x: jax.Array, axis: int, length: int) -> jax.Array:
  if x.shape[axis] == length:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, length - x.shape[axis])
  return jnp.pad(x, widths)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_segment_ids: jax.Array,
                     kv_segment_ids: jax.Array, *, causal: bool = False,
                     interpret: bool = False) -> jax.Array:
  """JAX's splash attention (TPU) under this module's contract, on one device's shard.

  Splash applies no softmax scale (q is scaled here), needs lengths that are multiples of 128
  (padded here with segment id 0, sliced back), and gives garbage rather than zeros on rows with
  no allowed key: those rows are set to exactly zero (and so get zero gradients).
  """
  from jax.experimental.pallas.ops.tpu import splash_attention as sa  # pylint: disable=g-import-not-at-top
  b, lq, h, d = q.shape
  lk = k.shape[1]
  lq_p, lk_p = (-(-n // SPLASH_BLOCK) * SPLASH_BLOCK for n in (lq, lk))
  valid = rows_with_a_key(q_segment_ids, kv_segment_ids, causal)
  scale = jnp.asarray(d ** -0.5, jnp.float32)
  qs = _pad_to((q.astype(jnp.float32) * scale).astype(q.dtype), 1, lq_p)
  ks, vs = _pad_to(k, 1, lk_p), _pad_to(v, 1, lk_p)
  qseg = _pad_to(q_segment_ids.astype(jnp.int32), 1, lq_p)
  kseg = _pad_to(kv_segment_ids.astype(jnp.int32), 1, lk_p)
  kernel = _splash_kernel(h, lq_p, lk_p, bool(causal), bool(interpret))
  heads_major = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731  [B, L, H, D] -> [B, H, L, D]
  out = jax.vmap(lambda qq, kk, vv, sq, sk: kernel(qq, kk, vv, segment_ids=sa.SegmentIds(sq, sk)))(
      heads_major(qs), heads_major(ks), heads_major(vs), qseg, kseg)
  out = jnp.swapaxes(out, 1, 2)[:, :lq]
  return jnp.where(valid[:, :, None, None], out, 0).astype(q.dtype)


def make_splash_attention(fallback_ok: bool = False, interpret: Optional[bool] = None,
                          mesh: Optional[jax.sharding.Mesh] = None) -> Callable[..., jax.Array]:
  """JAX's TPU splash attention, per device shard; interpret mode when the target is not a TPU.

  With `fallback_ok` ('auto'), a target other than TPU gets `xla_attention` instead.
  """
  platform = target_platform(mesh)
  if platform != "tpu":
    if fallback_ok:
      logging.warning("Splash attention needs a TPU target (got %r); using XLA attention.",
                      platform)
      return xla_attention
    if interpret is None:
      _warn_once(f"Splash attention on {platform!r} runs in interpret mode: correct but slow.")
  interpret = (platform != "tpu") if interpret is None else interpret

  def attend(q, k, v, q_segment_ids, kv_segment_ids, causal: bool = False) -> jax.Array:
    fn = functools.partial(splash_attention, causal=causal, interpret=interpret)
    return per_shard(fn, mesh)(q, k, v, q_segment_ids, kv_segment_ids)

  return attend


# -- cuDNN (GPU) -----------------------------------------------------------------------------------
CUDNN_HEAD_DIMS = "multiples of 8 up to 128 (256 on Hopper)"


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_segment_ids: jax.Array,
                    kv_segment_ids: jax.Array, *, causal: bool = False) -> jax.Array:
  """cuDNN fused attention (`jax.nn.dot_product_attention(implementation='cudnn')`).

  cuDNN has no segment ids: each row is passed as ONE segment of length count(segment id != 0),
  which is the contract exactly when a row is one document followed by padding (what the config
  check enforces). Padding rows are set to zero; a row with no key gets a length of 1 for cuDNN
  (its output is then zeroed) so no NaN reaches the gradients.
  """
  q_len = jnp.sum((q_segment_ids != 0).astype(jnp.int32), axis=1)
  kv_len = jnp.maximum(jnp.sum((kv_segment_ids != 0).astype(jnp.int32), axis=1), 1)
  out = jax.nn.dot_product_attention(q, k, v, scale=q.shape[-1] ** -0.5, is_causal=causal,
                                     query_seq_lengths=jnp.maximum(q_len, 1),
                                     key_value_seq_lengths=kv_len, implementation="cudnn")
  valid = rows_with_a_key(q_segment_ids, kv_segment_ids, causal)
  return jnp.where(valid[:, :, None, None], out, 0).astype(q.dtype)


def make_cudnn_attention(fallback_ok: bool = False,
                         mesh: Optional[jax.sharding.Mesh] = None) -> Callable[..., jax.Array]:
  platform = target_platform(mesh)
  if platform != "gpu":
    msg = f"cuDNN attention needs a GPU target (got {platform!r})"
    if not fallback_ok:
      raise ValueError(msg + "; use config.model.attention='xla', 'pallas' or 'auto'.")
    logging.warning("%s; using XLA attention.", msg)
    return xla_attention

  def attend(q, k, v, q_segment_ids, kv_segment_ids, causal: bool = False) -> jax.Array:
    fn = functools.partial(cudnn_attention, causal=causal)
    return per_shard(fn, mesh)(q, k, v, q_segment_ids, kv_segment_ids)

  return attend


def _check_cudnn(model_cfg: Any, config: Any = None) -> None:
  hd = model_cfg.d_model // model_cfg.num_heads
  if hd % 8 or hd > 256:
    raise ConfigError(f"config.model.attention='cudnn' needs a head dimension that is one of "
                      f"{CUDNN_HEAD_DIMS}, got {hd}; use 'pallas' or 'xla'.")
  if model_cfg.dtype != "bfloat16":
    raise ConfigError("config.model.attention='cudnn' needs config.model.dtype='bfloat16' "
                      f"(cuDNN's fused attention takes 16-bit inputs), got {model_cfg.dtype!r}.")
  if config is None:
    return
  if config.data.packing == "pack":
    raise ConfigError(
        "config.model.attention='cudnn' cannot take packed rows (cuDNN has no segment ids): set "
        "config.data.packing='pad' (one document per row), or use attention='pallas' or 'auto'.")
  if config.method == "did" and config.did.pack:
    raise ConfigError(
        "config.model.attention='cudnn' cannot take DID's packed model rows (did.pack=True puts "
        "two documents in a row and cuDNN has no segment ids): set config.did.pack=False, or use "
        "attention='pallas' or 'auto'.")


def _check_pallas_cfg(model_cfg: Any, config: Any = None) -> None:
  del config
  _check_pallas(model_cfg)


@dataclasses.dataclass(frozen=True)
class Backend:
  """A registered attention backend: `make(fallback_ok, **options) -> attend`, its config check
  `check(model_cfg, config)`, and `auto_for`: the target platforms on which 'auto' picks it
  (the first backend listing a platform wins)."""
  name: str
  make: Callable[..., Callable[..., jax.Array]]
  check: Callable[..., None] = lambda model_cfg, config=None: None
  auto_for: tuple[str, ...] = ()


BACKENDS: dict[str, Backend] = {b.name: b for b in (
    Backend("splash", make_splash_attention, auto_for=("tpu",)),
    Backend("pallas", make_pallas_attention, _check_pallas_cfg, auto_for=("gpu",)),
    Backend("cudnn", make_cudnn_attention, _check_cudnn),
    Backend("xla", _make_xla, auto_for=("cpu", "tpu", "gpu")),
)}


def names() -> tuple[str, ...]:
  return tuple(BACKENDS) + (AUTO,)


def resolve_impl(impl: str, platform: Optional[str] = None) -> str:
  """The backend 'auto' stands for on the target `platform` (default: `target_platform()`, read
  from the mesh being traced for); validates the name."""
  if impl != AUTO and impl not in BACKENDS:
    raise ConfigError(
        f"config.model.attention={impl!r} is not supported; choose one of {names()}.")
  if impl == AUTO:
    platform = platform or target_platform()
    platform = "gpu" if platform in ("cuda", "rocm") else platform
    return next((b.name for b in BACKENDS.values() if platform in b.auto_for), "xla")
  return impl


def check_config(model_cfg: Any, config: Any = None) -> None:
  """Start-up check of config.model.attention (ConfigError naming the field). `config` (the whole
  run config) lets a backend check what it depends on elsewhere (cuDNN: packing)."""
  name = resolve_impl(model_cfg.attention) if model_cfg.attention != AUTO else AUTO
  if name != AUTO:
    BACKENDS[name].check(model_cfg, config)


def get_attention_fn(impl: str, **options) -> Callable[..., jax.Array]:
  """Returns an `attend(q, k, v, q_seg, kv_seg, causal=...)` function for a backend name.

  'auto' resolves for the target platform of the mesh active at trace time (see `target_platform`).
  """
  resolved = resolve_impl(impl, target_platform(options.get("mesh")))
  return BACKENDS[resolved].make(fallback_ok=(impl == AUTO), **options)
