"""The length law of DID's sampler under an exactly calibrated count head (analysis; numpy only).

Why lengths are a chain of their own. Under the deletion process the number of survivors m(t) is a pure-death
chain (every token dies at the same rate), so its time reversal is a pure-birth chain, and a count head that is
Bayes-optimal for lengths predicts a total insertion mass of E[n - m | m, t] (posterior over the data length n
given m survivors at time t, alpha = 1 - t). Given n and m the gap sizes of x_t are a uniform composition of
n - m into m + 1 parts, so that mass is spread evenly: L = E[n - m | m, t] / (m + 1) per gap (the content of
x_t could move it between gaps, never change the total by much on HMM-16, whose content says little about n).

The sampler of spec/did.md draws, per gap and step, "insert" with probability min(1, kappa L) (kappa =
1 / (T - i)): at most one token per gap per step, so length at most doubles per step, and mass above one per
gap is lost. With a time-conditioned head the loss is not made up later: a short x_t at time t reads as a short
document. `sampler_length_law` gives the exact law of the length after every step of that sampler for a perfect
head, so a trained model's lengths can be split into what the sampler loses and what the head gets wrong.
"""

from __future__ import annotations

import math

import numpy as np

MODES = ("variable", "fixed", "poisson")


def posterior_missing(prior: np.ndarray, m: int, t: float) -> float:
  """E[n - m | m survivors at time t] for a length prior p(n), n = 0..len(prior)-1, alpha(t) = 1 - t.

  0 when no n >= m has prior mass. At t = 1 (alpha = 0) only m = 0 is possible: E[n].
  """
  prior = np.asarray(prior, np.float64)
  n = np.arange(prior.size)
  alpha = 1.0 - float(t)
  ok = (n >= m) & (prior > 0)
  if not ok.any():
    return 0.0
  if alpha <= 0.0:
    return float((prior * n).sum() / prior.sum()) if m == 0 else 0.0
  if alpha >= 1.0:
    return 0.0
  logw = np.full(prior.size, -np.inf)
  nn = n[ok]
  logw[ok] = (np.log(prior[ok]) + np.array([math.lgamma(k + 1) - math.lgamma(k - m + 1) for k in nn])
              + (nn - m) * math.log1p(-alpha))
  w = np.exp(logw - logw.max())
  return float((w * (n - m)).sum() / w.sum())


def _binom_pmf(k: int, p: float) -> np.ndarray:
  """pmf of Binomial(k, p) over 0..k."""
  if p <= 0.0:
    out = np.zeros(k + 1)
    out[0] = 1.0
    return out
  if p >= 1.0:
    out = np.zeros(k + 1)
    out[k] = 1.0
    return out
  j = np.arange(k + 1)
  logc = np.array([math.lgamma(k + 1) - math.lgamma(i + 1) - math.lgamma(k - i + 1) for i in j])
  return np.exp(logc + j * math.log(p) + (k - j) * math.log1p(-p))


def _poisson_pmf(lam: float, top: int) -> np.ndarray:
  """pmf of Poisson(lam) over 0..top, the tail folded into `top`."""
  j = np.arange(top + 1)
  if lam <= 0.0:
    out = np.zeros(top + 1)
    out[0] = 1.0
    return out
  p = np.exp(j * math.log(lam) - lam - np.array([math.lgamma(i + 1) for i in j]))
  p[-1] += max(0.0, 1.0 - p.sum())
  return p


def sampler_length_law(prior: np.ndarray, num_steps: int, capacity: int, mode: str = "variable"
                       ) -> np.ndarray:
  """Law of the number of tokens after each step of the tau-leaping sampler with a calibrated count head.

  Args:
    prior: data length law p(n), n = 0..len-1 (mode 'fixed' ignores it: n = capacity).
    num_steps: T; step i runs at t_i = 1 - i / T with kappa = 1 / (T - i).
    capacity: the sampler's buffer (insertions past it are dropped, as in the sampler).
    mode: 'variable' = Bayes total E[n - m | m, t] (the count head with time input), at most one insertion per
      gap; 'fixed' = total capacity - m (the seqnorm head), at most one per gap; 'poisson' = the variable head
      with Poisson(kappa * total) insertions per step and no per-gap cap (a what-if, not the spec's sampler).

  Returns:
    float64 [T + 1, capacity + 1]: row i is the law of the length before step i (row 0: all mass at 0),
    row T the law of the final length.
  """
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
  if num_steps < 1 or capacity < 1:
    raise ValueError(f"need num_steps >= 1 and capacity >= 1; got {num_steps}, {capacity}")
  laws = np.zeros((num_steps + 1, capacity + 1))
  laws[0, 0] = 1.0
  for i in range(num_steps):
    t = 1.0 - i / num_steps
    kappa = 1.0 / (num_steps - i)
    cur, nxt = laws[i], np.zeros(capacity + 1)
    for m in np.nonzero(cur > 0)[0]:
      m = int(m)
      total = float(capacity - m) if mode == "fixed" else posterior_missing(prior, m, t)
      if mode == "poisson":
        inc = _poisson_pmf(kappa * total, capacity - m)
      else:
        inc = _binom_pmf(m + 1, min(1.0, kappa * total / (m + 1)))
      for k, p in enumerate(inc):
        nxt[min(m + k, capacity)] += cur[m] * p
    laws[i + 1] = nxt
  return laws
