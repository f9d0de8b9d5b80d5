"""Metrics: TensorBoard event files, a console progress line, and small reporting helpers.

Only process 0 writes. The writer logs whatever scalar keys the train step returns.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Mapping

import jax
import numpy as np


def bits_per_token(nats_sum: float, token_count: float) -> float:
  return float(nats_sum) / max(float(token_count), 1.0) / math.log(2.0)


def perplexity_bound(nats_sum: float, token_count: float) -> float:
  return float(math.exp(float(nats_sum) / max(float(token_count), 1.0)))


def tokens_per_forward(n_tokens: np.ndarray, nfe: np.ndarray) -> float:
  """Ratio of sums (not the mean of ratios)."""
  return float(np.sum(n_tokens)) / max(float(np.sum(nfe)), 1e-9)


def wilson_interval(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
  """Wilson score interval of a binomial proportion k / n (default 95%), in [0, 1].

  With no trials (n = 0) there is no interval: (nan, nan), so a report over an empty set says so
  instead of failing. A count outside [0, n] or a negative n is a bug: ValueError.
  """
  k, n = int(k), int(n)
  if n < 0 or not 0 <= k <= max(n, 0):
    raise ValueError(f"wilson_interval: need 0 <= k <= n, got k={k}, n={n}")
  if n == 0:
    return float("nan"), float("nan")
  p = k / n
  z2 = z * z
  denom = 1.0 + z2 / n
  centre = (p + z2 / (2 * n)) / denom
  half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
  return max(0.0, centre - half), min(1.0, centre + half)


def _average_ranks(x: np.ndarray) -> np.ndarray:
  """1-based ranks with ties given their average rank."""
  _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
  start = np.cumsum(counts) - counts
  return (start + (counts + 1) / 2.0)[inverse.ravel()]


def spearman(x, y) -> float:
  """Spearman rank correlation with average ranks for ties.

  NaN when it is undefined: fewer than two points, or either side constant (a correlation of
  0.0 there would read as "no relation" and enter averages as if measured).
  """
  x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
  if x.shape != y.shape:
    raise ValueError(f"spearman needs two sequences of equal length, got {x.size} and {y.size}")
  if x.size < 2:
    return float("nan")
  rx, ry = _average_ranks(x), _average_ranks(y)
  rx, ry = rx - rx.mean(), ry - ry.mean()
  den = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
  return float((rx * ry).sum() / den) if den > 0 else float("nan")


def content_length(tokens: np.ndarray, eos_id: int) -> np.ndarray:
  """Tokens before the first EOS in each row [B]."""
  tokens = np.asarray(tokens)
  is_eos = tokens == eos_id
  first = np.where(is_eos.any(-1), is_eos.argmax(-1), tokens.shape[-1])
  return first


class MetricWriter:
  """TensorBoard scalars (tensorboardX) plus a JSONL copy; a no-op on processes other than 0."""

  def __init__(self, workdir: str | None, enabled: bool | None = None):
    self.enabled = (jax.process_index() == 0) if enabled is None else enabled
    self._tb = None
    self._jsonl = None
    if self.enabled and workdir:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(logdir=os.path.join(workdir, "tb"), flush_secs=10)
      if "://" not in workdir:
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")

  def write_scalars(self, step: int, scalars: Mapping[str, Any], prefix: str = "") -> None:
    if not self.enabled:
      return
    clean = {f"{prefix}{k}": float(v) for k, v in scalars.items() if np.ndim(v) == 0}
    if self._tb is not None:
      for k, v in clean.items():
        self._tb.add_scalar(k, v, step)
    if self._jsonl is not None:
      self._jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
      self._jsonl.flush()

  def write_text(self, step: int, tag: str, text: str) -> None:
    if self.enabled and self._tb is not None:
      self._tb.add_text(tag, text, step)

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
    if self._jsonl is not None:
      self._jsonl.close()


class Progress:
  """Console line: step, loss, tokens/s, ETA. Rates are measured between log points."""

  def __init__(self, total_steps: int, start_step: int, tokens_per_step: int,
               stream=sys.stdout, enabled: bool | None = None):
    self.total = total_steps
    self.tokens_per_step = tokens_per_step
    self.stream = stream
    self.enabled = (jax.process_index() == 0) if enabled is None else enabled
    self._last_step = start_step
    self._last_time = time.perf_counter()

  def rates(self, step: int, tokens_per_step: float | None = None) -> dict[str, float]:
    """Steps/s, tokens/s and ETA since the last call.

    `tokens_per_step`: what the network processed per step when the method reports it (the
    `model_tokens` metric, e.g. DID's packed rows); else batch x seq_len.
    """
    now = time.perf_counter()
    dt = max(now - self._last_time, 1e-9)
    steps = max(step - self._last_step, 0)
    self._last_step, self._last_time = step, now
    sps = steps / dt
    return dict(steps_per_sec=sps, tokens_per_sec=sps * (tokens_per_step or self.tokens_per_step),
                eta_sec=(self.total - step) / sps if sps > 0 else float("nan"))

  def line(self, step: int, metrics: Mapping[str, float], rates: Mapping[str, float]) -> str:
    eta = rates["eta_sec"]
    eta_s = "?" if not math.isfinite(eta) else time.strftime("%H:%M:%S", time.gmtime(eta))
    parts = [f"step {step:>7d}/{self.total}", f"loss {metrics.get('loss', float('nan')):.4f}"]
    if "bits_per_token" in metrics:
      parts.append(f"bpt {metrics['bits_per_token']:.3f}")
    parts += [f"lr {metrics.get('lr', 0.0):.2e}", f"tok/s {rates['tokens_per_sec']:,.0f}"]
    if "tflops_per_device" in rates:
      parts.append(f"TFLOP/s/dev {rates['tflops_per_device']:.3g}")
    if "mfu" in rates:
      parts.append(f"MFU {100 * rates['mfu']:.1f}%")
    parts.append(f"ETA {eta_s}")
    return " | ".join(parts)

  def log(self, step: int, metrics: Mapping[str, float], rates: Mapping[str, float]) -> None:
    if self.enabled:
      print(self.line(step, metrics, rates), file=self.stream, flush=True)
