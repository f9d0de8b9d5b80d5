"""Step importance for heavy/light model scheduling (arXiv 2604.02340; spec/decoding.md).

Which ancestral steps can a light denoiser take over? Three kinds of evidence:

- curves over the diffusion time t, from held-out data: mask x0 with probability 1 - alpha(t)
  and run both models; `masked_ce_curve` (CE over masked slots of one model), `kl_curve` (mean
  over masked slots of KL(p_H || p_L)), `delta_ce_curve` (CE_L - CE_H); `time_curves` computes
  all of them from one pass of each model;
- `trajectory_kl`: KL(p_H || p_L) on the states the heavy sampler actually visits, per step;
- a measured or predicted score per placement: `predicted_degradation` (sum of a curve over the
  light steps, read at the middle of each step) and `search_placements` (exhaustive over coarse
  segments: every placement of k light segments, or all 2^S assignments).

Models enter as closures `logits_fn(tokens [B, L] int32) -> logits [B, L, V]` (e.g.
`MDLM.logits_fn(params)`), the same interface the samplers use. Curves are numpy arrays.
"""

from __future__ import annotations

import itertools
from typing import Callable, Iterable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from dlm_jax.diffusion import schedules
from dlm_jax.diffusion.masked import subs_log_probs
from dlm_jax.sampling import ancestral
from dlm_jax.sampling.common import categorical_f64, sampling_dtype
from dlm_jax.scheduling import schedule as ms

LogitsFn = Callable[[jax.Array], jax.Array]


def _subs_logp(logits: jax.Array, mask_id: int) -> jax.Array:
  """float32 log-softmax with the mask column removed: [..., V]."""
  return subs_log_probs(logits, mask_id)


def _kl(logp: jax.Array, logq: jax.Array) -> jax.Array:
  """KL(p || q) over the last axis for log-probabilities with -inf at the same columns."""
  p = jnp.exp(logp)
  diff = jnp.where(p > 0, logp - logq, 0.0)
  return jnp.sum(p * diff, axis=-1)


