"""Config validation: one pass at start-up that names the field to fix.

Every config is checked against the schema in `configs/base.py`: an unknown field, a value of the
wrong type, or an impossible value raises `ConfigError` before any compute.
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections

CHOICES = {
    "method": ("mdlm", "did", "ar"),
    "data.source": ("bible", "text", "tfds", "arith", "hmm", "sft"),
    "data.packing": ("pack", "pad"),
    "model.dtype": ("float32", "bfloat16"),
    "model.attention": ("xla", "pallas", "auto"),
    "model.position_embedding": ("rope", "learned"),
    "diffusion.schedule": ("loglinear", "cosine"),
    "diffusion.time_sampling": ("stratified", "vdm", "iid", "example"),
    "diffusion.normalize": ("token", "sequence", "sum"),
    "diffusion.did_variant": ("variable", "fixed"),
    "diffusion.masking": ("random", "trims", "trims_easy_first", "random_buckets"),
    "diffusion.trims_k_law": ("uniform", "tied_to_t"),
    "diffusion.sft_weighting": ("inv_t", "uniform"),
    "optim.decay": ("constant", "cosine", "linear"),
    "train.nan_policy": ("stop", "skip"),
    "sample.decoder": ("ancestral", "threshold", "fixed_k", "did"),
}


class ConfigError(ValueError):
  """A config field has an unknown name, a wrong type or an impossible value."""


def _schema() -> ml_collections.ConfigDict:
  from configs import base  # pylint: disable=g-import-not-at-top
  return base.get_config()


def _flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in cfg.items():
    name = f"{prefix}{k}"
    if isinstance(v, (ml_collections.ConfigDict, dict)):
      out.update(_flatten(v, name + "."))
    else:
      out[name] = v
  return out


def _get(cfg: Any, dotted: str) -> Any:
  for part in dotted.split("."):
    cfg = cfg[part]
  return cfg


def check_schema(config: ml_collections.ConfigDict) -> None:
  """Unknown fields and wrong types, compared with configs/base.py."""
  schema = _flatten(_schema())
  given = _flatten(config)
  unknown = sorted(set(given) - set(schema))
  if unknown:
    raise ConfigError(f"Unknown config field(s): {', '.join('config.' + u for u in unknown)}. "
                      "Every field must exist in configs/base.py (check the spelling).")
  for name, value in given.items():
    ref = schema[name]
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


def validate(config: ml_collections.ConfigDict, *, num_data_parallel: int | None = None,
             process_count: int = 1) -> None:
  """Checks names, types and values; raises ConfigError naming the field.

  Args:
    config: the full config.
    num_data_parallel: data x fsdp size of the mesh (the batch must divide over it).
    process_count: number of JAX processes (the batch must divide over them).
  """
  check_schema(config)
  for name, choices in CHOICES.items():
    value = _get(config, name)
    if value not in choices:
      raise ConfigError(f"config.{name}={value!r} is not one of {choices}.")

  def require(cond: bool, field: str, msg: str) -> None:
    if not cond:
      raise ConfigError(f"config.{field}: {msg}")

  d, m, t, tr, o = config.data, config.model, config.diffusion, config.train, config.optim
  require(d.seq_len > 0, "data.seq_len", "must be positive.")
  extra = 1 if config.method == "did" else 0
  if config.method == "did" and t.did_pack:
    require(t.did_pack_len == 0 or t.did_pack_len > d.seq_len, "diffusion.did_pack_len",
            f"must be 0 (auto) or longer than data.seq_len={d.seq_len}.")
    require(tr.global_batch_size % 2 == 0, "train.global_batch_size",
            f"{tr.global_batch_size} is odd: DID packing (diffusion.did_pack) puts 2 rows in each "
            "model row; use an even batch or diffusion.did_pack=False.")
  require(d.seq_len + extra <= m.max_len, "data.seq_len",
          f"{d.seq_len}{' (+1 for BOS)' if extra else ''} is longer than model.max_len={m.max_len}; "
          "raise model.max_len or shorten data.seq_len.")
  require(m.num_layers > 0, "model.num_layers", "must be positive.")
  require(m.d_model % m.num_heads == 0, "model.num_heads",
          f"must divide model.d_model={m.d_model}.")
  require((m.d_model // m.num_heads) % 2 == 0, "model.num_heads",
          "head dimension d_model/num_heads must be even for RoPE.")
  require(0.0 <= m.dropout < 1.0, "model.dropout", "must be in [0, 1).")
  require(0.0 <= t.eps < 1.0, "diffusion.eps", "must be in [0, 1).")
  require(0.0 < t.t_min < 1.0, "diffusion.t_min", "must be in (0, 1).")
  require(t.eval_num_t >= 1, "diffusion.eval_num_t", "must be >= 1.")
  require(o.lr > 0, "optim.lr", "must be positive.")
  require(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0.")
  require(0.0 <= o.ema_decay < 1.0, "optim.ema_decay", "must be in [0, 1).")
  require(o.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 disables clipping).")
  require(tr.global_batch_size > 0, "train.global_batch_size", "must be positive.")
  require(tr.num_steps > 0, "train.num_steps", "must be positive.")
  for f in ("log_every", "eval_every", "ckpt_every", "keep_ckpts"):
    require(tr[f] > 0, f"train.{f}", "must be positive.")
  if num_data_parallel:
    require(tr.global_batch_size % num_data_parallel == 0, "train.global_batch_size",
            f"{tr.global_batch_size} is not divisible by the {num_data_parallel} data-parallel "
            "devices (mesh data x fsdp).")
  require(tr.global_batch_size % process_count == 0, "train.global_batch_size",
          f"{tr.global_batch_size} is not divisible by the {process_count} processes.")
  if d.source == "text":
    require(bool(d.path), "data.path", "is empty; data.source='text' needs a file or folder.")
    require(os.path.exists(d.path), "data.path", f"{d.path!r} does not exist.")
  if d.source == "sft":
    require(d.path.endswith((".npz", ".jsonl")), "data.path",
            f"{d.path!r}; data.source='sft' reads a prompt/response .jsonl or a scored .npz "
            "(python -m dlm_jax.score_difficulty).")
    require(os.path.exists(d.path), "data.path", f"{d.path!r} does not exist.")
  if d.source == "tfds":
    require(bool(d.tfds_name), "data.tfds_name", "is empty; data.source='tfds' needs a dataset name.")
  if d.tokenizer.startswith("file:"):
    path = d.tokenizer[len("file:"):]
    require(os.path.exists(path), "data.tokenizer", f"tokenizer file {path!r} does not exist.")
  elif d.tokenizer not in ("gpt2", "bpe", "bytes"):
    raise ConfigError(f"config.data.tokenizer={d.tokenizer!r}; choose gpt2, bpe, bytes or "
                      "file:/path/to/tokenizer.json.")
  if d.tokenizer == "bpe":
    require(d.vocab_size >= 300, "data.vocab_size", "a byte-level BPE needs at least 300 ids.")
  s = config.sample
  require(0.0 < s.tau <= 1.0, "sample.tau", f"{s.tau} is outside (0, 1].")
  require(s.num_steps > 0, "sample.num_steps", "must be positive.")
  require(s.batch_size > 0 and s.num_samples > 0, "sample.num_samples", "must be positive.")
  if m.attention == "pallas":
    hd = m.d_model // m.num_heads
    require(hd in (64, 128), "model.attention",
            f"'pallas' supports head dimensions 64 and 128, got {hd}; use 'xla' or 'auto'.")
