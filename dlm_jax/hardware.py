"""Accelerator facts in one place: peak FLOP/s and usable memory per device, and named compile targets.

Used by the trainer (TFLOP/s per device and MFU on the progress line) and by
`python -m dlm_jax.compile` (does a step fit the chip, how long would it take at a given MFU).

Peaks are dense bfloat16 FLOP/s per JAX *device* (a v4 or v5p "megacore" device is one chip; a v2/v3
device is one core, half a chip), from the vendors' published figures. Usable HBM per device is what
libtpu's compiler reports as available when a program does not fit ("exceeds available HBM (30.75G)",
measured for every TPU listed with jax 0.10.2 / libtpu 0.0.42), slightly less than the chip's HBM.

Compile targets (`topology_devices`): libtpu's own names (`v5e:4x4`, `v4:2x2x4`, `v5p:2x2x1`, ...; v4
always in megacore mode, one device per chip, as real v4 slices run) and the Cloud slice names
(`v4-32`, `v5e-16`, `v5litepod-16`, `v5p-8`, `v6e-8`), which libtpu itself rejects, mapped to them.
GPU targets (`h100:8`, `h100:2x8`) need the CUDA PJRT plugin (`pip install -e '.[gpu_compile]'`) and
the target description `dlm_jax/gpu_targets/<name>.txtpb`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from typing import Any, Optional, Sequence

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator generation as JAX sees it (`device.device_kind`)."""
  name: str                       # short name used in tables: 'TPU v5e', 'H100'
  kind_pattern: str               # regex matched against device.device_kind
  peak_flops: Optional[float]     # dense bf16 FLOP/s per JAX device (None: unknown -> no MFU)
  hbm_bytes: Optional[float]      # usable memory per JAX device (None: unknown)
  note: str = ""


CHIPS: tuple[Chip, ...] = (
    # TPU: usable HBM from libtpu's out-of-memory message; peaks per chip (= per megacore device).
    Chip("TPU v2", r"^TPU v2$", 45e12 / 2, None, "one device per core; 8 GiB HBM per core"),
    Chip("TPU v3", r"^TPU v3$", 123e12 / 2, 15.48 * GiB, "one device per core (2 per chip)"),
    Chip("TPU v4", r"^TPU v4$", 275e12, 30.75 * GiB, "megacore: one device per chip (32 GiB)"),
    Chip("TPU v5e", r"^TPU v5 ?(lite|e)$", 197e12, 15.75 * GiB, "16 GiB per chip"),
    Chip("TPU v5p", r"^TPU v5p?$", 459e12, 95.74 * GiB, "95 GiB per chip"),
    Chip("TPU v6e", r"^TPU v6 ?(lite|e)$", 918e12, 31.25 * GiB, "32 GiB per chip"),
    Chip("TPU7x", r"^TPU ?7x$", None, 94.75 * GiB, "peak per device not published here"),
    # GPU: usable = 90% of the memory (launch/slurm_gpu.sbatch sets XLA_PYTHON_CLIENT_MEM_FRACTION=0.90).
    Chip("H100 PCIe", r"H100.*PCIe", 756e12, 0.9 * 80 * GiB),
    Chip("H100", r"H100", 989e12, 0.9 * 80 * GiB, "SXM; 90% of 80 GiB usable"),
    Chip("H200", r"H200", 989e12, 0.9 * 141 * GiB),
    Chip("A100 40GB", r"A100.*40GB", 312e12, 0.9 * 40 * GiB),
    Chip("A100", r"A100", 312e12, 0.9 * 80 * GiB),
    Chip("B200", r"B200", 2250e12, 0.9 * 180 * GiB),
    Chip("CPU", r"^cpu$", None, None),
)


def chip_for(device_kind: str) -> Optional[Chip]:
  """The `Chip` whose pattern matches a `device.device_kind`, or None."""
  for chip in CHIPS:
    if re.search(chip.kind_pattern, device_kind or ""):
      return chip
  return None


