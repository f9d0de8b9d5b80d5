r"""Train-step throughput of dlm-jax's MDLM, side by side with a PyTorch implementation.

  python benchmarks/train_throughput.py [--steps=10] [--torch_python=.venv-torch/bin/python]

Two settings:
  tiny  the embedded default (configs/mdlm_tiny.py): 4 blocks, d 128, L 128, batch 32, V 4096
  cmp   the comparison point of issue 3: 4 blocks, d 256, 4 heads, L 256, batch 8, V 50258

For each: step time (median of timed steps after warm-up, one host sync at the end of each
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

from dlm_jax import experiment as exp_lib  # noqa: E402
from dlm_jax import parallel  # noqa: E402
from dlm_jax import trainer  # noqa: E402
from dlm_jax.models.transformer import forward_flops_per_token  # noqa: E402

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


def bench_jax(s, steps: int, warmup: int = 3) -> dict:
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
  t0 = time.perf_counter()
  state, m = train_step(state, batches[0], key)
  jax.block_until_ready(m["loss"])
  compile_s = time.perf_counter() - t0
  for i in range(warmup):
    state, m = train_step(state, batches[i % 4], key)
  jax.block_until_ready(m["loss"])
  times = []
  window = 5
  for w in range(max(steps // window, 1)):
    t0 = time.perf_counter()
    for i in range(window):
      state, m = train_step(state, batches[i % 4], key)
    jax.block_until_ready(m["loss"])
    times.append((time.perf_counter() - t0) / window)
  step = statistics.median(times)
  n_params = exp.num_params()
  flops = 3 * forward_flops_per_token(exp.method.model_cfg, l) * b * l
  return dict(framework="jax", step_ms=step * 1e3, tokens_per_sec=b * l / step,
              gflops_per_sec=flops / step / 1e9, params=n_params, compile_sec=compile_s,
              final_loss=float(m["loss"]))


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
  ap.add_argument("--settings", default="tiny,cmp")
  default_torch = os.path.join(ROOT, ".venv-torch", "bin", "python")
  ap.add_argument("--torch_python", default=default_torch if os.path.exists(default_torch) else "")
  args = ap.parse_args()
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPU cores")
  rows = []
  for name in args.settings.split(","):
    s = SETTINGS[name]
    j = bench_jax(s, args.steps)
    t = bench_torch(args.torch_python, name, s, args.steps) if args.torch_python else None
    rows.append((name, s, j, t))
    print(f"\n[{name}] {s}")
    print(f"  dlm-jax : {j['step_ms']:8.1f} ms/step  {j['tokens_per_sec']:10,.0f} tok/s  "
          f"{j['gflops_per_sec']:6.1f} GFLOP/s  params {j['params']:,}  (compile {j['compile_sec']:.1f}s)")
    if t:
      print(f"  pytorch : {t['step_ms']:8.1f} ms/step  {t['tokens_per_sec']:10,.0f} tok/s  "
            f"(torch {t['version']}, {t['threads']} threads)")
      print(f"  ratio   : dlm-jax / pytorch throughput = {j['tokens_per_sec'] / t['tokens_per_sec']:.2f}x")
    else:
      print("  pytorch : not run (make bench-torch, or --torch_python=PATH)")
  print("\n| setting | dlm-jax ms/step | dlm-jax tok/s | PyTorch ms/step | PyTorch tok/s | ratio |")
  print("|---|---|---|---|---|---|")
  for name, s, j, t in rows:
    tt = (f"{t['step_ms']:.1f} | {t['tokens_per_sec']:,.0f} | "
          f"{j['tokens_per_sec'] / t['tokens_per_sec']:.2f}x") if t else "- | - | -"
    print(f"| {name} (L {s['seq_len']}, B {s['batch']}, V {s['vocab']}) | {j['step_ms']:.1f} | "
          f"{j['tokens_per_sec']:,.0f} | {tt} |")


if __name__ == "__main__":
  main()
