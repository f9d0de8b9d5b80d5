"""Shared pieces of the samplers and decoders: result type, float64 draws, batched sampling.

Everything here is a pure function of arrays and PRNG keys.

Precision of categorical draws: `categorical_f64` samples by Gumbel-max (equivalently the
exponential race argmax_k w_k / E_k) in float64 when `jax_enable_x64` is on. Without 64-bit
mode it falls back to float32, whose uniform grid (step 2^-23) caps the Gumbel noise near 15.9
instead of 36.0 and so slightly lowers the effective temperature (arXiv 2409.02908). Run
samplers under `with jax.enable_x64(True):` for any reported generation metric.
`categorical_inverse_cdf` (the fast decoders) draws the same law by a two-stage inverse CDF in
float64: a float64 uniform resolves probabilities down to 2^-53, so it has no such truncation,
and it needs two uniforms per row instead of V Gumbel variates.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Tuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from dlm_jax import parallel


# Values of `DecodeResult.commit_rule`.
RULE_NEVER = -1
RULE_THRESHOLD = 0  # threshold / top-1 / fixed-k commit
RULE_CONF_CLUSTER = 1  # R2 rule 2: confidence-cluster windows
RULE_TOKEN_CLUSTER = 2  # R2 rule 3: token-cluster runs
RULE_TEMPORAL = 3  # R2 rule 4: temporally stable tokens


@flax.struct.dataclass
class DecodeResult:
  """Output of the blockwise decoders (a pytree).

  Attributes:
    tokens: [B, P+G] int32, prompt followed by the generated slots (a slot never committed,
      e.g. when `max_passes` stopped the decode, still holds `mask_id`).
    nfe: [B] int32, forward passes whose output updated each sample.
    commit_step: [B, G] int32, 0-based pass index (of that sample) at which each generated
      slot was committed; -1 if never.
    commit_conf: [B, G] float32, confidence c of the committed token at commit time; 0 if never.
    commit_rule: [B, G] int8, which rule committed the slot: 0 threshold / top-1 / fixed-k,
      1 confidence cluster, 2 token cluster, 3 temporal; -1 never.
  """
  tokens: jax.Array
  nfe: jax.Array
  commit_step: jax.Array
  commit_conf: jax.Array
  commit_rule: jax.Array


@flax.struct.dataclass
class MaskedLayout:
  """Where a masked decoder generates, per row: prompts, infilling, rows of different lengths.

  Attributes:
    tokens: [B, L] int32, the given tokens, `mask_id` at the slots to generate (and anything
      at padding).
    fill: [B, L] bool, slots to generate; every other slot is never changed.
    valid: [B, L] bool, real slots; False marks right padding, which no real slot attends to.
    gen_pos: [B, G] int32, the fill slots of each row in position order (what blockwise
      decoders split into blocks of `block_len`), L past a row's last one.
    gen_ok: [B, G] bool, False past a row's last fill slot.
  """
  tokens: jax.Array
  fill: jax.Array
  valid: jax.Array
  gen_pos: jax.Array
  gen_ok: jax.Array

  @property
  def gen_len(self) -> int:
    return int(self.gen_pos.shape[1])


def masked_layout(tokens: np.ndarray, fill: np.ndarray, valid: np.ndarray | None,
                  mask_id: int, block_len: int = 1) -> MaskedLayout:
  """A `MaskedLayout` (host arrays) from given tokens and fill slots.

  The fill slots of each row are listed in position order and the list is padded to a common
  length G, a multiple of `block_len` (so a row's last block may hold fewer slots).

  Args:
    tokens: [B, L] int; values at fill slots are replaced by mask_id.
    fill: [B, L] bool slots to generate.
    valid: [B, L] bool real slots, or None (all real); fill slots must be valid.
    mask_id: id of [MASK].
    block_len: blocks of the blockwise decoders (1 for ancestral).
  """
  tokens = np.asarray(tokens, np.int32)
  fill = np.asarray(fill, bool)
  b, length = tokens.shape
  valid = np.ones((b, length), bool) if valid is None else np.asarray(valid, bool)
  if fill.shape != tokens.shape or valid.shape != tokens.shape:
    raise ValueError(f"tokens {tokens.shape}, fill {fill.shape} and valid {valid.shape} must "
                     "have one shape [B, L].")
  if np.any(fill & ~valid):
    raise ValueError("fill slots must be valid (not padding).")
  counts = fill.sum(axis=1)
  g = max(int(counts.max(initial=0)), 1)
  g = -(-g // int(block_len)) * int(block_len)
  gen_pos = np.full((b, g), length, np.int32)
  for i in range(b):
    where = np.nonzero(fill[i])[0]
    gen_pos[i, :len(where)] = where
  gen_ok = np.arange(g)[None, :] < counts[:, None]
  return MaskedLayout(tokens=np.where(fill, mask_id, tokens).astype(np.int32), fill=fill,
                      valid=valid, gen_pos=gen_pos, gen_ok=gen_ok)


def prefix_layout(prompt: np.ndarray, gen_len: int, mask_id: int,
                  block_len: int = 1) -> MaskedLayout:
  """The layout of a prefix prompt [B, P] followed by gen_len slots to generate."""
  prompt = np.asarray(prompt, np.int32)
  b, p = prompt.shape
  tokens = np.concatenate([prompt, np.full((b, gen_len), mask_id, np.int32)], axis=1)
  fill = np.broadcast_to(np.arange(p + gen_len) >= p, tokens.shape)
  return masked_layout(tokens, fill, None, mask_id, block_len)


def sampling_dtype() -> jnp.dtype:
  """float64 when `jax_enable_x64` is on, else float32 (the documented fallback)."""
  return jnp.dtype(jnp.float64) if jax.config.jax_enable_x64 else jnp.dtype(jnp.float32)


def gumbel_from_uniform(u: jax.Array) -> jax.Array:
  """Gumbel(0, 1) noise -log(-log u) in u's dtype; u in (0, 1)."""
  return -jnp.log(-jnp.log(u))


def max_gumbel(dtype) -> float:
  """Largest Gumbel value reachable from `jax.random.uniform` in `dtype` (u = 1 - eps).

  About 15.94 for float32 and 36.04 for float64 (oracle O11).
  """
  eps = float(jnp.finfo(dtype).eps)
  return float(-np.log(-np.log1p(-eps)))


def gumbel_noise(key: jax.Array, shape: Tuple[int, ...]) -> jax.Array:
  """Gumbel(0, 1) noise of `shape` in `sampling_dtype()` (float64 under x64)."""
  dtype = sampling_dtype()
  tiny = jnp.finfo(dtype).tiny
  u = jax.random.uniform(key, shape, dtype=dtype, minval=tiny, maxval=1.0)
  return gumbel_from_uniform(u)


def categorical_f64(key: jax.Array, log_weights: jax.Array) -> jax.Array:
  """Draws idx ~ Categorical(w) from unnormalised log weights along the last axis.

  Gumbel-max (the exponential race) computed in float64 when `jax_enable_x64` is on,
  float32 otherwise. Entries equal to -inf are never drawn (unless all are -inf).

  Args:
    key: PRNG key.
    log_weights: [..., K] log of unnormalised weights (any float dtype; cast up).

  Returns:
    [...] int32 indices in [0, K).
  """
  dtype = sampling_dtype()
  lw = log_weights.astype(dtype)
  scores = lw + gumbel_noise(key, lw.shape)
  return jnp.argmax(scores, axis=-1).astype(jnp.int32)


def categorical_inverse_cdf(key: jax.Array, log_weights: jax.Array, block: int = 128) -> jax.Array:
  """Draws idx ~ Categorical(w) from unnormalised log weights [K, V] by inverse CDF, in float64
  under x64 (float32 otherwise): a block of `block` ids by its total weight, then an id within
  it, each with its own uniform. Exact (up to float rounding): P(id) = w_id / sum w. Two
  uniforms per row instead of V Gumbel variates and their logs, which at V = 50k is most of a
  Gumbel-max draw's cost; ids of weight 0 (-inf) are never drawn.

  Args:
    key: PRNG key.
    log_weights: [K, V] (any float dtype; cast up); rows must have a finite entry.
    block: ids per block of the first stage.

  Returns:
    [K] int32 indices in [0, V).
  """
  dtype = sampling_dtype()
  lw = log_weights.astype(dtype)
  k, v = lw.shape
  vp = -(-v // block) * block
  lw = jnp.pad(lw, ((0, 0), (0, vp - v)), constant_values=-jnp.inf)
  w = jnp.exp(lw - jnp.max(lw, axis=-1, keepdims=True)).reshape(k, vp // block, block)
  k1, k2 = jax.random.split(key)

  def pick(weights, u):  # weights [K, n] >= 0: index of the bucket holding u * total
    cdf = jnp.cumsum(weights, axis=-1)
    idx = jnp.sum(cdf <= (u * cdf[:, -1])[:, None], axis=-1)
    last = weights.shape[-1] - 1 - jnp.argmax((weights > 0)[:, ::-1], axis=-1)
    return jnp.minimum(idx, last)  # u * total rounding up to the total

  blk = pick(jnp.sum(w, axis=-1), jax.random.uniform(k1, (k,), dtype))
  inner = jnp.take_along_axis(w, blk[:, None, None], axis=1)[:, 0]
  j = pick(inner, jax.random.uniform(k2, (k,), dtype))
  return (blk * block + j).astype(jnp.int32)


def sample_in_batches(sample_one: Callable[[jax.Array], dict[str, Any]], num_samples: int,
                      batch_size: int, seed: int, mesh: Any) -> dict[str, Any]:
  """Runs `sample_one(key)` over ceil(num_samples / batch_size) batches and merges them on host.

  Batch i uses key fold_in(key(seed), i), so samplers driven through this share their draws.
  Per-sample arrays are concatenated and cut to num_samples; anything else is taken from the
  first batch. Adds wall_sec (sampling and transfer time, compilation included).
  """
  outs, wall = [], 0.0
  for i in range(-(-int(num_samples) // int(batch_size))):
    key = jax.random.fold_in(jax.random.key(seed), i)
    t0 = time.perf_counter()
    with parallel.sharding_context(mesh):
      out = jax.device_get(sample_one(key))
    wall += time.perf_counter() - t0
    outs.append(out)
  merged: dict[str, Any] = {}
  for k in outs[0]:
    if isinstance(outs[0][k], np.ndarray) and outs[0][k].ndim >= 1:
      merged[k] = np.concatenate([o[k] for o in outs])[:int(num_samples)]
    else:
      merged[k] = outs[0][k]
  merged["wall_sec"] = wall
  return merged