def peak_flops_per_device(devices: Sequence[Any]) -> Optional[float]:
  """Dense bf16 peak FLOP/s of one device of `devices` (all of one kind), or None if unknown."""
  kinds = {getattr(d, "device_kind", "") for d in devices}
  if len(kinds) != 1:
    return None
  chip = chip_for(kinds.pop())
  return chip.peak_flops if chip else None


def throughput(step_flops: float, steps_per_sec: float, num_devices: int,
               peak_flops: Optional[float]) -> dict[str, float]:
  """TFLOP/s per device at a measured step rate, and MFU where the chip's peak is known.

  `step_flops` is the analytic model FLOPs of one step over all devices (models/flops.py).
  """
  per_device = step_flops * steps_per_sec / max(num_devices, 1)
  out = {"tflops_per_device": per_device / 1e12}
  if peak_flops:
    out["mfu"] = per_device / peak_flops
  return out


def target_platform(devices: Sequence[Any]) -> str:
  """'tpu', 'gpu' or 'cpu': the platform a computation over `devices` is compiled for.

  Read from the devices (abstract, compile-only devices included), never from
  `jax.default_backend()`, which names the host's backend ('cpu' when compiling for a TPU here).
  """
  plats = {getattr(d, "platform", "cpu") for d in devices}
  if len(plats) != 1:
    raise ValueError(f"devices of several platforms {sorted(plats)} in one mesh.")
  plat = plats.pop()
  return "gpu" if plat in ("gpu", "cuda", "rocm") else plat


# -- named compile targets ------------------------------------------------------------------------
# Cloud slice name -> (libtpu topology name, extra kwargs of get_topology_desc).
_MEGACORE = {"chip_config_name": "megacore"}
_ONE_CHIP = {"chips_per_host_bounds": [1, 1, 1]}
TPU_SLICES: dict[str, tuple[str, dict[str, Any]]] = {
    "v4-8": ("v4:2x2x1", _MEGACORE), "v4-16": ("v4:2x2x2", _MEGACORE),
    "v4-32": ("v4:2x2x4", _MEGACORE), "v4-64": ("v4:2x4x4", _MEGACORE),
    "v4-128": ("v4:4x4x4", _MEGACORE), "v4-256": ("v4:4x4x8", _MEGACORE),
    "v5e-1": ("v5e:1x1", _ONE_CHIP), "v5e-4": ("v5e:2x2", {}), "v5e-8": ("v5e:2x4", {}),
    "v5e-16": ("v5e:4x4", {}), "v5e-32": ("v5e:4x8", {}), "v5e-64": ("v5e:8x8", {}),
    "v5e-128": ("v5e:8x16", {}), "v5e-256": ("v5e:16x16", {}),
    "v5p-8": ("v5p:2x2x1", {}), "v5p-16": ("v5p:2x2x2", {}), "v5p-32": ("v5p:2x2x4", {}),
    "v5p-64": ("v5p:2x4x4", {}), "v5p-128": ("v5p:4x4x4", {}),
    "v6e-1": ("v6e:1x1", _ONE_CHIP), "v6e-4": ("v6e:2x2", {}), "v6e-8": ("v6e:2x4", {}),
    "v6e-16": ("v6e:4x4", {}), "v6e-64": ("v6e:8x8", {}), "v6e-256": ("v6e:16x16", {}),
}
_TPU_NAME = re.compile(r"^([a-zA-Z0-9_ ]+)[=_:]([0-9x]+)(_twisted|_untwisted)?$")
# GPU targets: <gpu>:<devices per host> or <gpu>:<hosts>x<devices per host>.
_GPU_NAME = re.compile(r"^(h100):(?:(\d+)x)?(\d+)$", re.IGNORECASE)
GPU_TARGET_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_targets")


class TopologyError(ValueError):
  """A compile target that cannot be built (unknown name, missing plugin)."""


def accepted_names() -> str:
  """Human-readable list of the compile targets `topology_devices` takes."""
  slices = ", ".join(TPU_SLICES)
  return (f"Cloud TPU slice names: {slices}; libtpu topology names <generation>:<chips per "
          "dimension>, e.g. v4:2x2x4 (v4-32), v5e:4x4 (v5e-16), v5e:16x16 (v5e-256), v5p:2x2x1 "
          "(v5p-8), v6e:2x2 (also 'TPU v5 lite:4x4'; generations v2, v3, v4, v5e, v5p, v6e, "
          "TPU7x); GPU: h100:<gpus> or h100:<hosts>x<gpus per host> (needs the "
          "[gpu_compile] extra).")


