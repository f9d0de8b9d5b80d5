"""The denoiser: a pre-LN transformer with RoPE (or learned positions) and optional adaLN time conditioning.

One module serves every method. With `causal=False` it is MDLM's / DID's bidirectional
denoiser (DiT-style: adaLN modulation from a time embedding when `time_conditioning`), with
`causal=True` it is the autoregressive LM used as TRIMS teacher and gen-PPL judge.

The options `adaln_always`, `ln_scale_with_adaln`, `ln_eps`, `ln_fast_variance` and
`rope_freqs` (all off by default) make it the published PyTorch MDLM `DIT` denoiser, so that
its weights can be imported (`dlm_jax.import_mdlm`, mapping in `models/pytorch_dit.py`).

Parameters carry logical axis names (`embed`, `mlp`, `heads`, `kv`, `vocab`); activations are
constrained to (`batch`, `length`, `embed`). `dlm_jax.parallel` maps these onto the mesh.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
import numpy as np

from dlm_jax.models import attention as attention_lib

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# Rematerialisation per block (`config.model.remat`): what a block keeps for the backward pass.
#   none       everything XLA keeps (no recomputation);
#   full       only the block's input: the whole block is recomputed (about +1 forward of FLOPs);
#   attention  the block's input and its attention output: the matmuls, norms and MLP are
#              recomputed, attention (the kernel call) is not;
#   dots       the outputs of the weight matmuls and of attention: only elementwise work (norms,
#              GELU, RoPE, adaLN) is recomputed; most of remat's saving on the [L, 4d] MLP input
#              to GELU, little extra compute.
ATTENTION_OUT = "attention_out"
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "attention": jax.checkpoint_policies.save_only_these_names(ATTENTION_OUT),
    "dots": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names(ATTENTION_OUT)),
}


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Static architecture of a transformer (hashable, so it can live in a Flax module)."""
  vocab_size: int
  num_layers: int = 4
  d_model: int = 256
  num_heads: int = 4
  mlp_ratio: int = 4
  max_len: int = 1024
  dropout: float = 0.0
  dtype: str = "float32"
  attention: str = "xla"
  causal: bool = False
  time_conditioning: bool = False
  cond_dim: int = 128
  aux_outputs: int = 0
  rope_theta: float = 10000.0
  position_embedding: str = "rope"  # rope | learned (absolute, [max_len, d], added to the input)
  remat: str = "none"  # REMAT_POLICIES
  tie_embeddings: bool = False
  # The published PyTorch MDLM DiT (defaults keep the dlm-jax network):
  adaln_always: bool = False         # time MLP + adaLN even without time_conditioning (fed t = 0)
  ln_scale_with_adaln: bool = False  # LayerNorm keeps its learned scale where adaLN modulates too
  ln_eps: float = 1e-6
  ln_fast_variance: bool = True      # var = E[x^2] - E[x]^2 (False: the two-pass E[(x - mean)^2])
  rope_freqs: str = "neg_power"      # neg_power: theta^(-2i/D) | reciprocal: 1 / theta^(2i/D)

  @property
  def conditioned(self) -> bool:
    """Whether the network has the time MLP and adaLN modulation."""
    return self.time_conditioning or self.adaln_always

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  @classmethod
  def from_config(cls, model_cfg: Any, vocab_size: int) -> "TransformerConfig":
    fields = {f.name for f in dataclasses.fields(cls)} - {"vocab_size"}
    kw = {k: model_cfg[k] for k in fields if k in model_cfg}
    return cls(vocab_size=vocab_size, **kw)


class Linear(nn.Module):
  """x [..., *in] @ kernel [*in, *features] (+ bias), kernel initialised at full rank.

  `axes` names every kernel dimension (inputs then outputs) for the sharding rules.
  """
  features: tuple[int, ...]
  axes: tuple[str, ...]
  n_in: int = 1
  use_bias: bool = True
  dtype: Any = jnp.float32
  zero_init: bool = False

  @nn.compact
  def __call__(self, x):
    in_shape = x.shape[-self.n_in:]
    n_out = len(self.features)
    if self.zero_init:
      init = nn.initializers.zeros_init()
    else:
      init = nn.initializers.variance_scaling(
          1.0, "fan_in", "truncated_normal", in_axis=tuple(range(self.n_in)),
          out_axis=tuple(range(self.n_in, self.n_in + n_out)))
    kernel = self.param("kernel", nn.with_logical_partitioning(init, self.axes),
                        tuple(in_shape) + tuple(self.features), jnp.float32)
    contract = (tuple(range(x.ndim - self.n_in, x.ndim)), tuple(range(self.n_in)))
    y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), (contract, ((), ())))
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                             self.axes[self.n_in:]),
                        tuple(self.features), jnp.float32)
      y = y + bias.astype(self.dtype)
    return y


def dense(features, axes, name, dtype, use_bias=True, zero=False, n_in=1):
  features = (features,) if isinstance(features, int) else tuple(features)
  return Linear(features, tuple(axes), n_in=n_in, use_bias=use_bias, dtype=dtype,
                zero_init=zero, name=name)


