"""The published PyTorch MDLM denoiser (`DIT`, github kuleshov-group/mdlm) <-> our parameter tree.

Its state dict (a Lightning checkpoint's `state_dict`, the Hugging Face `model.safetensors`) names
every tensor `backbone.<module>...`; this module maps those tensors onto the parameters of
`models.transformer.Transformer` built with the published network's options (`dit_model_options`)
and back. Only transposes and reshapes are used, so both directions are exact in any dtype.

  sizes = infer_sizes(state_dict, num_heads=12)        # checks every key and shape first
  params = to_params(state_dict, sizes)                # nested dict of numpy arrays
  state_dict2 = to_state_dict(params, sizes)           # the same tensors, in the published order

Layout (torch `nn.Linear.weight` is [out, in]; our kernels are [in, out...]):

  vocab_embed.embedding [V, d]            embed/embedding [V, d]
  sigma_map.mlp.0 / .2 (Linear)           t_mlp_in / t_mlp_out  (kernel = weight.T, bias)
  rotary_emb.inv_freq [Dh/2] (a buffer)   not a parameter: 1 / theta^(2i/Dh), model.rope_freqs
  blocks.i.norm1.weight [d]               block_i/ln_attn/LayerNorm_0/scale
  blocks.i.attn_qkv.weight [3d, d]        block_i/qkv/kernel [d, 3, H, Dh]: rows are (q|k|v, head, Dh)
  blocks.i.attn_out.weight [d, d]         block_i/attn_out/kernel [H, Dh, d]
  blocks.i.norm2.weight [d]               block_i/ln_mlp/LayerNorm_0/scale
  blocks.i.mlp.0 / .2 (Linear)            block_i/mlp_in / mlp_out
  blocks.i.adaLN_modulation (Linear)      block_i/adaln (columns: shift, scale, gate of attention, then of MLP)
  output_layer.norm_final.weight [d]      ln_final/LayerNorm_0/scale
  output_layer.linear (Linear)            head (untied, with bias)
  output_layer.adaLN_modulation (Linear)  final_adaln (columns: shift, scale)
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import numpy as np

from dlm_jax.models import transformer

PREFIX = "backbone."
INV_FREQ = "rotary_emb.inv_freq"
FREQ_DIM = 256  # width of the sinusoidal sigma embedding (timestep_embedding's default)

# The model options that make our transformer the published network (config.model fields).
DIT_MODEL_OPTIONS = dict(adaln_always=True, ln_scale_with_adaln=True, ln_eps=1e-5,
                         ln_fast_variance=False, rope_freqs="reciprocal", position_embedding="rope",
                         tie_embeddings=False, causal=False, aux_outputs=0)


class StateDictError(ValueError):
  """A state dict whose keys or shapes do not fit the published network of the given sizes."""


@dataclasses.dataclass(frozen=True)
class DitSizes:
  """What the tensors' shapes say (num_heads and rope_theta excepted: given or from inv_freq)."""
  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  cond_dim: int
  mlp_ratio: int
  rope_theta: float = 10000.0

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  def model_fields(self) -> dict[str, Any]:
    """config.model fields (vocab_size comes from the tokenizer)."""
    return dict(num_layers=self.num_layers, d_model=self.d_model, num_heads=self.num_heads,
                cond_dim=self.cond_dim, mlp_ratio=self.mlp_ratio, rope_theta=self.rope_theta)


