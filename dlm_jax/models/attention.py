"""Multi-head attention for the denoisers: the XLA reference path and the backend switch.

Every attention backend in dlm-jax shares one contract:

    attend(q, k, v, q_segment_ids, kv_segment_ids, *, causal=False) -> out

  q: [B, Lq, H, D], k/v: [B, Lk, H, D] (same dtype: float32 or bfloat16)
  q_segment_ids: [B, Lq] int32, kv_segment_ids: [B, Lk] int32
  out: [B, Lq, H, D] in q's dtype

A query attends to a key iff both carry the same segment id and that id is not 0 (0 marks
padding), and, when `causal`, the key position is not after the query position. A query row
with no allowed key (a fully padded row) returns exactly zero, never NaN. Logits and the
softmax are computed in float32 whatever the input dtype.
"""

from __future__ import annotations

import logging
from typing import Callable

import jax
import jax.numpy as jnp

ATTENTION_IMPLS = ("xla", "pallas", "auto")


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


def resolve_impl(impl: str) -> str:
  """Maps 'auto' to 'pallas' on TPU/GPU and 'xla' on CPU; validates the name."""
  if impl not in ATTENTION_IMPLS:
    raise ValueError(
        f"config.model.attention={impl!r} is not supported; choose one of {ATTENTION_IMPLS}.")
  if impl == "auto":
    return "pallas" if jax.default_backend() in ("tpu", "gpu") else "xla"
  return impl


def get_attention_fn(impl: str, **kernel_options) -> Callable[..., jax.Array]:
  """Returns an `attend(q, k, v, q_seg, kv_seg, causal=...)` function for a backend name."""
  requested = impl
  impl = resolve_impl(impl)
  if impl == "xla":
    return xla_attention
  try:
    from dlm_jax.kernels import flash_attention  # pylint: disable=g-import-not-at-top
  except ImportError as e:  # pragma: no cover - kernel module missing
    if requested == "auto":
      logging.warning("Pallas attention unavailable (%s); falling back to XLA.", e)
      return xla_attention
    raise
  return flash_attention.make_attention_fn(fallback_ok=(requested == "auto"), **kernel_options)
