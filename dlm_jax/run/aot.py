"""Ahead-of-time compilation of a run's steps for a named target: memory per device, fit, FLOPs.

`compile_report(config, "v5e:4x4")` builds the exact sharded train step (and the sampling step)
of `config` for the target's abstract devices (`hardware.topology_devices`), compiles it with the
target's compiler (libtpu, or the CUDA plugin for GPU targets) on this host, and reports per
device: HBM for arguments, outputs, temporaries and code, whether it fits the chip and by how much
it misses (with the config fields to change), the analytic FLOPs per step and per token (with the
compiler's count as a cross-check), and the step time and tokens/s implied at a given MFU.
`python -m dlm_jax.compile` prints it; `benchmarks/compile_table.py` tabulates it.
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any, Optional

import jax
import ml_collections

from dlm_jax import hardware
from dlm_jax import parallel
from dlm_jax.run import experiment as exp_lib
from dlm_jax.run import step as step_lib

GiB = hardware.GiB
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


class DoesNotFitError(RuntimeError):
  """The compiled step needs more memory per device than the target has."""


def _size(value: str, unit: str) -> float:
  return float(value) * _UNITS[(unit or "").upper()[:1]]


def parse_oom(message: str) -> Optional[tuple[float, float]]:
  """(needed, available) bytes per device from a compiler's out-of-memory message, or None.

  libtpu: "... the total memory required for HLO temporaries (31.00G) exceeds available HBM
  (30.75G)" or "Used 40.50G of 30.75G hbm. Exceeded hbm capacity by 9.75G."
  """
  m = re.search(r"\(([\d.]+)([KMGT]?)\)\s*exceeds available HBM\s*\(([\d.]+)([KMGT]?)\)", message)
  if m:
    return _size(m.group(1), m.group(2)), _size(m.group(3), m.group(4))
  m = re.search(r"Used\s+([\d.]+)([KMGT]?)\s+of\s+([\d.]+)([KMGT]?)\s+hbm", message, re.IGNORECASE)
  if m:
    return _size(m.group(1), m.group(2)), _size(m.group(3), m.group(4))
  return None


@dataclasses.dataclass
class StepReport:
  """One compiled step on one target (sizes in bytes, per device)."""
  name: str
  compile_seconds: float
  arguments: Optional[float] = None
  outputs: Optional[float] = None
  aliased: Optional[float] = None
  temporaries: Optional[float] = None
  code: Optional[float] = None
  total: Optional[float] = None       # the compiler's peak, or what the OOM message says is needed
  usable: Optional[float] = None      # the chip's usable memory per device
  fits: Optional[bool] = None
  compiler_flops: Optional[float] = None   # cost_analysis() per device (no Pallas kernels)
  kernel_calls: int = 0                    # Mosaic/Triton custom calls in the compiled HLO
  error: str = ""

  @property
  def margin(self) -> Optional[float]:
    """usable - total (negative: short by that much)."""
    if self.total is None or self.usable is None:
      return None
    return self.usable - self.total


def _compile(name: str, lowered_fn, usable: Optional[float]) -> tuple[StepReport, Any]:
  t0 = time.perf_counter()
  try:
    compiled = lowered_fn().compile()
  except Exception as e:  # pylint: disable=broad-except  # the compiler's OOM is a JaxRuntimeError
    msg = str(e)
    oom = parse_oom(msg)
    if oom is None:
      raise
    needed, available = oom
    rep = StepReport(name, time.perf_counter() - t0, total=needed, usable=available, fits=False,
                     error=msg.strip().splitlines()[0][:300])
    return rep, None
  secs = time.perf_counter() - t0
  ma = compiled.memory_analysis()
  rep = StepReport(name, secs)
  if ma is not None:
    rep.arguments = float(ma.argument_size_in_bytes)
    rep.outputs = float(ma.output_size_in_bytes)
    rep.aliased = float(ma.alias_size_in_bytes)
    rep.temporaries = float(ma.temp_size_in_bytes)
    rep.code = float(ma.generated_code_size_in_bytes)
    peak = getattr(ma, "peak_memory_in_bytes", 0) or 0
    rep.total = float(peak) if peak else (rep.arguments + rep.outputs - rep.aliased
                                         + rep.temporaries + rep.code)
  rep.usable = usable
  if rep.total is not None and usable is not None:
    rep.fits = rep.total <= usable
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if cost and cost.get("flops") is not None:
      rep.compiler_flops = float(cost["flops"])
  except Exception:  # pylint: disable=broad-except  # GPU targets: no cost analysis
    pass
  text = compiled.as_text()
  rep.kernel_calls = (text.count('custom_call_target="tpu_custom_call"')
                      + text.count('custom_call_target="__gpu$xla.gpu.triton"'))
  return rep, compiled


def _shard_size(x: jax.ShapeDtypeStruct) -> int:
  """Elements of one device's shard of an abstract array."""
  shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
  n = 1
  for d in shape:
    n *= d
  return n