def expected_shapes(s: DitSizes, with_inv_freq: bool = True) -> dict[str, tuple[int, ...]]:
  """Every key of the published state dict (without the prefix) and its shape, in its order."""
  d, c, v, m = s.d_model, s.cond_dim, s.vocab_size, s.mlp_ratio * s.d_model
  out = {"vocab_embed.embedding": (v, d),
         "sigma_map.mlp.0.weight": (c, FREQ_DIM), "sigma_map.mlp.0.bias": (c,),
         "sigma_map.mlp.2.weight": (c, c), "sigma_map.mlp.2.bias": (c,)}
  if with_inv_freq:
    out[INV_FREQ] = (s.head_dim // 2,)
  for i in range(s.num_layers):
    b = f"blocks.{i}."
    out.update({b + "norm1.weight": (d,), b + "attn_qkv.weight": (3 * d, d),
                b + "attn_out.weight": (d, d), b + "norm2.weight": (d,),
                b + "mlp.0.weight": (m, d), b + "mlp.0.bias": (m,),
                b + "mlp.2.weight": (d, m), b + "mlp.2.bias": (d,),
                b + "adaLN_modulation.weight": (6 * d, c), b + "adaLN_modulation.bias": (6 * d,)})
  out.update({"output_layer.norm_final.weight": (d,),
              "output_layer.linear.weight": (v, d), "output_layer.linear.bias": (v,),
              "output_layer.adaLN_modulation.weight": (2 * d, c),
              "output_layer.adaLN_modulation.bias": (2 * d,)})
  return out


def parameter_names(s: DitSizes) -> list[str]:
  """The keys of the trainable parameters in `module.parameters()` order (buffers left out).

  This is the order of a Lightning checkpoint's `ema['shadow_params']` list.
  """
  return [k for k in expected_shapes(s, with_inv_freq=False)]


def strip_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """Drops the leading `backbone.` (repeated when the HF model was wrapped again) of every key."""
  out = {}
  for k, v in state_dict.items():
    while k.startswith(PREFIX):
      k = k[len(PREFIX):]
    out[k] = v
  return out


def _shape(x: Any) -> tuple[int, ...]:
  return tuple(int(n) for n in np.shape(x))


def _need(sd: Mapping[str, Any], key: str, what: str) -> tuple[int, ...]:
  if key not in sd:
    raise StateDictError(f"{PREFIX}{key} is missing: expected {what}. Is this a state dict of "
                         "the published MDLM DIT (keys backbone.vocab_embed.embedding, "
                         f"backbone.blocks.0.attn_qkv.weight, ...)? Its first keys: "
                         f"{[PREFIX + k for k in list(sd)[:4]]}.")
  return _shape(sd[key])


def rope_inv_freq(head_dim: int, theta: float) -> np.ndarray:
  """The published buffer 1 / theta^(2i/Dh) as our rotary embedding computes it (float32)."""
  return np.asarray(transformer.rope_inv_freq(head_dim, theta, "reciprocal"), np.float32)


def infer_sizes(state_dict: Mapping[str, Any], num_heads: int | None = None,
                given: Mapping[str, int] | None = None) -> DitSizes:
  """The sizes of the network the tensors belong to; checks every key and shape against them.

  Args:
    state_dict: tensors by published name (`backbone.` prefix optional).
    num_heads: the number of attention heads (not in any weight shape). Without it, it is read
      from `rotary_emb.inv_freq` ([head_dim / 2]) when that buffer is present.
    given: sizes stated elsewhere (a Hugging Face config.json): d_model, num_layers, cond_dim,
      vocab_size, num_heads; the tensors must fit them.

  Raises:
    StateDictError naming the first key (in the published order) that is missing, has another
    shape than the sizes imply, or is not part of the network.
  """
  sd = strip_prefix(state_dict)
  given = dict(given or {})
  emb = _need(sd, "vocab_embed.embedding", "[vocab_size, hidden] token embedding")
  if len(emb) != 2:
    raise StateDictError(f"{PREFIX}vocab_embed.embedding has shape {emb}, expected "
                         "[vocab_size, hidden].")
  v, d = emb
  c_shape = _need(sd, "sigma_map.mlp.0.weight", f"[cond_dim, {FREQ_DIM}] time MLP weight")
  if len(c_shape) != 2:
    raise StateDictError(f"{PREFIX}sigma_map.mlp.0.weight has shape {c_shape}, expected "
                         f"[cond_dim, {FREQ_DIM}].")
  cond = c_shape[0]
  blocks = sorted({int(m.group(1)) for k in sd for m in [re.match(r"blocks\.(\d+)\.", k)] if m})
  num_layers = len(blocks)
  if blocks != list(range(num_layers)):
    missing = min(set(range(max(blocks) + 1)) - set(blocks))
    raise StateDictError(f"{PREFIX}blocks.{missing}.* is missing: the blocks present are "
                         f"{blocks}, expected 0..{max(blocks)}.")
  if num_layers == 0:
    raise StateDictError(f"{PREFIX}blocks.0.attn_qkv.weight is missing: no transformer block in "
                         "the state dict.")
  mlp = _need(sd, "blocks.0.mlp.0.weight", "[mlp_hidden, hidden] MLP weight")
  if len(mlp) != 2 or mlp[0] % d:
    raise StateDictError(f"{PREFIX}blocks.0.mlp.0.weight has shape {mlp}, expected "
                         f"[a multiple of hidden {d}, {d}].")
  mlp_ratio = mlp[0] // d
  inferred = dict(d_model=d, vocab_size=v, cond_dim=cond, num_layers=num_layers)
  for name, value in given.items():
    if name in inferred and value is not None and int(value) != inferred[name]:
      key = {"d_model": "vocab_embed.embedding", "vocab_size": "vocab_embed.embedding",
             "cond_dim": "sigma_map.mlp.0.weight", "num_layers": f"blocks.{num_layers - 1}"}[name]
      raise StateDictError(f"{PREFIX}{key}: the tensors give {name}={inferred[name]} but the "
                           f"given config says {value}.")
  if num_heads is None:
    num_heads = given.get("num_heads")
  elif given.get("num_heads") is not None and int(given["num_heads"]) != int(num_heads):
    raise StateDictError(f"n_heads={num_heads} was given but the checkpoint's config says "
                         f"n_heads {given['num_heads']}; drop the flag or fix it.")
  theta = 10000.0
  if INV_FREQ in sd:
    half = _shape(sd[INV_FREQ])
    if len(half) != 1 or half[0] < 1 or d % (2 * half[0]):
      raise StateDictError(f"{PREFIX}{INV_FREQ} has shape {half}, expected [head_dim / 2] with "
                           f"head_dim dividing hidden {d}.")
    from_buffer = d // (2 * half[0])
    if num_heads is None:
      num_heads = from_buffer
    elif int(num_heads) != from_buffer:
      raise StateDictError(f"{PREFIX}{INV_FREQ} has shape {half}, expected "
                           f"({d // int(num_heads) // 2},) for n_heads={num_heads} (hidden {d}): "
                           f"the buffer says n_heads={from_buffer}.")
    theta = _rope_theta(np.asarray(sd[INV_FREQ], np.float32), 2 * half[0])
  if num_heads is None:
    raise StateDictError("n_heads is not in any weight shape (and the state dict has no "
                         f"{PREFIX}{INV_FREQ} buffer): give it (--n_heads; 12 for mdlm-owt).")
  num_heads = int(num_heads)
  if num_heads < 1 or d % num_heads or (d // num_heads) % 2:
    raise StateDictError(f"n_heads={num_heads} does not fit hidden {d} "
                         f"({PREFIX}vocab_embed.embedding {emb}): the head dimension hidden / "
                         "n_heads must be a whole even number.")
  sizes = DitSizes(vocab_size=v, d_model=d, num_layers=num_layers, num_heads=num_heads,
                   cond_dim=cond, mlp_ratio=mlp_ratio, rope_theta=theta)
  check_state_dict(sd, sizes)
  return sizes


def _rope_theta(inv_freq: np.ndarray, head_dim: int) -> float:
  """The rotary base that gives this buffer (10000 in every published config)."""
  for theta in (10000.0,) + ((float(np.round(inv_freq[1] ** (-head_dim / 2.0))),)
                              if inv_freq.size > 1 and inv_freq[1] > 0 else ()):
    if np.allclose(inv_freq, rope_inv_freq(head_dim, theta), rtol=1e-6, atol=0):
      return theta
  raise StateDictError(f"{PREFIX}{INV_FREQ} = {inv_freq[:4].tolist()}... is not 1 / theta^(2i/"
                       f"{head_dim}) for any rotary base theta: this is not the published rotary "
                       "embedding.")


def check_state_dict(state_dict: Mapping[str, Any], sizes: DitSizes) -> None:
  """Raises StateDictError naming the first key that is missing, mis-shaped or unexpected."""
  sd = strip_prefix(state_dict)
  want = expected_shapes(sizes)
  for key, shape in want.items():
    if key not in sd:
      if key == INV_FREQ:  # a buffer: optional (recomputed from the sizes)
        continue
      raise StateDictError(f"{PREFIX}{key} is missing: expected a tensor of shape {shape} for "
                           f"{_describe(sizes)}.")
    got = _shape(sd[key])
    if got != shape:
      raise StateDictError(f"{PREFIX}{key} has shape {got}, expected {shape} for "
                           f"{_describe(sizes)}.")
  extra = [k for k in sd if k not in want]
  if extra:
    raise StateDictError(f"{PREFIX}{extra[0]} is not part of the published DIT of "
                         f"{_describe(sizes)} ({len(extra)} unexpected key(s)).")


def _describe(s: DitSizes) -> str:
  return (f"hidden {s.d_model}, {s.num_layers} blocks, n_heads {s.num_heads}, cond_dim "
          f"{s.cond_dim}, vocab {s.vocab_size}, mlp {s.mlp_ratio}x")


def to_params(state_dict: Mapping[str, Any], sizes: DitSizes) -> dict[str, Any]:
  """Published tensors -> our parameter tree (nested dicts of numpy arrays, dtype kept)."""
  sd = {k: np.asarray(v) for k, v in strip_prefix(state_dict).items()}
  check_state_dict(sd, sizes)
  d, h, hd = sizes.d_model, sizes.num_heads, sizes.head_dim

  def linear(name):
    return {"kernel": np.ascontiguousarray(sd[name + ".weight"].T), "bias": sd[name + ".bias"]}

  def scale(name):
    return {"LayerNorm_0": {"scale": sd[name]}}

  p: dict[str, Any] = {"embed": {"embedding": sd["vocab_embed.embedding"]},
                       "t_mlp_in": linear("sigma_map.mlp.0"), "t_mlp_out": linear("sigma_map.mlp.2")}
  for i in range(sizes.num_layers):
    b = f"blocks.{i}."
    qkv = sd[b + "attn_qkv.weight"].reshape(3, h, hd, d).transpose(3, 0, 1, 2)
    p[f"block_{i}"] = {
        "adaln": linear(b + "adaLN_modulation"),
        "ln_attn": scale(b + "norm1.weight"),
        "qkv": {"kernel": np.ascontiguousarray(qkv)},
        "attn_out": {"kernel": np.ascontiguousarray(sd[b + "attn_out.weight"].T.reshape(h, hd, d))},
        "ln_mlp": scale(b + "norm2.weight"),
        "mlp_in": linear(b + "mlp.0"),
        "mlp_out": linear(b + "mlp.2"),
    }
  p["final_adaln"] = linear("output_layer.adaLN_modulation")
  p["ln_final"] = scale("output_layer.norm_final.weight")
  p["head"] = linear("output_layer.linear")
  return p


def to_state_dict(params: Mapping[str, Any], sizes: DitSizes, prefix: str = PREFIX,
                  inv_freq: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """Our parameter tree -> the published state dict (keys in its order, `prefix` + name).

  `rotary_emb.inv_freq` is the buffer our rotary embedding computes (`rope_inv_freq`) unless
  `inv_freq` is given.
  """
  a = lambda x: np.asarray(x)  # noqa: E731
  d, h, hd = sizes.d_model, sizes.num_heads, sizes.head_dim
  out: dict[str, np.ndarray] = {}

  def linear(name, node):
    out[name + ".weight"] = np.ascontiguousarray(a(node["kernel"]).T)
    out[name + ".bias"] = a(node["bias"])

  out["vocab_embed.embedding"] = a(params["embed"]["embedding"])
  linear("sigma_map.mlp.0", params["t_mlp_in"])
  linear("sigma_map.mlp.2", params["t_mlp_out"])
  out[INV_FREQ] = (rope_inv_freq(hd, sizes.rope_theta) if inv_freq is None
                   else np.asarray(inv_freq, np.float32))
  for i in range(sizes.num_layers):
    blk, b = params[f"block_{i}"], f"blocks.{i}."
    out[b + "norm1.weight"] = a(blk["ln_attn"]["LayerNorm_0"]["scale"])
    out[b + "attn_qkv.weight"] = np.ascontiguousarray(
        a(blk["qkv"]["kernel"]).transpose(1, 2, 3, 0).reshape(3 * d, d))
    out[b + "attn_out.weight"] = np.ascontiguousarray(a(blk["attn_out"]["kernel"]).reshape(h * hd, d).T)
    out[b + "norm2.weight"] = a(blk["ln_mlp"]["LayerNorm_0"]["scale"])
    linear(b + "mlp.0", blk["mlp_in"])
    linear(b + "mlp.2", blk["mlp_out"])
    linear(b + "adaLN_modulation", blk["adaln"])
  out["output_layer.norm_final.weight"] = a(params["ln_final"]["LayerNorm_0"]["scale"])
  linear("output_layer.linear", params["head"])
  linear("output_layer.adaLN_modulation", params["final_adaln"])
  order = list(expected_shapes(sizes))
  return {prefix + k: out[k] for k in order}


def ema_state_dict(state_dict: Mapping[str, Any], shadow_params: list[Any],
                   sizes: DitSizes) -> dict[str, Any]:
  """A Lightning checkpoint's EMA weights by name: `ema['shadow_params']` is a bare list in
  `parameters()` order (the state-dict order without the inv_freq buffer)."""
  names = parameter_names(sizes)
  if len(shadow_params) != len(names):
    raise StateDictError(f"ema['shadow_params'] holds {len(shadow_params)} tensors, expected "
                         f"{len(names)} (one per parameter of {_describe(sizes)}).")
  want = expected_shapes(sizes)
  out = {}
  for name, tensor in zip(names, shadow_params):
    if _shape(tensor) != want[name]:
      raise StateDictError(f"ema['shadow_params'][{len(out)}] (for {PREFIX}{name}) has shape "
                           f"{_shape(tensor)}, expected {want[name]}.")
    out[name] = tensor
  sd = strip_prefix(state_dict)
  if INV_FREQ in sd:
    out[INV_FREQ] = sd[INV_FREQ]
  return out


def incompatibilities(model_cfg: "transformer.TransformerConfig") -> list[str]:
  """Why a network is not the published one (empty: it is); for export in its layout."""
  why = [f"model.{k}={getattr(model_cfg, k)!r} (the published network has {v!r})"
         for k, v in DIT_MODEL_OPTIONS.items() if getattr(model_cfg, k) != v]
  if model_cfg.time_conditioning:
    why.append("model.time_conditioning=True (dlm-jax feeds its time t, the published code "
               "sigma(t))")
  return why


def sizes_of(model_cfg: "transformer.TransformerConfig") -> DitSizes:
  """The DitSizes of a network config."""
  return DitSizes(vocab_size=model_cfg.vocab_size, d_model=model_cfg.d_model,
                  num_layers=model_cfg.num_layers, num_heads=model_cfg.num_heads,
                  cond_dim=model_cfg.cond_dim, mlp_ratio=model_cfg.mlp_ratio,
                  rope_theta=float(model_cfg.rope_theta))
