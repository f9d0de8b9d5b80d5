"""Config schema and start-up validation: one pass that names the field to fix.

Every config is checked against the schema (`dlm_jax.config.schema`): an unknown field, a value of
the wrong type, or an impossible value raises `ConfigError` before any compute. Fields whose
allowed values are the names of plug-ins (method, decoder, data source, attention backend) are
checked against their registries by `dlm_jax.run.experiment.validate_config`, which calls
`validate` here first; this package imports nothing of dlm_jax.
"""

from __future__ import annotations

import logging
from typing import Any

import ml_collections

from dlm_jax import paths
from dlm_jax.config import schema
from dlm_jax.config.schema import ALIASES, LEGACY_VALUES

# Fixed enumerations (not plug-ins; those are checked against their registries).
CHOICES = {
    "data.packing": ("pack", "pad"),
    "model.dtype": ("float32", "bfloat16"),
    "model.position_embedding": ("rope", "learned"),
    "model.remat": ("none", "full", "attention", "dots"),
    "model.rope_freqs": ("neg_power", "reciprocal"),
    "diffusion.schedule": ("loglinear", "cosine"),
    "diffusion.time_sampling": ("stratified", "vdm", "iid", "example"),
    "diffusion.normalize": ("token", "sequence", "sum"),
    "did.variant": ("variable", "fixed"),
    "trims.masking": ("random", "trims", "trims_easy_first", "random_buckets"),
    "trims.weighting": ("inv_t", "uniform"),
    "trims.k_law": ("uniform", "tied_to_t"),
    "optim.decay": ("constant", "cosine", "linear"),
    "train.nan_policy": ("stop", "skip"),
}


class ConfigError(ValueError):
  """A config field has an unknown name, a wrong type or an impossible value."""


def get_schema() -> ml_collections.ConfigDict:
  return schema.get_config()


def _flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in cfg.items():
    name = f"{prefix}{k}"
    if isinstance(v, (ml_collections.ConfigDict, dict)):
      out.update(_flatten(v, name + "."))
    else:
      out[name] = v
  return out


def field_names() -> set[str]:
  """Every dotted field name of the schema (deprecated aliases included)."""
  return set(_flatten(get_schema()))


def get_field(cfg: Any, dotted: str) -> Any:
  for part in dotted.split("."):
    cfg = cfg[part]
  return cfg


def _set_field(cfg: Any, dotted: str, value: Any) -> None:
  *parents, last = dotted.split(".")
  for part in parents:
    cfg = cfg[part]
  cfg[last] = value


def apply_aliases(config: ml_collections.ConfigDict) -> list[str]:
  """Moves values set under a deprecated field name to the new name (in place), with a warning.

  Returns the old names that were set. Idempotent: the old fields are reset to None.
  """
  moved = []
  for old, new in ALIASES.items():
    try:
      value = get_field(config, old)
    except (KeyError, AttributeError):
      continue
    if value is None:
      continue
    logging.warning("config.%s is deprecated (it will be removed in the next release); use "
                    "config.%s instead.", old, new)
    _set_field(config, new, value)
    _set_field(config, old, None)
    moved.append(old)
  return moved


def _legacy_value(name: str, value: Any) -> Any:
  """The current value for a value of `name` that changed meaning (see schema.LEGACY_VALUES)."""
  table = LEGACY_VALUES.get(name, {})
  if isinstance(value, (bool, str)) and value in table and not (
      isinstance(value, str) and table[value] == value):
    logging.warning("config.%s=%r is deprecated; it means %r now.", name, value, table[value])
    return table[value]
  return value


def apply_legacy_values(config: ml_collections.ConfigDict) -> None:
  """Rewrites old values of fields whose meaning changed (in place; see schema.LEGACY_VALUES)."""
  for name in LEGACY_VALUES:
    try:
      value = get_field(config, name)
    except (KeyError, AttributeError):
      continue
    new = _legacy_value(name, value)
    if new is not value:
      *parents, last = name.split(".")
      node = config
      for part in parents:
        node = node[part]
      with node.ignore_type():
        node[last] = new


def check_schema(config: ml_collections.ConfigDict) -> None:
  """Unknown fields and wrong types, compared with the schema."""
  ref_flat = _flatten(get_schema())
  given = _flatten(config)
  unknown = sorted(set(given) - set(ref_flat))
  if unknown:
    raise ConfigError(f"Unknown config field(s): {', '.join('config.' + u for u in unknown)}. "
                      "Every field must exist in the schema, dlm_jax/config/schema.py (check the "
                      "spelling).")
  for name, value in given.items():
    ref = ref_flat[name]
    if ref is None or value is None:
      continue
    ok = isinstance(value, type(ref))
    if isinstance(ref, float) and isinstance(value, int) and not isinstance(value, bool):
      ok = True
    if isinstance(ref, int) and not isinstance(ref, bool) and isinstance(value, bool):
      ok = False
    if not ok:
      raise ConfigError(f"config.{name} must be of type {type(ref).__name__}, got "
                        f"{value!r} ({type(value).__name__}).")


