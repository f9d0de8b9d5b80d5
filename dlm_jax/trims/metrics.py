"""TRIMS evaluation metrics: accuracy under parallelism (AUP) and the reveal-rank correlation."""

from __future__ import annotations

import logging
import math
from typing import Optional, Sequence, Union

import jax
import numpy as np

from dlm_jax import metrics

logger = logging.getLogger(__name__)

ArrayLike = Union[np.ndarray, jax.Array, Sequence[float]]


def aup_weight(y: ArrayLike, y_max: float, alpha: float = 3.0) -> np.ndarray:
  """W(y) = min(exp(-alpha (1 - y / y_max)), 1) (float64)."""
  y = np.asarray(y, np.float64)
  return np.minimum(np.exp(-alpha * (1.0 - y / y_max)), 1.0)


def aup(tpf: ArrayLike, acc: ArrayLike, y_max: float, alpha: float = 3.0, y_min_offset: float = 5.0) -> float:
  """Accuracy under parallelism (d3LLM definition), accuracy in percent.

  Points are sorted by TPF (rho); y_1 = accuracy at the smallest rho; points with y < y_1 - y_min_offset are dropped
  (with a logged warning); then
    AUP = rho_1 y_1 + sum_{i>=2} (rho_i - rho_{i-1}) (y_i W(y_i) + y_{i-1} W(y_{i-1})) / 2.

  Args:
    tpf: [n] tokens per forward of one method's points.
    acc: [n] accuracies in percent.
    y_max: best accuracy of any method on the task.
    alpha: weight sharpness.
    y_min_offset: drop threshold below y_1.

  Returns:
    AUP as a float.
  """
  rho = np.asarray(tpf, np.float64).ravel()
  y = np.asarray(acc, np.float64).ravel()
  if rho.shape != y.shape or rho.size == 0:
    raise ValueError(f"aup needs equal, non-empty tpf and acc, got {rho.shape} and {y.shape}")
  if not y_max > 0:
    raise ValueError(f"y_max must be > 0, got {y_max}")
  order = np.argsort(rho, kind="stable")
  rho, y = rho[order], y[order]
  keep = y >= y[0] - y_min_offset
  if not keep.all():
    dropped = [(float(a), float(b)) for a, b in zip(rho[~keep], y[~keep])]
    logger.warning("aup: dropping %d point(s) more than %g below y_1 = %g: %s", len(dropped), y_min_offset, y[0],
                   dropped)
  rho, y = rho[keep], y[keep]
  wy = y * aup_weight(y, y_max, alpha)
  return float(rho[0] * y[0] + np.sum(np.diff(rho) * (wy[1:] + wy[:-1]) / 2.0))


def reveal_rank_correlation(commit_pass: ArrayLike, bucket: ArrayLike, valid: Optional[ArrayLike] = None) -> float:
  """Mean over responses of Spearman(commit pass, bucket) on valid slots.

  Positive = hard slots (bucket 1) committed first. Responses where either side is constant (e.g. all slots
  committed in one pass) or with fewer than two valid slots have no correlation and are left out.

  Args:
    commit_pass: [B, R] (or [R]) pass index at which each slot was committed.
    bucket: [B, R] bucket ids (1 = hardest).
    valid: [B, R] bool; None = bucket > 0.

  Returns:
    The average correlation, NaN if no response has one.
  """
  cp = np.atleast_2d(np.asarray(commit_pass))
  bk = np.atleast_2d(np.asarray(bucket))
  if cp.shape != bk.shape:
    raise ValueError(f"commit_pass {cp.shape} and bucket {bk.shape} differ in shape")
  v = bk > 0 if valid is None else np.atleast_2d(np.asarray(valid, bool))
  rhos = [metrics.spearman(cp[b][v[b]], bk[b][v[b]]) for b in range(cp.shape[0])]
  rhos = [r for r in rhos if not math.isnan(r)]
  return float(np.mean(rhos)) if rhos else float("nan")