def build_experiment(config: ml_collections.ConfigDict, topology: str):
  """(Experiment on the target's abstract devices, target description, devices)."""
  description, devices = hardware.topology_devices(topology)
  try:
    mesh = parallel.make_mesh(config.mesh, devices)
  except parallel.MeshError as e:
    raise parallel.MeshError(
        f"{e} --topology={topology} has {len(devices)} devices: set config.mesh.data, "
        f"config.mesh.fsdp and config.mesh.tensor so that data x fsdp x tensor = {len(devices)} "
        "(one of them may be -1 for the rest).") from e
  processes = len({getattr(d, "process_index", 0) for d in devices})
  exp = exp_lib.Experiment.create(config, mesh=mesh, process_count=processes)
  return exp, description, devices


def compile_report(config: ml_collections.ConfigDict, topology: str, mfu: Optional[float] = 0.4,
                   sample: bool = True, evaluate: bool = False) -> dict[str, Any]:
  """Compiles the train (and sampling, evaluation) steps of `config` for `topology`."""
  exp, description, devices = build_experiment(config, topology)
  kind = devices[0].device_kind
  chip = hardware.chip_for(kind)
  usable = chip.hbm_bytes if chip else None
  n = len(devices)
  cfg = exp.config
  rows, length = step_lib.train_model_shape(exp)
  flops = step_lib.step_flops(exp)
  tokens = step_lib.data_tokens_per_step(cfg)
  report: dict[str, Any] = dict(
      topology=topology, target=description, device_kind=kind, chip=chip.name if chip else kind,
      platform=hardware.target_platform(devices), devices=n,
      processes=len({getattr(d, "process_index", 0) for d in devices}),
      mesh=dict(exp.mesh.shape), method=cfg.method,
      model=dict(num_layers=cfg.model.num_layers, d_model=cfg.model.d_model,
                 num_heads=cfg.model.num_heads, vocab=exp.method.model_cfg.vocab_size,
                 attention=cfg.model.attention, remat=cfg.model.remat, dtype=cfg.model.dtype),
      parameters=exp.num_params(), global_batch=int(cfg.train.global_batch_size),
      seq_len=int(cfg.data.seq_len), per_device_batch=cfg.train.global_batch_size
      // parallel.data_parallel_size(exp.mesh), model_rows=rows, model_len=length,
      data_tokens_per_step=tokens, flops_per_step=flops, flops_per_device=flops / n,
      flops_per_token=flops / tokens, peak_flops=chip.peak_flops if chip else None,
      usable_hbm=usable, mfu=mfu)
  state = exp.abstract_state()
  report["state_bytes_per_device"] = float(sum(_shard_size(x) * x.dtype.itemsize
                                                for x in jax.tree.leaves(state)))
  train, _ = _compile("train", lambda: step_lib.lower_train_step(exp), usable)
  report["train"] = dataclasses.asdict(train) | {"margin": train.margin}
  if mfu and chip and chip.peak_flops:
    step_time = flops / n / (chip.peak_flops * mfu)
    report["step_seconds_at_mfu"] = step_time
    report["tokens_per_sec_at_mfu"] = tokens / step_time
  if sample:
    smp, _ = _compile("sample", lambda: step_lib.lower_sample_step(exp), usable)
    report["sample"] = dataclasses.asdict(smp) | {"margin": smp.margin}
  if evaluate:
    ev, _ = _compile("eval", lambda: step_lib.lower_eval_step(exp), usable)
    report["eval"] = dataclasses.asdict(ev) | {"margin": ev.margin}
  return report


def _gib(x: Optional[float]) -> str:
  return "?" if x is None else f"{x / GiB:.2f} GiB"


