"""Noise schedules for masked diffusion: alpha(t) and the NELBO weight as pure functions.

A schedule maps t in [0, 1] to the probability alpha(t) that a token is still clean, with
alpha(0) = 1 and alpha(1) = 0 (for eps = 0). The continuous-time NELBO weight is
w(t) = -alpha'(t) / (1 - alpha(t)). One schedule object serves the loss and the samplers (the
ancestral step's reveal probabilities read the same alpha(t)), so they never disagree.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class LogLinearSchedule:
  """alpha(t) = 1 - (1 - eps) t; the weight is exactly 1/t for every eps."""
  eps: float = 0.0

  def alpha(self, t):
    return 1.0 - (1.0 - self.eps) * t

  def mask_prob(self, t):
    return 1.0 - self.alpha(t)

  def dalpha_dt(self, t):
    return -(1.0 - self.eps) * jnp.ones_like(jnp.asarray(t, jnp.float32))

  def weight(self, t):
    return 1.0 / t


@dataclasses.dataclass(frozen=True)
class CosineSchedule:
  """alpha(t) = eps + (1 - eps) cos(pi t / 2)."""
  eps: float = 0.0

  def alpha(self, t):
    return self.eps + (1.0 - self.eps) * jnp.cos(0.5 * math.pi * t)

  def mask_prob(self, t):
    return 1.0 - self.alpha(t)

  def dalpha_dt(self, t):
    return -(1.0 - self.eps) * 0.5 * math.pi * jnp.sin(0.5 * math.pi * t)

  def weight(self, t):
    return -self.dalpha_dt(t) / self.mask_prob(t)


SCHEDULES = {"loglinear": LogLinearSchedule, "cosine": CosineSchedule}


def get_schedule(name: str, eps: float = 0.0):
  """Returns the schedule object for `config.diffusion.schedule`."""
  if name not in SCHEDULES:
    raise ValueError(f"config.diffusion.schedule={name!r}; choose one of {sorted(SCHEDULES)}.")
  return SCHEDULES[name](eps=eps)


def as_schedule(schedule):
  """A schedule object from a name ("loglinear", "cosine"; eps = 0) or an object with alpha(t)."""
  if isinstance(schedule, str):
    if schedule not in SCHEDULES:
      raise ValueError(f"schedule must be one of {sorted(SCHEDULES)} or an object with alpha(t); "
                       f"got {schedule!r}")
    return SCHEDULES[schedule]()
  if hasattr(schedule, "alpha"):
    return schedule
  raise ValueError(f"schedule must be one of {sorted(SCHEDULES)} or an object with alpha(t); "
                   f"got {schedule!r}")
