"""R²-dLLM commit rules (arXiv 2604.18995) on top of threshold decoding.

One forward pass gives, for each slot of the active block, the top-1 id yhat_i and its
probability c_i. The four rules run in order on the same pass (spec/decoding.md):

1. threshold: the most confident masked slot (ties: lowest position) plus every masked slot
   with c_i >= tau;
2. confidence clusters: windows [s, s+w) holding at most `max_unmasked` non-masked slots whose
   masked slots average c >= tau_spatial are committed whole (marks collected over all windows,
   committed together);
3. token clusters: maximal runs (length >= token_cluster_min) of adjacent masked slots with the
   same yhat and max c > tau_spatial commit exactly one slot;
4. temporal: a slot whose yhat held for `temporal_steps` passes (tracked while the slot sits in
   the active block) commits when its aggregated confidence >= tau_temporal.

All loops are over static sizes (the block length and window count), so `r2_commit` is pure,
jittable and vmappable over the batch.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import flax.struct
import jax
import jax.numpy as jnp

TOKEN_CLUSTER_MODES = ("confidence", "mid", "random")
TEMPORAL_AGGS = ("last", "ave", "max")

_FLAG_NAMES = {
    "conf": "conf", "confidence": "conf", "spatial": "conf", "window": "conf",
    "token": "token", "cluster": "token",
    "stability": "stability", "temporal": "stability", "stable": "stability",
}


@dataclasses.dataclass(frozen=True)
class R2Config:
  """Settings of the R²-dLLM rules; `None` in a field disables the rule(s) that need it.

  Attributes:
    tau: threshold of rule 1 (in (0, 1]).
    window: window length w of rule 2 (None disables rule 2).
    tau_spatial: window-mean threshold of rule 2, reused (strictly) by rule 3
      (None disables rules 2 and 3).
    max_unmasked: most non-masked slots u a rule-2 window may hold (None disables rule 2).
    token_cluster: rule-3 choice of the committed slot: "confidence" (most confident, ties
      lowest), "mid" (offset floor(len/2)) or "random" (needs a key); None disables rule 3.
    token_cluster_min: minimum run length of rule 3.
    temporal_steps: passes k a prediction must hold for rule 4 (None disables rule 4).
    tau_temporal: rule-4 threshold on the aggregated confidence (non-strict).
    temporal_agg: "last" (c of this pass), "ave" (mean over the streak) or "max".
  """
  tau: float = 0.9
  window: Optional[int] = 3
  tau_spatial: Optional[float] = 0.8
  max_unmasked: Optional[int] = 1
  token_cluster: Optional[str] = "confidence"
  token_cluster_min: int = 2
  temporal_steps: Optional[int] = 3
  tau_temporal: Optional[float] = 0.8
  temporal_agg: str = "last"

  def __post_init__(self):
    if not 0.0 < self.tau <= 1.0:
      raise ValueError(f"R2Config.tau must lie in (0, 1], got {self.tau}")
    if self.window is not None and self.window < 1:
      raise ValueError(f"R2Config.window must be >= 1 or None, got {self.window}")
    if self.max_unmasked is not None and self.max_unmasked < 0:
      raise ValueError(f"R2Config.max_unmasked must be >= 0 or None, got {self.max_unmasked}")
    if self.token_cluster is not None and self.token_cluster not in TOKEN_CLUSTER_MODES:
      raise ValueError(f"R2Config.token_cluster must be one of {TOKEN_CLUSTER_MODES} or None, "
                       f"got {self.token_cluster!r}")
    if self.token_cluster_min < 1:
      raise ValueError(f"R2Config.token_cluster_min must be >= 1, got {self.token_cluster_min}")
    if self.temporal_steps is not None and self.temporal_steps < 1:
      raise ValueError(f"R2Config.temporal_steps must be >= 1 or None, got {self.temporal_steps}")
    if self.temporal_agg not in TEMPORAL_AGGS:
      raise ValueError(f"R2Config.temporal_agg must be one of {TEMPORAL_AGGS}, "
                       f"got {self.temporal_agg!r}")

  @property
  def conf_cluster_on(self) -> bool:
    """Whether rule 2 (confidence clusters) is enabled."""
    return (self.window is not None and self.tau_spatial is not None
            and self.max_unmasked is not None)

  @property
  def token_cluster_on(self) -> bool:
    """Whether rule 3 (token clusters) is enabled."""
    return self.token_cluster is not None and self.tau_spatial is not None

  @property
  def temporal_on(self) -> bool:
    """Whether rule 4 (temporal finalisation) is enabled."""
    return self.temporal_steps is not None and self.tau_temporal is not None

  def replace(self, **kwargs) -> "R2Config":
    """A copy with some fields changed."""
    return dataclasses.replace(self, **kwargs)

  @classmethod
  def none(cls, tau: float = 0.9) -> "R2Config":
    """All extra rules disabled: plain threshold decoding."""
    return cls(tau=tau, window=None, token_cluster=None, temporal_steps=None)

  @classmethod
  def from_flags(cls, spec: str, **overrides) -> "R2Config":
    """Builds a config enabling the named rules with default settings.

    Args:
      spec: comma-separated rule names: "conf" (rule 2; aliases confidence, spatial, window),
        "token" (rule 3; alias cluster), "stability" (rule 4; aliases temporal, stable);
        "all" for every rule; "" or "none" for none.
      **overrides: other `R2Config` fields (e.g. tau=0.8, window=4).

    Returns:
      The config.

    Raises:
      ValueError: on an unknown rule name.
    """
    names = {s.strip().lower() for s in spec.split(",") if s.strip()}
    if "all" in names:
      names = (names - {"all"}) | {"conf", "token", "stability"}
    names.discard("none")
    chosen = set()
    for n in names:
      if n not in _FLAG_NAMES:
        raise ValueError(f"R2Config.from_flags: unknown rule {n!r} in spec {spec!r}; "
                         f"use any of {sorted(set(_FLAG_NAMES))}, 'all' or 'none'")
      chosen.add(_FLAG_NAMES[n])
    kwargs = {}
    if "conf" not in chosen:
      kwargs["window"] = None
    if "token" not in chosen:
      kwargs["token_cluster"] = None
    if "stability" not in chosen:
      kwargs["temporal_steps"] = None
    kwargs.update(overrides)
    return cls(**kwargs)


@flax.struct.dataclass
class Tracker:
  """Per-slot streak state of rule 4 (shape [..., N], N = G in the decoder, Lb per block).

  Attributes:
    tok: int32 tracked id, -1 = none.
    count: int32 length of the current streak.
    conf_sum: float32 sum of confidences over the streak.
    conf_max: float32 max confidence over the streak.
  """
  tok: jax.Array
  count: jax.Array
  conf_sum: jax.Array
  conf_max: jax.Array

  @classmethod
  def empty(cls, shape) -> "Tracker":
    """An empty tracker of `shape` (e.g. (B, G) or (Lb,))."""
    shape = tuple(shape) if not isinstance(shape, int) else (shape,)
    return cls(tok=jnp.full(shape, -1, jnp.int32), count=jnp.zeros(shape, jnp.int32),
               conf_sum=jnp.zeros(shape, jnp.float32), conf_max=jnp.zeros(shape, jnp.float32))


def threshold_commit(masked: jax.Array, conf: jax.Array, tau: float) -> jax.Array:
  """Rule 1 (Fast-dLLM): argmax over masked slots (ties lowest) plus masked slots with c >= tau.

  Args:
    masked: [..., Lb] bool candidates.
    conf: [..., Lb] confidences.
    tau: threshold.

  Returns:
    [..., Lb] bool commits (empty when no slot is masked).
  """
  lb = masked.shape[-1]
  scored = jnp.where(masked, conf, -jnp.inf)
  top = jax.nn.one_hot(jnp.argmax(scored, axis=-1), lb, dtype=jnp.bool_)
  return masked & (top | (conf >= jnp.asarray(tau, conf.dtype)))


def _conf_cluster(m1: jax.Array, conf: jax.Array, cfg: R2Config) -> jax.Array:
  """Rule 2 on one block: [Lb] bool marks."""
  lb = m1.shape[-1]
  w = int(cfg.window)
  if lb < w:
    return jnp.zeros_like(m1)
  n_win = lb - w + 1
  # member[s, j]: slot j lies in window [s, s + w).
  pos = jnp.arange(lb)
  start = jnp.arange(n_win)[:, None]
  member = (pos[None, :] >= start) & (pos[None, :] < start + w)  # [nW, Lb]
  in_m1 = member & m1[None, :]
  n_masked = jnp.sum(in_m1, axis=-1)
  occupied = w - n_masked  # slots of the window not in M1
  total = jnp.sum(jnp.where(in_m1, conf[None, :], 0.0), axis=-1)
  mean = total / jnp.maximum(n_masked, 1).astype(conf.dtype)
  fire = ((occupied <= cfg.max_unmasked) & (n_masked > 0)
          & (mean >= jnp.asarray(cfg.tau_spatial, conf.dtype)))
  return jnp.any(in_m1 & fire[:, None], axis=0)


def _token_cluster(m2: jax.Array, conf: jax.Array, yhat: jax.Array, cfg: R2Config,
                   key: Optional[jax.Array]) -> jax.Array:
  """Rule 3 on one block: [Lb] bool commits (one slot per qualifying run).

  Dense [Lb, Lb] run-membership matrix (blocks are short; compiles faster than scatters).
  """
  lb = m2.shape[-1]
  pos = jnp.arange(lb)
  prev_m = jnp.concatenate([jnp.zeros((1,), jnp.bool_), m2[:-1]])
  prev_y = jnp.concatenate([jnp.full((1,), -1, yhat.dtype), yhat[:-1]])
  starts = m2 & ~(prev_m & (prev_y == yhat))
  run = jnp.cumsum(starts)  # run id (valid where m2)
  same = m2[:, None] & m2[None, :] & (run[:, None] == run[None, :])  # [Lb, Lb]
  length = jnp.sum(same, axis=-1)
  neg = jnp.asarray(-jnp.inf, conf.dtype)
  cmax = jnp.max(jnp.where(same, conf[None, :], neg), axis=-1)
  first = jnp.min(jnp.where(same, pos[None, :], lb), axis=-1)
  if cfg.token_cluster == "confidence":
    pick = jnp.min(jnp.where(same & (conf[None, :] == cmax[:, None]), pos[None, :], lb), axis=-1)
  elif cfg.token_cluster == "mid":
    pick = first + length // 2
  else:  # random: one uniform per run, read at the run's first slot
    if key is None:
      raise ValueError("R2Config.token_cluster='random' needs a PRNG key")
    u = jax.random.uniform(key, (lb,))[jnp.minimum(first, lb - 1)]
    pick = first + jnp.minimum(jnp.floor(u * length).astype(jnp.int32), length - 1)
  ok = (length >= cfg.token_cluster_min) & (cmax > jnp.asarray(cfg.tau_spatial, conf.dtype))
  return m2 & ok & (pos == pick)


def r2_commit(masked: jax.Array, conf: jax.Array, yhat: jax.Array, tracker: Tracker,
              cfg: R2Config, key: Optional[jax.Array] = None) -> Tuple[jax.Array, Tracker]:
  """One pass of the ordered R² rules over the active block.

  Args:
    masked: [Lb] bool, M0 = masked slots of the active block when the pass starts.
    conf: [Lb] float confidence c_i of the top-1 id.
    yhat: [Lb] int top-1 id.
    tracker: `Tracker` with [Lb] fields for the block's slots.
    cfg: `R2Config` (static).
    key: PRNG key, only for token_cluster="random".

  Returns:
    (commits [4, Lb] bool, one disjoint row per rule in order threshold, conf cluster, token
    cluster, temporal; the updated tracker). Committed slots take yhat.
  """
  conf = conf.astype(jnp.float32) if conf.dtype != jnp.float64 else conf
  yhat = yhat.astype(jnp.int32)
  m0 = masked
  c1 = threshold_commit(m0, conf, cfg.tau)
  m1 = m0 & ~c1
  c2 = _conf_cluster(m1, conf, cfg) if cfg.conf_cluster_on else jnp.zeros_like(m0)
  m2 = m1 & ~c2
  c3 = _token_cluster(m2, conf, yhat, cfg, key) if cfg.token_cluster_on else jnp.zeros_like(m0)
  m3 = m2 & ~c3
  if cfg.temporal_on:
    same = m3 & (tracker.tok == yhat)
    c32 = conf.astype(jnp.float32)
    count = jnp.where(same, tracker.count + 1, 1)
    csum = jnp.where(same, tracker.conf_sum + c32, c32)
    cmax = jnp.where(same, jnp.maximum(tracker.conf_max, c32), c32)
    if cfg.temporal_agg == "last":
      agg = c32
    elif cfg.temporal_agg == "ave":
      agg = csum / count.astype(jnp.float32)
    else:
      agg = cmax
    c4 = m3 & (count >= cfg.temporal_steps) & (agg >= jnp.float32(cfg.tau_temporal))
    keep = m3 & ~c4  # slots whose streak continues
    cleared = m0 & ~keep  # committed this pass (any rule): tracker cleared
    new = Tracker(
        tok=jnp.where(keep, yhat, jnp.where(cleared, -1, tracker.tok)),
        count=jnp.where(keep, count, jnp.where(cleared, 0, tracker.count)),
        conf_sum=jnp.where(keep, csum, jnp.where(cleared, 0.0, tracker.conf_sum)),
        conf_max=jnp.where(keep, cmax, jnp.where(cleared, 0.0, tracker.conf_max)))
  else:
    c4 = jnp.zeros_like(m0)
    new = tracker
  return jnp.stack([c1, c2, c3, c4]), new