def from_saved(saved: Any) -> ml_collections.ConfigDict:
  """A config saved as JSON (int/float distinctions lost) rebuilt on the schema's types.

  Fields the schema no longer has are dropped; deprecated names are moved to their new homes.
  """
  cfg = get_schema()

  def merge(dst, src, prefix=""):
    for k, v in src.items():
      if k not in dst:
        continue
      v = _legacy_value(prefix + k, v)
      if isinstance(dst[k], ml_collections.ConfigDict):
        merge(dst[k], v, prefix + k + ".")
      elif isinstance(dst[k], float) and isinstance(v, int) and not isinstance(v, bool):
        dst[k] = float(v)
      else:
        dst[k] = v

  merge(cfg, saved)
  apply_aliases(cfg)
  return cfg


def validate(config: ml_collections.ConfigDict, *, num_data_parallel: int | None = None,
             process_count: int = 1, check_files: bool = True) -> None:
  """Checks names, types and values of the plug-in-independent fields; raises ConfigError.

  Args:
    config: the full config (deprecated aliases are moved first).
    num_data_parallel: data x fsdp size of the mesh (the batch must divide over it).
    process_count: number of JAX processes (the batch must divide over them).
    check_files: check that files the config names exist (False for a saved run opened with
      its own tokenizer files).
  """
  apply_aliases(config)
  apply_legacy_values(config)
  check_schema(config)
  for name, choices in CHOICES.items():
    value = get_field(config, name)
    if value not in choices:
      raise ConfigError(f"config.{name}={value!r} is not one of {choices}.")

  def require(cond: bool, field: str, msg: str) -> None:
    if not cond:
      raise ConfigError(f"config.{field}: {msg}")

  d, m, t, tr, o = config.data, config.model, config.diffusion, config.train, config.optim
  require(d.seq_len > 0, "data.seq_len", "must be positive.")
  require(m.num_layers > 0, "model.num_layers", "must be positive.")
  require(m.d_model % m.num_heads == 0, "model.num_heads",
          f"must divide model.d_model={m.d_model}.")
  require((m.d_model // m.num_heads) % 2 == 0, "model.num_heads",
          "head dimension d_model/num_heads must be even for RoPE.")
  require(0.0 <= m.dropout < 1.0, "model.dropout", "must be in [0, 1).")
  require(m.ln_eps > 0, "model.ln_eps", "must be positive.")
  require(0.0 <= t.eps < 1.0, "diffusion.eps", "must be in [0, 1).")
  require(0.0 < t.t_min < 1.0, "diffusion.t_min", "must be in (0, 1).")
  require(t.eval_num_t >= 1, "diffusion.eval_num_t", "must be >= 1.")
  require(o.lr > 0, "optim.lr", "must be positive.")
  require(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0.")
  require(0.0 <= o.ema_decay < 1.0, "optim.ema_decay", "must be in [0, 1).")
  require(o.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 disables clipping).")
  k = o.grad_accum_steps
  require(k >= 1, "optim.grad_accum_steps", "must be >= 1 (1 = no accumulation).")
  require(tr.global_batch_size % k == 0, "optim.grad_accum_steps",
          f"{k} does not divide train.global_batch_size={tr.global_batch_size} (each update "
          "splits the global batch into grad_accum_steps micro-batches).")
  require(tr.global_batch_size > 0, "train.global_batch_size", "must be positive.")
  require(tr.num_steps > 0, "train.num_steps", "must be positive.")
  for f in ("log_every", "eval_every", "ckpt_every", "keep_ckpts", "lease_stale_secs"):
    require(tr[f] > 0, f"train.{f}", "must be positive.")
  require(tr.keep_period >= 0, "train.keep_period",
          "must be >= 0 (0 keeps only the newest train.keep_ckpts checkpoints).")
  if num_data_parallel:
    require(tr.global_batch_size % num_data_parallel == 0, "train.global_batch_size",
            f"{tr.global_batch_size} is not divisible by the {num_data_parallel} data-parallel "
            "devices (mesh data x fsdp).")
    micro = tr.global_batch_size // k
    require(k == 1 or micro % num_data_parallel == 0, "optim.grad_accum_steps",
            f"the micro-batch of {micro} rows (train.global_batch_size={tr.global_batch_size} / "
            f"{k}) is not divisible by the {num_data_parallel} data-parallel devices (mesh data x "
            "fsdp); use fewer accumulation steps or a larger batch.")
  require(tr.global_batch_size % process_count == 0, "train.global_batch_size",
          f"{tr.global_batch_size} is not divisible by the {process_count} processes.")
  if d.tokenizer.startswith("file:"):
    path = d.tokenizer[len("file:"):]
    # (A saved run reads its tokenizer from the workdir: check_files=False skips this.)
    require(not check_files or paths.exists(path), "data.tokenizer",
            f"tokenizer file {path!r} does not exist.")
  elif d.tokenizer not in ("gpt2", "bpe", "bytes"):
    raise ConfigError(f"config.data.tokenizer={d.tokenizer!r}; choose gpt2, bpe, bytes or "
                      "file:/path/to/tokenizer.json.")
  if d.tokenizer == "bpe":
    require(d.vocab_size >= 300, "data.vocab_size", "a byte-level BPE needs at least 300 ids.")
  s = config.sample
  require(0.0 < s.tau <= 1.0, "sample.tau", f"{s.tau} is outside (0, 1].")
  require(s.num_steps > 0, "sample.num_steps", "must be positive.")
  require(s.batch_size > 0 and s.num_samples > 0, "sample.num_samples", "must be positive.")
