"""Metrics: TensorBoard event files and metrics.jsonl (local or gs://), a console progress line,
and small reporting helpers.

Only process 0 writes. The writer logs whatever scalar keys the train step returns.
"""

from __future__ import annotations

import json
import math
import os
import socket
import struct
import sys
import time
from typing import Any, Mapping

import jax
import numpy as np

from dlm_jax import paths


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


_EVENT_HEADER = struct.Struct("<Q")


def _masked_crc(data: bytes) -> bytes:
  from tensorboardX.record_writer import masked_crc32c  # pylint: disable=g-import-not-at-top
  return struct.pack("<I", masked_crc32c(data))


def encode_record(data: bytes) -> bytes:
  """One TFRecord frame (length, its CRC, data, its CRC): the framing of TensorBoard event files."""
  header = _EVENT_HEADER.pack(len(data))
  return header + _masked_crc(header) + data + _masked_crc(data)


def decode_records(blob: bytes) -> tuple[list[bytes], int]:
  """The complete records of an event file and the byte length they span.

  A record cut short (a crash mid-write) or with a bad checksum ends the list: what follows it
  cannot be trusted.
  """
  out, i = [], 0
  while i + 12 <= len(blob):
    header = blob[i:i + 8]
    (n,) = _EVENT_HEADER.unpack(header)
    if blob[i + 8:i + 12] != _masked_crc(header) or i + 12 + n + 4 > len(blob):
      break
    data = blob[i + 12:i + 12 + n]
    if blob[i + 12 + n:i + 16 + n] != _masked_crc(data):
      break
    out.append(data)
    i += 16 + n
  return out, i


def read_event_scalars(path: str) -> list[tuple[int, str, float]]:
  """(step, tag, value) of every scalar in one event file (local or gs://), in file order."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  out = []
  for data in decode_records(paths.read_bytes(path))[0]:
    ev = event_pb2.Event.FromString(data)
    out += [(int(ev.step), v.tag, float(v.simple_value)) for v in ev.summary.value]
  return out


class _LogFile:
  """A file that only grows, on local disk or on GCS.

  Local: appended and flushed at each write (a crash loses at most the line being written).
  GCS (objects cannot be appended to): the content is kept in memory and the whole object is
  uploaded by `flush` (at most every `flush_secs` unless forced; the trainer forces it at every
  checkpoint, so what a restart keeps is always uploaded).
  """

  def __init__(self, path: str, initial: bytes, flush_secs: float):
    self.path = path
    self._remote = paths.is_remote(path)
    self._flush_secs = flush_secs
    self._dirty = False
    self._last_upload = time.monotonic()
    if self._remote:
      self._buf = bytearray(initial)
      self._f = None
    else:
      paths.makedirs(os.path.dirname(os.path.abspath(path)))
      self._f = open(path, "ab")

  def write(self, data: bytes) -> None:
    if self._remote:
      self._buf += data
      self._dirty = True
    else:
      self._f.write(data)
      self._f.flush()

  def flush(self, force: bool = False) -> None:
    if not self._remote or not self._dirty:
      return
    if force or time.monotonic() - self._last_upload >= self._flush_secs:
      paths.write_bytes(self.path, bytes(self._buf))
      self._dirty = False
      self._last_upload = time.monotonic()

  def close(self) -> None:
    if self._remote:
      self.flush(force=True)
    elif self._f is not None:
      self._f.close()
      self._f = None

  def discard(self) -> None:
    self._dirty = False
    if self._f is not None:
      self._f.close()
      self._f = None


def _keep_jsonl_rows(blob: bytes, last_step: int) -> bytes:
  """The complete rows of a metrics.jsonl whose step is <= last_step."""
  kept = []
  for line in blob.split(b"\n"):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except ValueError:
      continue  # a line cut short by a crash
    if isinstance(row, dict) and int(row.get("step", 0)) <= last_step:
      kept.append(line + b"\n")
  return b"".join(kept)


def _keep_events(blob: bytes, last_step: int) -> bytes:
  """The complete records of an event file, without the summaries of steps > last_step."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  out = []
  for data in decode_records(blob)[0]:
    ev = event_pb2.Event.FromString(data)
    if ev.HasField("summary") and ev.step > last_step:
      continue
    out.append(encode_record(data))
  return b"".join(out)


