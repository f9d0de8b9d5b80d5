"""Heavy/light model schedules for ancestral sampling (arXiv 2604.02340).

A schedule is a sequence of contiguous segments, e.g. (("L", 125), ("H", 750), ("L", 125)):
light model on steps [0, 125) and [875, 1000) (the "sandwich"); step 0 is the noisy start.
Their cost is counted in `dlm_jax.scheduling.flops`.
"""

from __future__ import annotations

import itertools
from typing import Any, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

FAMILIES = ("prefix", "suffix", "sandwich", "middle")


class ModelSchedule:
  """A heavy/light schedule made of contiguous segments.

  Attributes:
    segments: tuple of (kind, length), kind "H" (heavy) or "L" (light), length >= 1.
    num_steps: T = sum of the lengths.
  """

  def __init__(self, segments: Sequence[Tuple[str, int]], num_steps: Optional[int] = None):
    """Validates and stores the segments.

    Args:
      segments: sequence of (kind, length) pairs.
      num_steps: optional expected T; the lengths must sum to it.

    Raises:
      ValueError: naming `segments` or `num_steps` when a kind, a length or the total is wrong.
    """
    segs = []
    for i, seg in enumerate(segments):
      try:
        kind, length = seg
      except (TypeError, ValueError):
        raise ValueError(f"segments[{i}] must be a (kind, length) pair, got {seg!r}") from None
      kind = str(kind).upper()
      if kind not in ("H", "L"):
        raise ValueError(f"segments[{i}] kind must be 'H' or 'L', got {seg[0]!r}")
      if isinstance(length, bool) or int(length) != length or int(length) < 1:
        raise ValueError(f"segments[{i}] length must be a positive integer, got {length!r}")
      segs.append((kind, int(length)))
    if not segs:
      raise ValueError("segments must not be empty")
    self.segments: Tuple[Tuple[str, int], ...] = tuple(segs)
    total = sum(n for _, n in segs)
    if num_steps is not None and total != int(num_steps):
      raise ValueError(f"segments lengths sum to {total}, but num_steps = {num_steps}")
    self.num_steps = total

  @classmethod
  def from_light_steps(cls, light_steps: Sequence[int], num_steps: int) -> "ModelSchedule":
    """Schedule from the set of light step indices.

    Raises:
      ValueError: naming `light_steps` when a step lies outside [0, num_steps), or
        `num_steps` when it is not positive.
    """
    if int(num_steps) < 1:
      raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    is_light = np.zeros((int(num_steps),), bool)
    for i in light_steps:
      if not 0 <= int(i) < int(num_steps):
        raise ValueError(f"light_steps contains {i}, outside [0, num_steps={num_steps})")
      is_light[int(i)] = True
    return cls.from_mask(is_light)

  @classmethod
  def from_mask(cls, is_light: Sequence[bool]) -> "ModelSchedule":
    """Schedule from an is_light [T] boolean array."""
    is_light = np.asarray(is_light, bool)
    if is_light.ndim != 1 or is_light.size == 0:
      raise ValueError(f"is_light must be a non-empty 1-D array, got shape {is_light.shape}")
    segs = [("L" if k else "H", len(list(g))) for k, g in itertools.groupby(is_light.tolist())]
    return cls(segs)

  @classmethod
  def from_placement(cls, light_segments: Sequence[int], num_segments: int,
                     segment_len: int) -> "ModelSchedule":
    """Schedule of `num_segments` equal segments, light where listed in `light_segments`."""
    if num_segments < 1 or segment_len < 1:
      raise ValueError(f"num_segments ({num_segments}) and segment_len ({segment_len}) must "
                       f"be >= 1")
    light = set(int(i) for i in light_segments)
    for i in light:
      if not 0 <= i < num_segments:
        raise ValueError(f"light_segments contains {i}, outside [0, num_segments={num_segments})")
    mask = np.repeat([i in light for i in range(num_segments)], segment_len)
    return cls.from_mask(mask)

  def expand(self) -> np.ndarray:
    """is_light [T] bool (numpy)."""
    return np.concatenate([np.full((n,), k == "L") for k, n in self.segments])

  @property
  def num_light(self) -> int:
    """Number of light steps."""
    return sum(n for k, n in self.segments if k == "L")

  def __str__(self) -> str:
    return ",".join(f"{k}{n}" for k, n in self.segments)

  def __repr__(self) -> str:
    return f"ModelSchedule({self.segments!r})"

  def __eq__(self, other: Any) -> bool:
    return isinstance(other, ModelSchedule) and self.segments == other.segments

  def __hash__(self) -> int:
    return hash(self.segments)


def parse_schedule(spec: str, num_steps: Optional[int] = None) -> ModelSchedule:
  """Parses "L125,H750,L125" into a `ModelSchedule`.

  Raises:
    ValueError: naming the bad segment, or `num_steps` when the total differs.
  """
  segs = []
  for part in str(spec).split(","):
    part = part.strip()
    if not part:
      raise ValueError(f"schedule {spec!r}: empty segment")
    kind, digits = part[0].upper(), part[1:]
    if kind not in ("H", "L") or not digits.isdigit():
      raise ValueError(f"schedule {spec!r}: segment {part!r} must look like H750 or L125")
    segs.append((kind, int(digits)))
  return ModelSchedule(segs, num_steps=num_steps)


def enumerate_placements(num_segments: int, num_light: int) -> List[Tuple[int, ...]]:
  """All placements of `num_light` light segments among `num_segments` (sorted tuples).

  E.g. (8, 2) gives the 28 pairs (0, 1), (0, 2), ..., (6, 7).
  """
  if num_segments < 1 or not 0 <= num_light <= num_segments:
    raise ValueError(f"need num_segments >= 1 and 0 <= num_light <= num_segments, got "
                     f"num_segments={num_segments}, num_light={num_light}")
  return list(itertools.combinations(range(num_segments), num_light))


def family_placement(family: str, num_segments: int, num_light: int) -> Tuple[int, ...]:
  """Light segments of a named family.

  "prefix" (first k), "suffix" (last k), "sandwich" (split between both ends, an odd count
  puts the extra segment at the start), "middle" (k centred segments, start (S - k) // 2).
  """
  if family not in FAMILIES:
    raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
  if num_segments < 1 or not 0 <= num_light <= num_segments:
    raise ValueError(f"need 0 <= num_light <= num_segments, got num_segments={num_segments}, "
                     f"num_light={num_light}")
  s, k = num_segments, num_light
  if family == "prefix":
    return tuple(range(k))
  if family == "suffix":
    return tuple(range(s - k, s))
  if family == "sandwich":
    head = (k + 1) // 2
    return tuple(range(head)) + tuple(range(s - (k - head), s))
  start = (s - k) // 2
  return tuple(range(start, start + k))
