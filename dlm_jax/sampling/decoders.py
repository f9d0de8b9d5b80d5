"""The decoder registry: `config.sample.decoder` -> a Decoder. The one place that reads the name.

A decoder belongs to a family, the kind of model output it consumes:
  "masked"     logits over a partly masked sequence (MDLM): ancestral, threshold, fixed_k;
  "insertion"  insertion scores per gap (DID): did;
  "causal"     next-token logits (the autoregressive teacher/judge): autoregressive.
A method declares its family (`Method.family`), so a decoder that does not fit the method is a
`ConfigError` at start-up, and the same check runs in the library (`Method.sample`), so a
notebook call refuses what the command line refuses.

A new decoder is one module that builds a `Decoder` and calls `register` (one line), imported by
`dlm_jax/sampling/__init__.py` (masked decoders) or by the method package it serves.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from dlm_jax.config import ConfigError
from dlm_jax.sampling import common

FAMILIES = ("masked", "insertion", "causal")


def _no_check(sample_cfg: Any) -> None:
  del sample_cfg


@dataclasses.dataclass(frozen=True)
class Decoder:
  """A registered decoder.

  Attributes:
    name: the value of config.sample.decoder.
    family: one of FAMILIES.
    sample: (method, params, key, sample_cfg, prompt [B, P] or None) -> dict(tokens, nfe, ...,
      prompt_len, gen_len); jits and caches its loop on the method object.
    check: (sample_cfg) -> None; raises ConfigError naming a sample.* option it cannot take.
    options: the sample.* fields the decoder reads (documentation and compile-cache keys).
  """
  name: str
  family: str
  sample: Callable[..., dict]
  check: Callable[[Any], None] = _no_check
  options: tuple[str, ...] = ()


REGISTRY: dict[str, Decoder] = {}


def register(decoder: Decoder) -> Decoder:
  if decoder.family not in FAMILIES:
    raise ValueError(f"decoder {decoder.name!r}: family must be one of {FAMILIES}")
  if decoder.name in REGISTRY and REGISTRY[decoder.name] is not decoder:
    raise ValueError(f"a decoder named {decoder.name!r} is already registered")
  REGISTRY[decoder.name] = decoder
  return decoder


def names(family: Optional[str] = None) -> tuple[str, ...]:
  return tuple(n for n, d in REGISTRY.items() if family is None or d.family == family)


def get(name: str) -> Decoder:
  if name not in REGISTRY:
    raise ConfigError(f"config.sample.decoder={name!r} is not one of {names()}.")
  return REGISTRY[name]


def check_options(sample_cfg: Any, family: str, default: str, method_name: str = "") -> Decoder:
  """The decoder of `sample_cfg` (or `default`) after checking it fits `family` and its options.

  Raises:
    ConfigError: naming the sample.* field to fix.
  """
  s = sample_cfg
  name = s.decoder or default
  decoder = get(name)
  if decoder.family != family:
    who = f"method {method_name!r}" if method_name else f"this method (family {family!r})"
    raise ConfigError(f"config.sample.decoder={name!r} is a {decoder.family} decoder and does not "
                      f"fit {who}; choose one of {names(family)} (or '' for {default!r}).")
  if not 0.0 < s.tau <= 1.0:
    raise ConfigError(f"sample.tau={s.tau} is outside (0, 1].")
  if s.num_steps < 1:
    raise ConfigError(f"sample.num_steps={s.num_steps} must be >= 1.")
  if s.batch_size < 1 or s.num_samples < 1:
    raise ConfigError("sample.num_samples and sample.batch_size must be positive.")
  if s.gen_len < 0:
    raise ConfigError(f"sample.gen_len={s.gen_len} must be >= 0 (0 = fill data.seq_len).")
  if s.r2 and name != "threshold":
    raise ConfigError(f"sample.r2={s.r2!r} needs sample.decoder=threshold (got {name!r}).")
  decoder.check(s)
  return decoder


# -- helpers shared by decoders ------------------------------------------------------------------
def options_key(sample_cfg: Any, fields: tuple[str, ...]) -> tuple:
  """A hashable snapshot of the sample options a compiled sampler depends on."""
  return tuple((f, sample_cfg[f]) for f in fields)


def cached(method: Any, key: tuple, build: Callable[[], Callable]) -> Callable:
  """One compiled sampler per key, kept on the method object (params, key, prompt are traced)."""
  cache = method.__dict__.setdefault("_sampler_cache", {})
  if key not in cache:
    cache[key] = build()
  return cache[key]


def default_prompt(method: Any, batch_size: int, prompt: Any) -> Any:
  """[B, P] int32 prompt; [BOS] per row when none is given.

  A host (numpy) array unless the prompt given is traced: the fast decoders lay out the
  generation slots on the host, also when the whole decoder is traced under an outer jit (the
  sampling step `python -m dlm_jax.compile` lowers).
  """
  if prompt is None:
    return np.full((batch_size, 1), method.ids.bos, np.int32)
  if isinstance(prompt, jax.core.Tracer):
    return jnp.asarray(prompt, jnp.int32)
  return np.asarray(prompt, np.int32)


def _pad_slots(layout: Any, block_len: int) -> Any:
  """A host layout whose gen_pos / gen_ok are padded to a multiple of block_len."""
  gen_pos, gen_ok = np.asarray(layout.gen_pos), np.asarray(layout.gen_ok)
  extra = -gen_pos.shape[1] % int(block_len)
  if not extra:
    return layout
  length = np.asarray(layout.tokens).shape[1]
  gen_pos = np.pad(gen_pos, ((0, 0), (0, extra)), constant_values=length)
  gen_ok = np.pad(gen_ok, ((0, 0), (0, extra)), constant_values=False)
  return layout.replace(gen_pos=gen_pos, gen_ok=gen_ok)


def masked_decoder(name: str, run: Callable[..., dict], fields: tuple[str, ...],
                   blockwise: bool = False, check: Callable[[Any], None] = _no_check,
                   run_fast: Optional[Callable[..., dict]] = None) -> Decoder:
  """A decoder of the "masked" family from its loops.

  `run(method, params, key, prompt [B, P], gen_len, opts: dict) -> dict(tokens, nfe, ...)` is
  the reference loop (full [B, L, V] logits from `method.logits_fn(params)`), used with
  sample.reference=True; `run_fast(method, params, key, layout: MaskedLayout, opts)` the default
  one (the network split at its hidden states, `method.denoiser(params)`), which also takes
  prompts of different lengths and infilling (`sample(..., layout=...)`). Both are traced under
  jit once per (options, shapes); they read `ids.mask` and the noise `schedule` of the method.
  Without sample.gen_len the decoder fills the training length (whole blocks for blockwise
  decoders).
  """

  def sample(method, params, key, sample_cfg, prompt=None, layout=None) -> dict:
    s = sample_cfg
    reference = bool(s.get("reference", False)) or run_fast is None
    opts = options_key(s, fields)
    block = int(s.block_len) if blockwise else 1
    if layout is None:
      prompt = default_prompt(method, int(s.batch_size), prompt)
      p = prompt.shape[1]
      gen_len = int(s.gen_len)
      if not gen_len:  # fill the training length; blockwise decoders need whole blocks
        gen_len = method.config.data.seq_len - p
        if blockwise:
          gen_len = max(s.block_len, gen_len // s.block_len * s.block_len)
      total = p + gen_len
      if total > method.model_cfg.max_len:
        raise ValueError(f"prompt ({p}) + sample.gen_len ({gen_len}) = {total} is longer than "
                         f"model.max_len={method.model_cfg.max_len}.")
      if blockwise and gen_len % s.block_len:
        raise ValueError(f"sample.gen_len={gen_len} must be a multiple of sample.block_len="
                         f"{s.block_len}.")
      if reference:
        fn = cached(method, (name, opts, gen_len), lambda: jax.jit(
            lambda params, key, prompt: run(method, params, key, prompt, gen_len, dict(opts))))
        out = fn(params, key, prompt)
        return dict(out, prompt_len=p, gen_len=gen_len)
      layout = common.prefix_layout(np.asarray(prompt), gen_len, method.ids.mask, block)
    else:
      if reference:
        raise ValueError(f"sample.reference=True runs the original {name!r} loop, which takes "
                         "one prefix prompt; prompts of different lengths and infilling run on "
                         "the default path (reference=False).")
      length = np.asarray(layout.tokens).shape[1]
      if length > method.model_cfg.max_len:
        raise ValueError(f"the layout has {length} positions, more than model.max_len="
                         f"{method.model_cfg.max_len}.")
      layout = _pad_slots(layout, block)
      p = 0
    fn = cached(method, (name, opts, "fast"), lambda: jax.jit(
        lambda params, key, layout: run_fast(method, params, key, layout, dict(opts))))
    out = fn(params, key, jax.tree.map(jnp.asarray, layout))
    return dict(out, prompt_len=p, gen_len=layout.gen_len)

  return Decoder(name=name, family="masked", sample=sample, check=check, options=fields)