def advice(report: dict[str, Any]) -> str:
  """What to change when the train step does not fit (the fields, with their current values)."""
  r, t = report, report["train"]
  short = -(t["margin"] or 0.0)
  m = r["mesh"]
  lines = [
      f"the train step needs {_gib(t['total'])} per device; {r['chip']} has {_gib(t['usable'])} "
      f"usable: short by {_gib(short)} per device. Fields to change:",
      f"  config.train.global_batch_size={r['global_batch']} ({r['per_device_batch']} rows per "
      "device): temporaries grow with the rows per device; halve it, or spread it over more "
      "devices (a larger slice);",
      f"  config.mesh: data={m['data']} fsdp={m['fsdp']} tensor={m['tensor']}: a larger fsdp shards "
      "the parameters, optimizer state and EMA over more devices; tensor=2 splits heads, MLP and "
      "the vocabulary;",
      f"  config.model.remat='{r['model']['remat']}': 'dots' recomputes only elementwise work, "
      "'attention' recomputes the matmuls too, 'full' keeps only each block's input;",
      f"  config.model.attention='{r['model']['attention']}': 'splash' (TPU) or 'pallas' never "
      "build the [L, L] attention logits that 'xla' keeps;",
      f"  parameter dtype: parameters and AdamW moments are float32 (config.model.dtype="
      f"'{r['model']['dtype']}' sets the compute dtype): parameters, moments and EMA take "
      f"{_gib(r['state_bytes_per_device'])} per device at this mesh.",
  ]
  return "\n".join(lines)


def format_report(r: dict[str, Any]) -> str:
  """The human-readable report `python -m dlm_jax.compile` prints."""
  out = [f"target: {r['target']}: {r['devices']} x {r['device_kind']} ({r['processes']} "
         f"host process(es)); mesh {r['mesh']}",
         f"model: {r['method']} {r['model']['num_layers']} x {r['model']['d_model']} x "
         f"{r['model']['num_heads']} heads, vocab {r['model']['vocab']}, {r['parameters']:,} "
         f"parameters; attention={r['model']['attention']!r} remat={r['model']['remat']!r} "
         f"dtype={r['model']['dtype']!r}",
         f"batch: {r['global_batch']} x {r['seq_len']} tokens ({r['per_device_batch']} rows per "
         f"device); network input {r['model_rows']} x {r['model_len']}"]
  for name in ("train", "eval", "sample"):
    if name not in r:
      continue
    t = r[name]
    out.append(f"{name} step (compiled in {t['compile_seconds']:.1f} s): per device")
    if t["arguments"] is not None:
      out.append(f"  arguments {_gib(t['arguments'])} | outputs {_gib(t['outputs'])} (aliased "
                 f"with arguments {_gib(t['aliased'])}) | temporaries {_gib(t['temporaries'])} | "
                 f"code {_gib(t['code'])}")
    if t["fits"] is None:
      out.append(f"  total {_gib(t['total'])}; the usable memory of {r['chip']} is unknown")
    elif t["fits"]:
      out.append(f"  total {_gib(t['total'])} of {_gib(t['usable'])}: FITS with "
                 f"{_gib(t['margin'])} to spare ({100 * t['total'] / t['usable']:.0f}% used)")
    else:
      out.append(f"  total {_gib(t['total'])} of {_gib(t['usable'])}: DOES NOT FIT (short by "
                 f"{_gib(-t['margin'])})")
    if t["kernel_calls"]:
      out.append(f"  kernel custom calls in the compiled step: {t['kernel_calls']}")
  out.append(f"FLOPs (analytic, models/flops.py): {r['flops_per_step']:.4g} per step, "
             f"{r['flops_per_device']:.4g} per device, {r['flops_per_token']:.4g} per token")
  comp = r["train"].get("compiler_flops")
  if comp:
    ratio = comp / r["flops_per_device"]
    why = ("it omits Pallas kernels and counts the sparse head's real work" if 0.1 < ratio < 10
           else "implausible: XLA's cost analysis missed most of the step here, e.g. work it "
           "moved into loops when rematerialising to fit")
    out.append(f"  compiler's count: {comp:.4g} per device ({ratio:.2f}x the analytic; {why})")
  if r.get("step_seconds_at_mfu"):
    out.append(f"at MFU {r['mfu']:.0%} of {r['peak_flops'] / 1e12:.0f} TFLOP/s per device: "
               f"{r['step_seconds_at_mfu']:.3g} s per step, "
               f"{r['tokens_per_sec_at_mfu']:,.0f} tokens/s")
  elif r.get("mfu"):
    out.append(f"no step time: the peak FLOP/s of {r['device_kind']!r} is not known")
  if r["train"]["fits"] is False:
    out.append("DOES NOT FIT: " + advice(r))
  return "\n".join(out)
