r"""The paper configs (and the largest model that fits) compiled for TPU slices: memory, fit, FLOPs.

Every row is one run of the real command, `python -m dlm_jax.compile --json=...`, in its own
process, one at a time (a full-size compile takes 2-4 minutes of a quiet CPU core; more when the
machine is shared). Results go to benchmarks/results/compile_table.json (every report, appended
and deduplicated by row name) and compile_table.md (the table the READMEs quote).

  python benchmarks/compile_table.py                        # the paper rows (10 compiles)
  python benchmarks/compile_table.py --rows=largest         # the largest-model rows
  python benchmarks/compile_table.py --rows=mdlm_owt@v5e-16 # one row by name
  python benchmarks/compile_table.py --table_only           # rewrite the .md from the .json
  python benchmarks/compile_table.py --reuse ...            # rows whose report exists: no compile

Next to each compiled figure the table gives the scaling note's arithmetic (launch/README.md) for
the same row: parameters + optimizer state + EMA + gradients, and activations per the note's
per-block formulas (flash attention, no remat), so the two can be compared.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
GiB = 1024**3

TOPOLOGIES = ("v4-8", "v4-32", "v5e-16", "v5e-256", "v5p-8")
PAPER = {f"{cfg}@{topo}": dict(config=f"configs/{cfg}.py", topology=topo, flags=[])
         for cfg in ("mdlm_owt", "did_owt") for topo in TOPOLOGIES}

# Larger trunks (GPT-2 medium / large / XL widths, then wider), head dimension 64 or 128, on the
# MDLM recipe at batch 512 x 1024, with full FSDP and full rematerialisation.
SIZES = {
    "350m": (24, 1024, 16), "770m": (36, 1280, 20), "1.5b": (48, 1600, 25),
    "2.7b": (32, 2560, 20), "6.7b": (32, 4096, 32), "13b": (40, 5120, 40),
}
BIG_FLAGS = ["--config.mesh.data=1", "--config.mesh.fsdp=-1", "--config.model.remat=full"]


def _size_flags(size):
  layers, d, heads = SIZES[size]
  return [f"--config.model.num_layers={layers}", f"--config.model.d_model={d}",
          f"--config.model.num_heads={heads}"] + BIG_FLAGS


# The largest size on the ladder expected to fit each slice (arithmetic from the compiled paper rows:
# state 20 B per parameter / devices, about 2 B x d per token per layer kept under full remat plus
# one block's working set), then the next size up where it was compiled to show the boundary.
_LARGEST = (("v4-8", "770m"), ("v4-32", "6.7b"), ("v5e-16", "2.7b"), ("v5p-8", "6.7b"),
            ("v5e-256", "13b"), ("v4-8", "1.5b"), ("v5e-16", "6.7b"),
            # compiled: 2.7b misses v5e-16 by 0.05 GiB, 6.7b misses v4-32 and 13b misses v5e-256
            # (28.6 GiB), so sizes further down; 1.5b (48 blocks) misses v5e-16 too (16.04 GiB)
            ("v5e-16", "1.5b"), ("v4-32", "2.7b"), ("v5e-16", "770m"), ("v5e-256", "6.7b"),
            # 6.7b fits v5p-8 with 25 GiB spare: the next size up shows that slice's boundary
            ("v5p-8", "13b"))
LARGEST = {f"mdlm_{size}@{topo}": dict(config="configs/mdlm_owt.py", topology=topo,
                                       flags=_size_flags(size)) for topo, size in _LARGEST}
ROWS = {**PAPER, **LARGEST}


def note_estimate(report: dict) -> dict:
  """The scaling note's arithmetic (launch/README.md) for a compiled row, in bytes per device.

  State: 20 B per parameter (f32 params, two AdamW moments, EMA, gradients) / fsdp. Activations
  per sequence (bf16, flash attention): 12 blocks x 18 s d x 2 B without remat; with remat each
  block keeps its f32 input (4 s d) plus one block's working set. Output head: the note before
  issue 14 added 2 f32 [s, V] copies per sequence ('before'); corrected, the fused per-device
  head holds about 0.25 GB per device whatever the batch ('corrected'). DID processes its
  packed model rows instead of data rows. With parameters split over fsdp > 1, 'corrected' also
  counts one bfloat16 copy of every block's gathered (whole) weights, 2 B per parameter on every
  device: the compiled step holds them all at its peak (temporaries grow by 0.43 GiB per block of
  d 4096 on v5e-256, 2 vs 6 blocks; one block's bf16 weights are 0.375 GiB), so the state divides
  by the device count and this term does not.
  """
  m = report["model"]
  fsdp = report["mesh"]["fsdp"]
  state = 20.0 * report["parameters"] / fsdp
  s, d, v = report["model_len"], m["d_model"], m["vocab"]
  rows_per_device = report["model_rows"] * report["mesh"]["tensor"] / report["devices"]
  per_seq = m["num_layers"] * 18 * s * d * 2
  if report["model"]["remat"] != "none":
    per_seq = m["num_layers"] * s * d * 4 + 18 * s * d * 2
  old_head = rows_per_device * 2 * 4 * s * v
  act = rows_per_device * per_seq
  gathered = 2.0 * report["parameters"] if fsdp > 1 else 0.0
  return dict(state=state, activations=act, gathered_weights=gathered, total=state + act + old_head,
              corrected=state + act + 0.25e9 + gathered)


def _finish(name: str, spec: dict, report: dict, wall) -> dict:
  report.update(name=name, wall_seconds=wall, flags=spec["flags"], config=spec["config"],
                note=note_estimate(report))
  return report


def run_row(name: str, spec: dict, timeout: int, reuse: bool = False) -> dict:
  out = os.path.join(RESULTS, "compile_reports", name.replace("@", "_") + ".json")
  os.makedirs(os.path.dirname(out), exist_ok=True)
  if reuse and os.path.exists(out):
    print(f"{name}: reusing {out}", flush=True)
    return _finish(name, spec, json.load(open(out, encoding="utf-8")), None)
  cmd = [sys.executable, "-m", "dlm_jax.compile", f"--config={spec['config']}",
         f"--topology={spec['topology']}", "--sample=false", f"--json={out}", *spec["flags"]]
  print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(cmd[2:])}", flush=True)
  t0 = time.time()
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  try:
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return dict(name=name, error=f"timed out after {timeout} s", wall_seconds=timeout, **spec)
  wall = time.time() - t0
  if r.returncode not in (0, 1) or not os.path.exists(out):
    tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
    return dict(name=name, error=" | ".join(tail), wall_seconds=wall, **spec)
  report = _finish(name, spec, json.load(open(out, encoding="utf-8")), wall)
  t = report["train"]
  print(f"  -> {'fits' if t['fits'] else 'DOES NOT FIT'}: {t['total'] / GiB:.2f} of "
        f"{t['usable'] / GiB:.2f} GiB per device (compile {t['compile_seconds']:.0f} s, wall "
        f"{wall:.0f} s)", flush=True)
  return report


def _gib(x):
  return "?" if x is None else f"{x / GiB:.2f}"


def write_table(results: dict) -> str:
  lines = [
      "| row | target (devices) | mesh | model | per-device batch | args / temps GiB | total / usable "
      "GiB per device | fits | note's estimate GiB (before / corrected) | FLOPs per step (per token) | step s at 40% "
      "MFU | compile s |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for name in [n for n in ROWS if n in results] + [n for n in results if n not in ROWS]:
    r = results[name]
    if "error" in r:
      lines.append(f"| {name} | {r.get('topology')} | | | | | | error: {r['error'][:120]} | | | | |")
      continue
    t, m = r["train"], r["model"]
    mesh = "x".join(str(r["mesh"][a]) for a in ("data", "fsdp", "tensor"))
    model = (f"{r['method']} {m['num_layers']}x{m['d_model']}, {r['parameters'] / 1e6:.0f}M, "
             f"{m['attention']}, remat {m['remat']}")
    fits = "yes" if t["fits"] else ("**no**" if t["fits"] is False else "?")
    args = f"{_gib(t['arguments'])} / {_gib(t['temporaries'])}" if t["arguments"] else "- (OOM)"
    step = f"{r['step_seconds_at_mfu']:.3f}" if r.get("step_seconds_at_mfu") else "?"
    lines.append(
        f"| {name} | {r['topology']} ({r['devices']} x {r['chip']}) | {mesh} | {model} | "
        f"{r['per_device_batch']} | {args} | {_gib(t['total'])} / {_gib(t['usable'])} | {fits} | "
        f"{_gib(r['note']['total'])} / {_gib(r['note'].get('corrected'))} | {r['flops_per_step']:.3g} ({r['flops_per_token']:.3g}) | "
        f"{step} | {t['compile_seconds']:.0f} |")
  return "\n".join(lines) + "\n"


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--rows", default="paper", help="paper | largest | all | comma list of row names")
  p.add_argument("--timeout", type=int, default=3600, help="seconds per compile")
  p.add_argument("--table_only", action="store_true")
  p.add_argument("--reuse", action="store_true",
                 help="tabulate a row's existing compile_reports/<row>.json instead of compiling")
  args = p.parse_args()
  path = os.path.join(RESULTS, "compile_table.json")
  results = json.load(open(path, encoding="utf-8")) if os.path.exists(path) else {}
  if not args.table_only:
    names = {"paper": list(PAPER), "largest": list(LARGEST), "all": list(ROWS)}.get(
        args.rows, [n.strip() for n in args.rows.split(",") if n.strip()])
    unknown = [n for n in names if n not in ROWS]
    if unknown:
      sys.exit(f"unknown rows {unknown}; known: {list(ROWS)}")
    for name in names:
      results[name] = run_row(name, ROWS[name], args.timeout, args.reuse)
      with open(path, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1, default=str)
  for r in results.values():  # the note's arithmetic as of this script (rows made earlier too)
    if "error" not in r:
      r["note"] = note_estimate(r)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(results, f, indent=1, default=str)
  table = write_table(results)
  with open(os.path.join(RESULTS, "compile_table.md"), "w", encoding="utf-8") as f:
    f.write("# Compiled for TPU slices with `python -m dlm_jax.compile` (benchmarks/compile_table.py)"
            "\n\nPer device; GiB = 2^30 bytes. 'note's estimate' is launch/README.md's arithmetic "
            "for the same row: before issue 14 (2 float32 [s, V] logits per sequence) and "
            "corrected (the fused per-device head, plus 2 B per parameter of gathered bf16 weights on "
            "every device when fsdp > 1).\n\n" + table)
  print(table)


if __name__ == "__main__":
  main()