def _check_inputs(x0, maskable, t_grid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  x0 = np.asarray(x0, np.int32)
  if x0.ndim != 2:
    raise ValueError(f"x0 must be [N, L] int32, got shape {x0.shape}")
  maskable = np.ones_like(x0, bool) if maskable is None else np.asarray(maskable, bool)
  if maskable.shape != x0.shape:
    raise ValueError(f"maskable shape {maskable.shape} must equal x0 shape {x0.shape}")
  t_grid = np.asarray(t_grid, np.float64).ravel()
  if t_grid.size == 0 or np.any((t_grid <= 0) | (t_grid > 1)):
    raise ValueError(f"t_grid must be a non-empty list of times in (0, 1], got {t_grid}")
  return x0, maskable, t_grid


def time_curves(heavy_fn: LogitsFn, light_fn: Optional[LogitsFn], x0, t_grid: Sequence[float],
                key: jax.Array, mask_id: int, maskable=None, schedule="loglinear",
                batch_size: int = 256) -> dict[str, np.ndarray]:
  """CE of each model, Delta_CE and KL(p_H || p_L) at each t, from one forward per model.

  At time t every maskable slot is masked when u < 1 - alpha(t), with one uniform u per slot
  shared by all t (nested masks, so the curves are smooth in t).

  Args:
    heavy_fn: heavy closure tokens [B, L] -> logits [B, L, V].
    light_fn: light closure, or None for the heavy CE curve only.
    x0: [N, L] int32 held-out sequences.
    t_grid: times in (0, 1].
    key: PRNG key of the masks.
    mask_id: id of [MASK].
    maskable: optional [N, L] bool, slots that may be masked (default all).
    schedule: noise schedule ("loglinear", "cosine" or a `dlm_jax.diffusion.schedules` object).
    batch_size: rows per forward.

  Returns:
    dict(t [K], ce_heavy [K], and with a light model ce_light, delta_ce = ce_light - ce_heavy,
    kl [K]); each entry is a mean over masked slots (nats); masked [K] slot counts.
  """
  x0, maskable, t_grid = _check_inputs(x0, maskable, t_grid)
  alpha = schedules.as_schedule(schedule).alpha
  u_all = np.asarray(jax.random.uniform(key, x0.shape, jnp.float32))
  two = light_fn is not None

  @jax.jit
  def sums(x, m, u, t):
    is_masked = m & (u < 1.0 - alpha(t))
    xt = jnp.where(is_masked, mask_id, x)
    w = is_masked.astype(jnp.float32)
    lh = _subs_logp(heavy_fn(xt), mask_id)
    ce_h = -jnp.take_along_axis(lh, x[..., None], axis=-1)[..., 0]
    out = dict(n=jnp.sum(w), ce_heavy=jnp.sum(w * ce_h))
    if two:
      ll = _subs_logp(light_fn(xt), mask_id)
      ce_l = -jnp.take_along_axis(ll, x[..., None], axis=-1)[..., 0]
      out.update(ce_light=jnp.sum(w * ce_l), kl=jnp.sum(w * _kl(lh, ll)))
    return out

  names = ("ce_heavy", "ce_light", "kl") if two else ("ce_heavy",)
  res = {k: np.zeros(t_grid.size) for k in names + ("n",)}
  n = x0.shape[0]
  for j, t in enumerate(t_grid):
    for lo in range(0, n, batch_size):
      sl = slice(lo, min(n, lo + batch_size))
      out = jax.device_get(sums(x0[sl], maskable[sl], u_all[sl], jnp.float32(t)))
      for k in res:
        res[k][j] += float(out[k])
  count = np.maximum(res.pop("n"), 1.0)
  curves = {k: v / count for k, v in res.items()}
  curves["t"] = t_grid
  curves["masked"] = count
  if two:
    curves["delta_ce"] = curves["ce_light"] - curves["ce_heavy"]
  return curves


def masked_ce_curve(logits_fn: LogitsFn, x0, t_grid: Sequence[float], key: jax.Array,
                    mask_id: int, maskable=None, schedule="loglinear", batch_size: int = 256
                    ) -> np.ndarray:
  """Mean CE (nats) over masked slots of one model at each t: [len(t_grid)].

  Args: as `time_curves` with `logits_fn` for the model.
  """
  return time_curves(logits_fn, None, x0, t_grid, key, mask_id, maskable, schedule,
                     batch_size)["ce_heavy"]


def kl_curve(heavy_fn: LogitsFn, light_fn: LogitsFn, x0, t_grid: Sequence[float],
             key: jax.Array, mask_id: int, maskable=None, schedule="loglinear",
             batch_size: int = 256) -> np.ndarray:
  """Mean over masked slots of KL(p_H || p_L) at each t: [len(t_grid)]."""
  return time_curves(heavy_fn, light_fn, x0, t_grid, key, mask_id, maskable, schedule,
                     batch_size)["kl"]


def delta_ce_curve(heavy_fn: LogitsFn, light_fn: LogitsFn, x0, t_grid: Sequence[float],
                   key: jax.Array, mask_id: int, maskable=None, schedule="loglinear",
                   batch_size: int = 256) -> np.ndarray:
  """Delta_CE(t) = CE_L(t) - CE_H(t) over masked slots: [len(t_grid)]."""
  return time_curves(heavy_fn, light_fn, x0, t_grid, key, mask_id, maskable, schedule,
                     batch_size)["delta_ce"]


def trajectory_kl(heavy_fn: LogitsFn, light_fn: LogitsFn, key: jax.Array, x_init, maskable,
                  mask_id: int, num_steps: int, schedule="loglinear", over: str = "revealed"
                  ) -> np.ndarray:
  """KL(p_H || p_L) on the states visited by heavy-only ancestral sampling, per step.

  Runs the heavy sampler (no cache, t_final = 0, draws as `ancestral_sample` with this key) and
  at each step i evaluates both models on the current state x_{t_i}.

  Args:
    heavy_fn: heavy closure tokens [B, L] -> logits [B, L, V].
    light_fn: light closure.
    key: PRNG key (step i draws with fold_in(key, i)).
    x_init: [B, L] int32 start (mask_id at the slots to generate).
    maskable: [B, L] bool slots the sampler may fill.
    mask_id: id of [MASK].
    num_steps: T.
    schedule: noise schedule.
    over: "revealed" = mean over the slots the heavy sampler reveals at step i (where no slot of
      the batch is revealed, the mean over all masked slots is used), "masked" = mean over all
      slots still masked at step i.

  Returns:
    [T] float64 mean KL per step (step 0 = noisy start).
  """
  if over not in ("revealed", "masked"):
    raise ValueError(f"over must be 'revealed' or 'masked', got {over!r}")
  x_init = jnp.asarray(x_init, jnp.int32)
  maskable = jnp.asarray(maskable, bool)
  t_steps = int(num_steps)
  if t_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")
  schedule = schedules.as_schedule(schedule)

  @jax.jit
  def run(x):
    def body(tokens, i):
      masked = (tokens == mask_id) & maskable
      logits_h = heavy_fn(tokens)
      lh = _subs_logp(logits_h, mask_id)
      kl = _kl(lh, _subs_logp(light_fn(tokens), mask_id))
      dtype = sampling_dtype()
      t = 1.0 - i.astype(dtype) / t_steps
      s = 1.0 - (i + 1).astype(dtype) / t_steps
      log_w = ancestral.ancestral_step_log_weights(
          subs_log_probs(logits_h, mask_id, dtype=dtype), t, s, mask_id, schedule)
      draw = categorical_f64(jax.random.fold_in(key, i), log_w)
      new = jnp.where(masked, draw, tokens)
      revealed = masked & (new != mask_id)
      wm, wr = masked.astype(jnp.float32), revealed.astype(jnp.float32)
      return new, jnp.stack([jnp.sum(wr * kl), jnp.sum(wr), jnp.sum(wm * kl), jnp.sum(wm)])
    _, stats = jax.lax.scan(body, x, jnp.arange(t_steps))
    return stats

  stats = np.asarray(jax.device_get(run(x_init)), np.float64)
  masked_mean = stats[:, 2] / np.maximum(stats[:, 3], 1.0)
  if over == "masked":
    return masked_mean
  return np.where(stats[:, 1] > 0, stats[:, 0] / np.maximum(stats[:, 1], 1.0), masked_mean)


def step_midpoints(num_steps: int, t_final: float = 0.0) -> np.ndarray:
  """t at the middle of each ancestral step i: 1 - (i + 1/2)(1 - t_final)/T, [T]."""
  i = np.arange(int(num_steps), dtype=np.float64)
  return 1.0 - (i + 0.5) * (1.0 - float(t_final)) / int(num_steps)


def predicted_degradation(is_light, curve, t_grid: Optional[Sequence[float]] = None,
                          t_final: float = 0.0) -> float:
  """Predicted cost of a schedule: the sum of `curve` over its light steps.

  Args:
    is_light: [T] bool or a `ModelSchedule`.
    curve: either a per-step curve [T] (e.g. `trajectory_kl`; used as is) or a curve over
      `t_grid` (e.g. Delta_CE(t)), read at the middle of each light step by linear
      interpolation (constant beyond the ends of the grid).
    t_grid: the times of `curve`, or None for a per-step curve.
    t_final: end of the sampler's time grid.

  Returns:
    sum_{i light} curve(t_mid(i)) as a Python float.
  """
  if isinstance(is_light, ms.ModelSchedule):
    is_light = is_light.expand()
  is_light = np.asarray(is_light, bool).ravel()
  curve = np.asarray(curve, np.float64).ravel()
  if t_grid is None:
    if curve.size != is_light.size:
      raise ValueError(f"a per-step curve needs one value per step: curve has {curve.size}, "
                       f"the schedule {is_light.size} steps (pass t_grid for a curve over t)")
    return float(np.sum(curve[is_light]))
  t_grid = np.asarray(t_grid, np.float64).ravel()
  if t_grid.size != curve.size:
    raise ValueError(f"t_grid ({t_grid.size}) and curve ({curve.size}) differ in length")
  order = np.argsort(t_grid)
  mids = step_midpoints(is_light.size, t_final)[is_light]
  return float(np.sum(np.interp(mids, t_grid[order], curve[order])))


def search_placements(score_fn: Callable[[ms.ModelSchedule], float], num_segments: int,
                      segment_len: int, num_light: Optional[Union[int, Iterable[int]]] = None
                      ) -> list[dict]:
  """Exhaustive search over coarse placements of light segments; best (lowest score) first.

  Args:
    score_fn: schedule -> score, lower is better (a measured gen-NLL, or a predicted
      degradation such as `lambda s: predicted_degradation(s, curve, t_grid)`).
    num_segments: S equal segments of the T = S * segment_len steps.
    segment_len: steps per segment.
    num_light: number(s) of light segments to place; None = every assignment (2^S).

  Returns:
    list of dict(light_segments tuple, schedule str, num_light_steps, score, rank), sorted by
    score (ties: placement order); element 0 is the best placement found.
  """
  if num_light is None:
    counts = range(num_segments + 1)
  elif isinstance(num_light, int):
    counts = (num_light,)
  else:
    counts = tuple(num_light)
  recs = []
  for k in counts:
    for placement in ms.enumerate_placements(num_segments, k):
      sched = ms.ModelSchedule.from_placement(placement, num_segments, segment_len)
      recs.append(dict(light_segments=tuple(placement), schedule=str(sched),
                       num_light_steps=sched.num_light, score=float(score_fn(sched))))
  recs.sort(key=lambda r: r["score"])
  for i, r in enumerate(recs):
    r["rank"] = i + 1
  return recs


def all_assignments(num_segments: int) -> list[tuple[int, ...]]:
  """Every subset of light segments (2^S placements), smallest first."""
  return [c for k in range(num_segments + 1)
          for c in itertools.combinations(range(num_segments), k)]