ROPE_FREQS = ("neg_power", "reciprocal")


def rope_inv_freq(d: int, theta: float, formula: str = "neg_power") -> jax.Array:
  """The D/2 rotary frequencies in float32: theta^(-2i/D), or 1 / theta^(2i/D) ('reciprocal').

  The two are equal in real arithmetic; in float32 they differ by an ulp in some entries.
  'reciprocal' is the published PyTorch MDLM's buffer: float32 exponents, the power rounded to
  float32 from float64, a float32 reciprocal (a constant: d and theta are static). That equals
  torch's values bit for bit for D = 16, 32, 64, 128 (D = 96: one entry is an ulp apart).
  """
  if formula == "neg_power":
    return theta ** (-jnp.arange(0, d // 2, dtype=jnp.float32) * 2.0 / d)
  if formula == "reciprocal":
    exponent = np.arange(0, d // 2, dtype=np.float32) * np.float32(2.0) / np.float32(d)
    power = (np.float64(theta) ** exponent.astype(np.float64)).astype(np.float32)
    return jnp.asarray(np.float32(1.0) / power)
  raise ValueError(f"model.rope_freqs={formula!r}; use one of {ROPE_FREQS}.")


def rope(x: jax.Array, positions: jax.Array, theta: float, formula: str = "neg_power") -> jax.Array:
  """Rotary position embedding on [B, L, H, D] with integer positions [B, L].

  Non-interleaved halves: dimension j pairs with j + D/2.
  """
  freqs = rope_inv_freq(x.shape[-1], theta, formula)
  angles = positions.astype(jnp.float32)[:, :, None, None] * freqs  # [B, L, 1, D/2]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def timestep_embedding(t: jax.Array, dim: int = 256, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding of a scalar per example [B] -> [B, dim] (or per token [B, L] -> [B, L, dim])."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[..., None] * freqs
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class LayerNorm(nn.Module):
  """LayerNorm in float32 without bias, with an optional learned scale (by default none when
  adaLN modulates it)."""
  use_scale: bool = True
  epsilon: float = 1e-6
  use_fast_variance: bool = True

  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm(epsilon=self.epsilon, use_bias=False, use_scale=self.use_scale,
                     use_fast_variance=self.use_fast_variance, dtype=jnp.float32,
                     param_dtype=jnp.float32,
                     scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)))(
                         x.astype(jnp.float32))
    return y.astype(x.dtype)


def _per_token(mod: jax.Array, index: jax.Array | None) -> jax.Array:
  """Modulation [B, F] (per row), [B, L, F] (per token) or [B, S, F] + index [B, L] -> [B, 1|L, F]."""
  if index is not None:
    return jnp.take_along_axis(mod, index[:, :, None].astype(jnp.int32), axis=1)
  return mod[:, None, :] if mod.ndim == 2 else mod


def _layer_norm(cfg: TransformerConfig, modulated: bool, name: str) -> LayerNorm:
  return LayerNorm(use_scale=not modulated or cfg.ln_scale_with_adaln, epsilon=cfg.ln_eps,
                   use_fast_variance=cfg.ln_fast_variance, name=name)


class Block(nn.Module):
  """Attention + MLP block, pre-LN, with adaLN-zero modulation when `cond` is given."""
  cfg: TransformerConfig

  @nn.compact
  def __call__(self, x, cond, positions, segment_ids, deterministic: bool, cond_index=None):
    cfg = self.cfg
    dtype = DTYPES[cfg.dtype]
    h, hd = cfg.num_heads, cfg.head_dim
    if cond is not None:
      mod = dense(6 * cfg.d_model, ("cond", "embed"), "adaln", jnp.float32, zero=True)(cond)
      mod = _per_token(mod, cond_index).astype(dtype)
      shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(mod, 6, axis=-1)
    else:
      shift1 = shift2 = 0.0
      scale1 = scale2 = 0.0
      gate1 = gate2 = 1.0

    y = _layer_norm(cfg, cond is not None, "ln_attn")(x) * (1 + scale1) + shift1
    qkv = dense((3, h, hd), ("embed", "qkv", "heads", "kv"), "qkv", dtype, use_bias=False)(y)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if cfg.position_embedding == "rope":
      q = rope(q, positions, cfg.rope_theta, cfg.rope_freqs)
      k = rope(k, positions, cfg.rope_theta, cfg.rope_freqs)
    q = nn.with_logical_constraint(q, ("batch", "length", "heads", "kv"))
    k = nn.with_logical_constraint(k, ("batch", "length", "heads", "kv"))
    v = nn.with_logical_constraint(v, ("batch", "length", "heads", "kv"))
    attend = attention_lib.get_attention_fn(cfg.attention)
    o = attend(q, k, v, segment_ids, segment_ids, causal=cfg.causal)
    o = checkpoint_name(o, ATTENTION_OUT)
    o = dense(cfg.d_model, ("heads", "kv", "embed"), "attn_out", dtype, use_bias=False,
              n_in=2)(o)
    o = nn.Dropout(cfg.dropout)(o, deterministic=deterministic)
    x = x + gate1 * o
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

    y = _layer_norm(cfg, cond is not None, "ln_mlp")(x) * (1 + scale2) + shift2
    y = dense(cfg.mlp_ratio * cfg.d_model, ("embed", "mlp"), "mlp_in", dtype)(y)
    y = nn.gelu(y, approximate=True)
    y = nn.with_logical_constraint(y, ("batch", "length", "mlp"))
    y = dense(cfg.d_model, ("mlp", "embed"), "mlp_out", dtype)(y)
    y = nn.Dropout(cfg.dropout)(y, deterministic=deterministic)
    x = x + gate2 * y
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class Transformer(nn.Module):
  """Denoiser / LM trunk.

  __call__(tokens [B, L] int32, positions [B, L] int32, segment_ids [B, L] int32,
           t [B] float32 | None, deterministic) -> (logits [B, L, V] float32, aux [B, L, A] | None)

  `t` is used only when `cfg.time_conditioning` or `cfg.adaln_always`: [B] (one time per row),
  [B, L] (one per token), or [B, S] with `t_index` [B, L] naming the entry of each token (DID rows
  that pack S documents noised at different times: the time MLP and every adaLN projection then
  run S times per row instead of L times, which is most of their cost); `aux` only when
  `cfg.aux_outputs > 0`. With `adaln_always` and no time conditioning, `t=None` means t = 0 (the
  published MDLM feeds sigma = 0 to its conditioned network); a given `t` is used as is.
  With `features_only` the head is skipped and the first output is the final normalised hidden
  state [B, L, d] (for a loss that fuses the head, see `output_head.masked_head_nll`).
  """
  cfg: TransformerConfig

  @nn.compact
  def __call__(self, tokens, positions=None, segment_ids=None, t=None, deterministic=True,
               features_only=False, t_index=None):
    cfg = self.cfg
    dtype = DTYPES[cfg.dtype]
    b, length = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
    if segment_ids is None:
      segment_ids = jnp.ones((b, length), jnp.int32)
    embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=dtype, param_dtype=jnp.float32,
                     embedding_init=nn.with_logical_partitioning(
                         nn.initializers.normal(1.0), ("vocab", "embed")), name="embed")
    x = embed(tokens)
    if cfg.position_embedding == "learned":
      table = self.param("pos_embed", nn.with_logical_partitioning(
          nn.initializers.normal(0.02), ("length", "embed")), (cfg.max_len, cfg.d_model), jnp.float32)
      x = x + jnp.take(table, positions, axis=0).astype(dtype)
    elif cfg.position_embedding != "rope":
      raise ValueError(f"model.position_embedding={cfg.position_embedding!r}; use 'rope' or 'learned'.")
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

    cond = None
    if cfg.conditioned:
      if t is None:
        if cfg.time_conditioning:
          raise ValueError("This model has time_conditioning=True and needs `t`.")
        t = jnp.zeros((b,), jnp.float32)
      c = timestep_embedding(t)
      c = dense(cfg.cond_dim, ("time", "cond"), "t_mlp_in", jnp.float32)(c)
      c = dense(cfg.cond_dim, ("cond", "cond2"), "t_mlp_out", jnp.float32)(nn.silu(c))
      cond = nn.silu(c)

    block = Block
    remat = {True: "full", False: "none"}.get(cfg.remat, cfg.remat)  # older configs: a bool
    if remat not in REMAT_POLICIES:
      raise ValueError(f"model.remat={cfg.remat!r}; choose one of {tuple(REMAT_POLICIES)}.")
    if remat != "none":
      block = nn.remat(Block, static_argnums=(5,), policy=REMAT_POLICIES[remat])
    for i in range(cfg.num_layers):
      x = block(cfg, name=f"block_{i}")(x, cond, positions, segment_ids, deterministic, t_index)

    if cond is not None:
      mod = dense(2 * cfg.d_model, ("cond", "embed"), "final_adaln", jnp.float32, zero=True)(cond)
      shift, scale = jnp.split(_per_token(mod, t_index).astype(dtype), 2, axis=-1)
      y = _layer_norm(cfg, True, "ln_final")(x) * (1 + scale) + shift
    else:
      y = _layer_norm(cfg, False, "ln_final")(x)
    if features_only:  # the caller applies params["head"] itself (models/output_head.py)
      return y, None
    if cfg.tie_embeddings:
      logits = embed.attend(y.astype(jnp.float32)) / math.sqrt(cfg.d_model)
    else:
      logits = dense(cfg.vocab_size, ("embed", "vocab"), "head", dtype)(y)
    logits = logits.astype(jnp.float32)
    logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
    aux = None
    if cfg.aux_outputs:
      aux = dense(cfg.aux_outputs, ("embed", "aux"), "aux_head", jnp.float32)(y).astype(jnp.float32)
    return logits, aux