class MetricWriter:
  """TensorBoard scalars plus a metrics.jsonl copy, local or on gs://; a no-op on processes other
  than 0.

  Rows are one per step and kind after any sequence of crashes and restarts: opened with
  `start_step` (the step the run restored, 0 for a fresh start), it first drops the rows and
  events of steps after it that an earlier, interrupted run wrote, then appends. Event files are
  TensorBoard's format (TFRecord frames of `Event` protos, written with tensorboardX's protos); each
  start adds one new file.
  """

  def __init__(self, workdir: str | None, enabled: bool | None = None, start_step: int = 0,
               flush_secs: float = 30.0):
    self.enabled = (jax.process_index() == 0) if enabled is None else enabled
    self._jsonl: _LogFile | None = None
    self._events: _LogFile | None = None
    if not (self.enabled and workdir):
      return
    jsonl_path = paths.join(workdir, "metrics.jsonl")
    self._jsonl = _LogFile(jsonl_path, self._trim(jsonl_path, start_step, _keep_jsonl_rows),
                           flush_secs)
    tb = paths.join(workdir, "tb")
    for name in paths.listdir(tb):
      if name.startswith("events.out.tfevents."):
        self._trim(paths.join(tb, name), start_step, _keep_events)
    name = (f"events.out.tfevents.{time.time():.6f}.{socket.gethostname()}.{os.getpid()}"
            .replace("/", "_"))
    self._events = _LogFile(paths.join(tb, name), b"", flush_secs)
    from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
    self._event_pb2 = event_pb2
    self._write_event(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

  @staticmethod
  def _trim(path: str, start_step: int, keep) -> bytes:
    """Rewrites `path` without what comes after `start_step` (if anything does); its content."""
    if not paths.exists(path):
      return b""
    blob = paths.read_bytes(path)
    kept = keep(blob, start_step)
    if kept != blob:
      paths.write_bytes(path, kept)
    return kept

  def _write_event(self, event) -> None:
    self._events.write(encode_record(event.SerializeToString()))

  def write_scalars(self, step: int, scalars: Mapping[str, Any], prefix: str = "") -> None:
    if not self.enabled:
      return
    clean = {f"{prefix}{k}": float(v) for k, v in scalars.items() if np.ndim(v) == 0}
    if self._events is not None:
      from tensorboardX import summary  # pylint: disable=g-import-not-at-top
      for k, v in clean.items():
        self._write_event(self._event_pb2.Event(wall_time=time.time(), step=int(step),
                                                summary=summary.scalar(k, v)))
    if self._jsonl is not None:
      self._jsonl.write((json.dumps({"step": int(step), **clean}) + "\n").encode())
    self.flush()

  def write_text(self, step: int, tag: str, text: str) -> None:
    if self.enabled and self._events is not None:
      from tensorboardX import summary  # pylint: disable=g-import-not-at-top
      self._write_event(self._event_pb2.Event(wall_time=time.time(), step=int(step),
                                              summary=summary.text(tag, text)))

  def flush(self, force: bool = False) -> None:
    """Local files are always flushed; on GCS this uploads (every flush_secs, or now if force)."""
    for f in (self._jsonl, self._events):
      if f is not None:
        f.flush(force)

  def close(self) -> None:
    for f in (self._jsonl, self._events):
      if f is not None:
        f.close()
    self._jsonl = self._events = None

  def discard(self) -> None:
    """Closes without uploading what is not yet on GCS (the workdir has a new owner)."""
    for f in (self._jsonl, self._events):
      if f is not None:
        f.discard()
    self._jsonl = self._events = None


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


def t_interval(xs, level: float = 0.95) -> tuple[float, float, float]:
  """(mean, lower, upper): Student-t interval of the mean of a few independent values (e.g. seeds).

  One value gives (x, nan, nan): no spread, no interval.
  """
  from scipy import stats  # pylint: disable=g-import-not-at-top  (scipy comes with jax)
  xs = np.asarray(xs, np.float64).ravel()
  if xs.size == 0:
    raise ValueError("t_interval: no values")
  m = float(xs.mean())
  if xs.size < 2:
    return m, float("nan"), float("nan")
  half = float(stats.t.ppf(0.5 + level / 2, xs.size - 1)) * float(xs.std(ddof=1)) / math.sqrt(xs.size)
  return m, m - half, m + half


def welch_interval(xs, ys, level: float = 0.95) -> tuple[float, float, float]:
  """(diff, lower, upper): mean(xs) - mean(ys) with a Welch t-interval (unequal variances, independent runs).

  Fewer than 2 values on a side: (diff, nan, nan). Zero spread on both sides: a zero-width interval.
  """
  from scipy import stats  # pylint: disable=g-import-not-at-top
  xs, ys = np.asarray(xs, np.float64).ravel(), np.asarray(ys, np.float64).ravel()
  d = float(xs.mean() - ys.mean())
  if xs.size < 2 or ys.size < 2:
    return d, float("nan"), float("nan")
  vx, vy = xs.var(ddof=1) / xs.size, ys.var(ddof=1) / ys.size
  se = math.sqrt(vx + vy)
  if se == 0.0:
    return d, d, d
  df = (vx + vy) ** 2 / (vx ** 2 / (xs.size - 1) + vy ** 2 / (ys.size - 1))
  half = float(stats.t.ppf(0.5 + level / 2, df)) * se
  return d, d - half, d + half


class MissingExtraError(ImportError):
  """An optional dependency is not installed; the message names the extra that installs it."""


def pyplot():
  """matplotlib.pyplot on the file-only Agg backend; plots are an optional extra.

  Raises:
    MissingExtraError: matplotlib is not installed (pip install 'dlm-jax[plots]').
  """
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise MissingExtraError(
        "Plotting needs matplotlib, which the core install leaves out: pip install "
        "'dlm-jax[plots]' (in a clone: pip install -e '.[plots]').") from e
  return plt
