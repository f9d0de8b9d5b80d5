"""Exact oracles of the DID maths by brute force (pure Python, exponential time: tiny inputs only)."""

from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np


# Test helpers (pure Python, exponential time: tiny inputs only).
# ---------------------------------------------------------------------------------------------------------------------


def brute_force_count(y: Sequence[int], x: Sequence[int]) -> int:
  """N(y, x): number of index tuples k_1 < ... < k_|y| with x[k_j] = y_j (itertools enumeration)."""
  y, x = list(y), list(x)
  return sum(1 for idx in itertools.combinations(range(len(x)), len(y)) if all(x[i] == c for i, c in zip(idx, y)))


def brute_force_targets(x0: Sequence[int], xt: Sequence[int], vocab_size: int) -> tuple[int, np.ndarray]:
  """(N(xt, x0), rho [m+1, V] float64) with rho[g, v] = N(Ins(xt, g, v), x0) / N(xt, x0) by enumeration."""
  xt = list(xt)
  n_base = brute_force_count(xt, x0)
  rho = np.zeros((len(xt) + 1, vocab_size))
  for g in range(len(xt) + 1):
    for v in set(x0):
      rho[g, v] = brute_force_count(xt[:g] + [v] + xt[g:], x0) / n_base if n_base else np.nan
  return n_base, rho
