"""FLOPs of heavy/light schedules: per pass, per sample, and the saving against all heavy.

The formula of one forward pass is the model's own (`dlm_jax.models.flops.forward_flops`, two
conventions: "blocks" = transformer blocks only, "full" = plus the output projection). A
schedule's cost sums it over the steps it runs, nominal or the passes actually run (NFE).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Tuple, Union

import ml_collections
import numpy as np

from dlm_jax.models.flops import CONVENTIONS, forward_flops
from dlm_jax.scheduling.schedule import ModelSchedule

_CFG_KEYS = ("n_layers", "d", "seq_len", "vocab")


def _cfg_flops(cfg: Union[Mapping[str, Any], Any], convention: str) -> float:
  """forward_flops of a model described by a mapping or an object with the same fields."""
  get = (lambda k, dflt=None: cfg.get(k, dflt)) if isinstance(cfg, Mapping) else (
      lambda k, dflt=None: getattr(cfg, k, dflt))
  missing = [k for k in _CFG_KEYS if get(k) is None]
  if missing:
    raise ValueError(f"model config lacks field(s) {missing}; needs {_CFG_KEYS} "
                     f"(and optionally mlp_ratio)")
  return forward_flops(int(get("n_layers")), int(get("d")), int(get("seq_len")),
                       int(get("vocab")), float(get("mlp_ratio", 4)), convention)


def model_forward_flops(cfg: Union[Mapping[str, Any], Any], convention: str = "blocks") -> float:
  """`forward_flops` of a model described by a mapping or object with n_layers, d, seq_len,
  vocab (and optionally mlp_ratio)."""
  return _cfg_flops(cfg, convention)


def schedule_flops(is_light, heavy_cfg, light_cfg, convention: str = "blocks",
                   nfe_heavy=None, nfe_light=None, nfe_baseline=None
                   ) -> Tuple[Union[float, np.ndarray], Union[float, np.ndarray]]:
  """FLOPs per sample of a schedule and its saving versus all heavy.

  Without NFE the cost counts nominal steps: n_H F_H + n_L F_L over the schedule's steps,
  against T F_H. With `nfe_heavy` / `nfe_light` (per sample [B] or scalars, e.g. from
  `scheduled_ancestral_sample`) it counts the passes actually run, against the same number of
  passes all heavy, or against `nfe_baseline` heavy passes when given (e.g. the NFE of an
  all-heavy run).

  Args:
    is_light: [T] bool or a `ModelSchedule`.
    heavy_cfg: mapping/object with n_layers, d, seq_len, vocab (and optionally mlp_ratio).
    light_cfg: same for the light model.
    convention: "blocks" or "full".
    nfe_heavy: optional heavy passes per sample.
    nfe_light: optional light passes per sample.
    nfe_baseline: optional all-heavy passes per sample to compare against.

  Returns:
    (flops_per_sample, saving = 1 - cost / cost_all_heavy); floats, or arrays for array NFE.
  """
  if isinstance(is_light, ModelSchedule):
    is_light = is_light.expand()
  is_light = np.asarray(is_light, bool)
  f_h = _cfg_flops(heavy_cfg, convention)
  f_l = _cfg_flops(light_cfg, convention)
  if (nfe_heavy is None) != (nfe_light is None):
    raise ValueError("give both nfe_heavy and nfe_light, or neither")
  if nfe_heavy is None:
    n_l = float(np.sum(is_light))
    n_h = float(is_light.size) - n_l
  else:
    n_h = np.asarray(nfe_heavy, np.float64)
    n_l = np.asarray(nfe_light, np.float64)
  cost = n_h * f_h + n_l * f_l
  base_n = (n_h + n_l) if nfe_baseline is None else np.asarray(nfe_baseline, np.float64)
  saving = 1.0 - cost / (base_n * f_h)
  if np.ndim(cost) == 0:
    return float(cost), float(saving)
  return cost, saving


def flops_model_config(config: ml_collections.ConfigDict, vocab_size: int, seq_len: int
                       ) -> dict[str, Any]:
  """The fields `forward_flops` needs, from a run config.

  Args:
    config: the run's config (model.num_layers, model.d_model, model.mlp_ratio).
    vocab_size: V of the output layer.
    seq_len: length of the sequences the sampler feeds the model (prompt + generated).

  Returns:
    dict(n_layers, d, seq_len, vocab, mlp_ratio).
  """
  m = config.model
  return dict(n_layers=int(m.num_layers), d=int(m.d_model), seq_len=int(seq_len),
              vocab=int(vocab_size), mlp_ratio=float(m.mlp_ratio))


def flops_report(schedule: ModelSchedule, heavy_cfg: Mapping[str, Any],
                 light_cfg: Mapping[str, Any], nfe_heavy: np.ndarray, nfe_light: np.ndarray,
                 nfe_all_heavy: Optional[np.ndarray] = None) -> dict[str, dict[str, float]]:
  """FLOPs per sample of a scheduled run in both conventions.

  Args:
    schedule: the schedule that ran.
    heavy_cfg: `flops_model_config` of the heavy model.
    light_cfg: same for the light model.
    nfe_heavy: [N] heavy passes per sample.
    nfe_light: [N] light passes per sample.
    nfe_all_heavy: optional [N] or scalar NFE of an all-heavy run (same samples) to compare with.

  Returns:
    {convention: dict(per_pass_heavy, per_pass_light, nominal_per_sample, saving_nominal,
    nfe_per_sample (mean over samples of the passes actually run), saving_nfe (against the same
    number of passes all heavy), and with `nfe_all_heavy` saving_vs_all_heavy_nfe)}.
  """
  out = {}
  nh = np.asarray(nfe_heavy, np.float64)
  nl = np.asarray(nfe_light, np.float64)
  for conv in CONVENTIONS:
    nominal, saving_nominal = schedule_flops(schedule, heavy_cfg, light_cfg, conv)
    cost, _ = schedule_flops(schedule, heavy_cfg, light_cfg, conv, nfe_heavy=nh,
                                     nfe_light=nl)
    f_h = model_forward_flops(heavy_cfg, conv)
    rec = dict(per_pass_heavy=f_h, per_pass_light=model_forward_flops(light_cfg, conv),
               nominal_per_sample=nominal, saving_nominal=saving_nominal,
               nfe_per_sample=float(np.mean(cost)),
               saving_nfe=float(1.0 - np.sum(cost) / max(float(np.sum(nh + nl)) * f_h, 1e-30)))
    if nfe_all_heavy is not None:
      base = float(np.mean(np.broadcast_to(np.asarray(nfe_all_heavy, np.float64), nh.shape)))
      rec["saving_vs_all_heavy_nfe"] = float(1.0 - np.mean(cost) / (base * rec["per_pass_heavy"]))
    out[conv] = rec
  return out