def _libtpu_name(name: str) -> tuple[str, dict[str, Any]]:
  if name in TPU_SLICES:
    return TPU_SLICES[name]
  alias = re.match(r"^v5litepod-(\d+)$", name)
  if alias and f"v5e-{alias.group(1)}" in TPU_SLICES:
    return TPU_SLICES[f"v5e-{alias.group(1)}"]
  if not _TPU_NAME.match(name):
    raise TopologyError(f"--topology={name!r} is not a known compile target. Accepted: "
                        f"{accepted_names()}")
  kwargs: dict[str, Any] = {}
  gen = name.split(":")[0].strip().lower()
  if gen in ("v4", "tpu v4"):
    kwargs = dict(_MEGACORE)  # real v4 slices run one device per chip
  if re.match(r"^.*:1x1(x1)?$", name):
    kwargs["chips_per_host_bounds"] = [1, 1, 1]
  return name, kwargs


@functools.lru_cache(maxsize=None)
def _tpu_devices(name: str, kwargs_items: tuple) -> tuple[Any, ...]:
  # libtpu takes a host-wide lock (/tmp/libtpu_lockfile) meant for real TPUs; compile-only use
  # must not collide with another process (a test worker, a training run) that loaded it too.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs_items}
  return tuple(topologies.get_topology_desc(topology_name=name, platform="tpu", **kwargs).devices)


@functools.lru_cache(maxsize=None)
def _gpu_devices(gpu: str, hosts: int, per_host: int) -> tuple[Any, ...]:
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  path = os.path.join(GPU_TARGET_DIR, f"{gpu}.txtpb")
  target = open(path, encoding="utf-8").read()
  return tuple(topologies.get_topology_desc(platform="cuda", topology_name="",
                                            target_config=target,
                                            topology=f"1x{hosts}x{per_host}").devices)


def gpu_compile_available() -> Optional[str]:
  """None when compile-only CUDA targets work here, else the reason they do not."""
  try:
    import jax_plugins.xla_cuda12  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return ("the CUDA PJRT plugin is not installed: pip install -e '.[gpu_compile]' "
            "(jax-cuda12-plugin and jax-cuda12-pjrt, the versions jax pins)")
  return None


def topology_devices(name: str) -> tuple[str, list[Any]]:
  """(description, abstract devices) of a named compile target; TopologyError when unknown.

  The devices are compile-only: a Mesh of them plus `jax.jit(...).lower(...).compile()` compiles for
  that hardware on any host (keep JAX_PLATFORMS=cpu).
  """
  name = name.strip()
  gpu = _GPU_NAME.match(name)
  if gpu:
    reason = gpu_compile_available()
    if reason:
      raise TopologyError(f"--topology={name!r} needs {reason}.")
    hosts, per_host = int(gpu.group(2) or 1), int(gpu.group(3))
    devices = list(_gpu_devices(gpu.group(1).lower(), hosts, per_host))
    return f"{name} ({hosts} host(s) x {per_host} GPUs, CUDA)", devices
  tpu_name, kwargs = _libtpu_name(name)
  try:
    import libtpu  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    raise TopologyError(
        f"--topology={name!r} needs libtpu (the version jax pins): pip install -e '.[tpu]'.") from e
  try:
    frozen = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items()))
    devices = list(_tpu_devices(tpu_name, frozen))
  except Exception as e:  # pylint: disable=broad-except  # libtpu's INVALID_ARGUMENT / NOT_FOUND
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise TopologyError(f"--topology={name!r}: libtpu rejected {tpu_name!r} ({first}). Accepted: "
                        f"{accepted_names()}") from e
  extra = " megacore" if kwargs.get("chip_config_name") == "megacore" else ""
  return f"{name} (libtpu {tpu_name}{extra})", devices
