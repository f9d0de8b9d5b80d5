r"""Train-step throughput of dlm-jax's MDLM, side by side with a PyTorch implementation.

  python benchmarks/train_throughput.py [--steps=10] [--rounds=3] [--torch_python=.venv-torch/bin/python]

Two settings:
  tiny  the embedded default (configs/mdlm_tiny.py): 4 blocks, d 128, L 128, batch 32, V 4096
  cmp   the comparison point of issue 3: 4 blocks, d 256, 4 heads, L 256, batch 8, V 50258

For each: step time (median of timed windows after warm-up, one host sync at the end of each
timed window) and tokens/s. When a Python with PyTorch is given (or .venv-torch exists; `make
bench-torch` creates it), benchmarks/torch_mdlm_reference.py runs the same model, loss and
optimizer on the same CPU in the same run and the ratio is printed. Figures only; no asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dlm_jax.run import experiment as exp_lib  # noqa: E402
from dlm_jax import parallel  # noqa: E402
from dlm_jax.run import trainer  # noqa: E402
from dlm_jax.models.flops import forward_flops_per_token  # noqa: E402

SETTINGS = {
    "tiny": dict(num_layers=4, d_model=128, num_heads=4, seq_len=128, batch=32, vocab=4096),
    "cmp": dict(num_layers=4, d_model=256, num_heads=4, seq_len=256, batch=8, vocab=50258),
}


class _FakeTokenizer:
  """Only the ids the method needs: no tokenizer training or files for a timing run."""

  def __init__(self, vocab):
    self.vocab_size = vocab
    self.pad_id, self.bos_id, self.eos_id, self.mask_id = 0, 1, 2, vocab - 1
    self.name = f"synthetic-{vocab}"

  def fingerprint(self):
    return self.name


def _config(s):
  from configs import mdlm_tiny  # pylint: disable=g-import-not-at-top
  c = mdlm_tiny.get_config()
  c.model.num_layers, c.model.d_model, c.model.num_heads = s["num_layers"], s["d_model"], s["num_heads"]
  c.data.seq_len, c.model.max_len = s["seq_len"], max(s["seq_len"], 256)
  c.train.global_batch_size = s["batch"]
  c.mesh.data = 1
  c.optim.warmup_steps = 10
  return c


def setup_jax(s):
  """Compiles the step once; returns (run(steps) -> step seconds, info dict)."""
  cfg = _config(s)
  mesh = parallel.make_mesh(cfg.mesh, jax.devices()[:1])
  exp = exp_lib.Experiment.create(cfg, mesh=mesh, tokenizer=_FakeTokenizer(s["vocab"]))
  state = exp.init_state(0)
  train_step, _ = trainer.compile_steps(exp)
  rng = np.random.default_rng(0)
  b, l = s["batch"], s["seq_len"]
  batches = []
  for _ in range(4):
    tok = rng.integers(3, s["vocab"] - 1, size=(b, l)).astype(np.int32)
    tok[:, 0] = 1
    batches.append(parallel.global_batch_from_local(
        dict(tokens=tok, segment_ids=np.ones_like(tok),
             positions=np.broadcast_to(np.arange(l, dtype=np.int32), (b, l)).copy()), exp.mesh))
  key = jax.random.key(0)
  holder = dict(state=state)
  t0 = time.perf_counter()
  holder["state"], m = train_step(holder["state"], batches[0], key)
  jax.block_until_ready(m["loss"])
  compile_s = time.perf_counter() - t0

  def run(steps: int, warmup: int = 3) -> tuple[float, float]:
    for i in range(warmup):
      holder["state"], m = train_step(holder["state"], batches[i % 4], key)
    jax.block_until_ready(m["loss"])
    times, window = [], 5
    for _ in range(max(steps // window, 1)):
      t0 = time.perf_counter()
      for i in range(window):
        holder["state"], m = train_step(holder["state"], batches[i % 4], key)
      jax.block_until_ready(m["loss"])
      times.append((time.perf_counter() - t0) / window)
    return statistics.median(times), float(m["loss"])

  flops = 3 * forward_flops_per_token(exp.method.model_cfg, l) * b * l
  return run, dict(params=exp.num_params(), compile_sec=compile_s, flops=flops, tokens=b * l)


def bench_jax(run, info, steps: int) -> dict:
  step, loss = run(steps)
  return dict(framework="jax", step_ms=step * 1e3, tokens_per_sec=info["tokens"] / step,
              gflops_per_sec=info["flops"] / step / 1e9, params=info["params"],
              compile_sec=info["compile_sec"], final_loss=loss)


def bench_torch(python: str, name: str, s, steps: int) -> dict | None:
  script = os.path.join(ROOT, "benchmarks", "torch_mdlm_reference.py")
  args = [python, script, f"--steps={steps}", "--json"] + [f"--{k}={v}" for k, v in s.items()]
  try:
    out = subprocess.run(args, capture_output=True, text=True, timeout=1800, check=True)
  except (subprocess.CalledProcessError, FileNotFoundError, subprocess.TimeoutExpired) as e:
    print(f"[{name}] PyTorch reference failed: {e}\n{getattr(e, 'stderr', '')[-2000:]}")
    return None
  return json.loads(out.stdout.strip().splitlines()[-1])


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--rounds", type=int, default=3,
                  help="alternating dlm-jax / PyTorch rounds; the ratio is the median over "
                       "rounds, so a slow spell on a shared host hits both sides")
  ap.add_argument("--settings", default="tiny,cmp")
  default_torch = os.path.join(ROOT, ".venv-torch", "bin", "python")
  ap.add_argument("--torch_python", default=default_torch if os.path.exists(default_torch) else "")
  args = ap.parse_args()
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPU cores, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  rows = []
  for name in args.settings.split(","):
    s = SETTINGS[name]
    run, info = setup_jax(s)
    print(f"\n[{name}] {s}  params {info['params']:,}  (compile {info['compile_sec']:.1f}s)")
    js, ts, ratios = [], [], []
    for r in range(args.rounds):
      j = bench_jax(run, info, args.steps)
      t = bench_torch(args.torch_python, name, s, args.steps) if args.torch_python else None
      js.append(j)
      line = (f"  round {r}: dlm-jax {j['step_ms']:8.1f} ms/step {j['tokens_per_sec']:9,.0f} tok/s "
              f"{j['gflops_per_sec']:6.1f} GFLOP/s")
      if t:
        ts.append(t)
        ratios.append(j["tokens_per_sec"] / t["tokens_per_sec"])
        line += (f" | pytorch {t['step_ms']:8.1f} ms/step {t['tokens_per_sec']:9,.0f} tok/s "
                 f"(torch {t['version']}, {t['threads']} threads) | ratio {ratios[-1]:.2f}x")
      print(line)
    def median_run(runs):  # the round whose step time is the median (what the table shows)
      mid = statistics.median(r["step_ms"] for r in runs)
      return min(runs, key=lambda r: abs(r["step_ms"] - mid))
    j = median_run(js)
    t = median_run(ts) if ts else None
    ratio = statistics.median(ratios) if ratios else None
    if ratio is not None:
      print(f"  median ratio dlm-jax / pytorch throughput = {ratio:.2f}x "
            f"(rounds: {', '.join(f'{x:.2f}' for x in ratios)})")
    else:
      print("  pytorch : not run (make bench-torch, or --torch_python=PATH)")
    rows.append((name, s, j, t, ratio))
  print("\n| setting | dlm-jax ms/step | dlm-jax tok/s | PyTorch ms/step | PyTorch tok/s | "
        "median ratio |")
  print("|---|---|---|---|---|---|")
  for name, s, j, t, ratio in rows:
    tt = (f"{t['step_ms']:.1f} | {t['tokens_per_sec']:,.0f} | {ratio:.2f}x") if t else "- | - | -"
    print(f"| {name} (L {s['seq_len']}, B {s['batch']}, V {s['vocab']}) | {j['step_ms']:.1f} | "
          f"{j['tokens_per_sec']:,.0f} | {tt} |")


if __name__ == "__main__":
  main()
