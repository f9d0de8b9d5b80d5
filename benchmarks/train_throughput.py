r"""Train-step throughput of dlm-jax's MDLM, side by side with PyTorch MDLM implementations.

  python benchmarks/train_throughput.py [--mdlm_repo=PATH] [--rounds=5] [--steps=6]
      [--torch_python=.venv-torch/bin/python] [--settings=tiny,cmp] [--out=FILE.json]

Contestants, timed in the same run on the same cores, in alternating rounds (the order rotates
every round, so a slow spell of a shared host hits every side):
  dlm-jax     this repository's train step (MDLM with the fused masked-only head), with
              dropout 0.1 as the paper configs (configs/mdlm_owt.py) and EMA;
  published   the published PyTorch MDLM (github.com/kuleshov-group/mdlm): `Diffusion.training_step`
              + backward + clipping + AdamW + EMA + LR schedule, run from outside a local checkout
              given with --mdlm_repo (benchmarks/published_mdlm/driver.py, CPU stand-ins for
              flash-attn; the checkout's commit is printed). Needs a Python with torch, lightning,
              hydra and transformers (`make bench-torch MDLM_REPO=PATH` builds .venv-torch);
  ours-torch  benchmarks/torch_mdlm_reference.py: OUR eager PyTorch re-implementation of the
              published network and loss (adaLN, dropout, SUBS with its extra passes), the fallback
              when no checkout is given. It is not the published code.
Settings:
  tiny  4 blocks, d 128, 4 heads, L 128, batch 32, V 4096 (the embedded default's size)
  cmp   the comparison point of issue 3: 4 blocks, d 256, 4 heads, L 256, batch 8, V 50258
Each round gives each side one figure (median step time over --steps timed steps after warm-up);
the table shows per side the median over rounds, and per pair the median of the per-round ratios
with their range (a ratio of the two median step times can differ from the median ratio). The
1-minute load average is recorded around every measurement: a round is marked contended when it
exceeded the core count + 0.5 (other jobs shared the cores). Figures only; no asserts.
Quiet re-measurement in one command: `make bench-throughput MDLM_REPO=PATH` on an idle machine.
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
DRIVER_SHAPE = {"tiny": "tiny", "cmp": "comparison"}  # benchmarks/published_mdlm/driver.py
SIDES = ("dlm-jax", "published", "ours-torch")


class _FakeTokenizer:
  """Only the ids the method needs: no tokenizer training or files for a timing run."""

  def __init__(self, vocab):
    self.vocab_size = vocab
    self.pad_id, self.bos_id, self.eos_id, self.mask_id = 0, 1, 2, vocab - 1
    self.name = f"synthetic-{vocab}"

  def fingerprint(self):
    return self.name


def _config(s, dropout):
  from configs import mdlm_tiny  # pylint: disable=g-import-not-at-top
  c = mdlm_tiny.get_config()
  c.model.num_layers, c.model.d_model, c.model.num_heads = s["num_layers"], s["d_model"], s["num_heads"]
  c.data.seq_len, c.model.max_len = s["seq_len"], max(s["seq_len"], 256)
  c.model.dropout = dropout
  c.train.global_batch_size = s["batch"]
  c.mesh.data = 1
  c.optim.warmup_steps = 10
  c.optim.ema_decay = 0.9999
  return c


def setup_jax(s, dropout):
  """Compiles the step once; returns (run(steps) -> (median step seconds, loss), info dict)."""
  cfg = _config(s, dropout)
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

  def run(steps: int, warmup: int = 2) -> tuple[float, float]:
    for i in range(warmup):
      holder["state"], m = train_step(holder["state"], batches[i % 4], key)
    jax.block_until_ready(m["loss"])
    times = []
    for i in range(steps):  # one host sync per step, as the published loop's loss.item()
      t0 = time.perf_counter()
      holder["state"], m = train_step(holder["state"], batches[i % 4], key)
      jax.block_until_ready(m["loss"])
      times.append(time.perf_counter() - t0)
    return statistics.median(times), float(m["loss"])

  flops = 3 * forward_flops_per_token(exp.method.model_cfg, l) * b * l
  return run, dict(params=exp.num_params(), compile_sec=compile_s, flops=flops, tokens=b * l)


def bench_jax(run, info, steps: int) -> dict:
  step, loss = run(steps)
  return dict(step_ms=step * 1e3, tokens_per_sec=info["tokens"] / step,
              gflops_per_sec=info["flops"] / step / 1e9, final_loss=loss)


def _subprocess_json(args, what):
  try:
    out = subprocess.run(args, capture_output=True, text=True, timeout=3600, check=True)
  except (subprocess.CalledProcessError, FileNotFoundError, subprocess.TimeoutExpired) as e:
    print(f"  {what} failed: {e}\n{(getattr(e, 'stderr', '') or '')[-3000:]}")
    return None
  text = out.stdout.strip()
  try:
    return json.loads(text)
  except json.JSONDecodeError:
    return json.loads(text.splitlines()[-1])


def bench_ours_torch(python: str, s, steps: int) -> dict | None:
  script = os.path.join(ROOT, "benchmarks", "torch_mdlm_reference.py")
  args = [python, script, f"--steps={steps}", "--json"] + [f"--{k}={v}" for k, v in s.items()]
  r = _subprocess_json(args, "ours-torch")
  return None if r is None else dict(step_ms=r["step_ms"], tokens_per_sec=r["tokens_per_sec"],
                                     version=r["version"], threads=r["threads"],
                                     final_loss=r["final_loss"])


def bench_published(python: str, repo: str, name: str, steps: int) -> dict | None:
  driver = os.path.join(ROOT, "benchmarks", "published_mdlm", "driver.py")
  args = [python, driver, f"--mdlm_repo={repo}", "--mode=train", f"--shape={DRIVER_SHAPE[name]}",
          f"--steps={steps}", "--warmup=2", f"--threads={os.cpu_count() or 1}"]
  r = _subprocess_json(args, "published")
  if r is None:
    return None
  return dict(step_ms=r["ms_per_step_median"], tokens_per_sec=r["tokens_per_s"],
              version=r["torch"], threads=r["threads"], commit=r.get("mdlm_commit"),
              final_loss=r["losses"][-1], config=r.get("config"))


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--steps", type=int, default=6, help="timed steps per side and round")
  ap.add_argument("--rounds", type=int, default=5, help="alternating rounds (order rotates)")
  ap.add_argument("--settings", default="tiny,cmp")
  ap.add_argument("--dropout", type=float, default=0.1, help="dlm-jax's model.dropout (published: 0.1)")
  default_torch = os.path.join(ROOT, ".venv-torch", "bin", "python")
  ap.add_argument("--torch_python", default=default_torch if os.path.exists(default_torch) else "",
                  help="Python with torch (and, for --mdlm_repo, the published code's packages)")
  ap.add_argument("--mdlm_repo", default="", help="local checkout of kuleshov-group/mdlm")
  ap.add_argument("--no_ours_torch", action="store_true",
                  help="skip our re-implementation (e.g. when timing only the published code)")
  ap.add_argument("--out", default="", help="also write every round's figures as JSON here")
  args = ap.parse_args()
  ncpu = os.cpu_count() or 1
  sides = ["dlm-jax"]
  if args.torch_python and args.mdlm_repo:
    sides.append("published")
  if args.torch_python and not args.no_ours_torch:
    sides.append("ours-torch")
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {ncpu} CPU cores, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; sides {sides}; {args.rounds} rounds of "
        f"{args.steps} timed steps each; dlm-jax dropout {args.dropout}")
  report = dict(cpu_count=ncpu, jax=jax.__version__, rounds=args.rounds, steps=args.steps,
                dropout=args.dropout, settings={})
  for name in args.settings.split(","):
    s = SETTINGS[name]
    run, info = setup_jax(s, args.dropout)
    print(f"\n[{name}] {s}  dlm-jax params {info['params']:,} (compile {info['compile_sec']:.1f}s)")
    rounds = []
    for r in range(args.rounds):
      order = sides[r % len(sides):] + sides[:r % len(sides)]
      rec, loads = {}, [os.getloadavg()[0]]
      for side in order:
        if side == "dlm-jax":
          rec[side] = bench_jax(run, info, args.steps)
        elif side == "published":
          rec[side] = bench_published(args.torch_python, args.mdlm_repo, name, args.steps)
        else:
          rec[side] = bench_ours_torch(args.torch_python, s, args.steps)
        loads.append(os.getloadavg()[0])
      rec["order"], rec["load_1min"] = order, loads
      rec["contended"] = max(loads) > ncpu + 0.5
      rounds.append(rec)
      parts = [f"{side} {rec[side]['step_ms']:7.1f} ms" for side in order if rec.get(side)]
      print(f"  round {r} ({'contended' if rec['contended'] else 'quiet'}, load "
            f"{min(loads):.1f}-{max(loads):.1f}): " + ", ".join(parts))
    summary = dict(setting=s, dlm_jax_params=info["params"], rounds=rounds, sides={}, ratios={})
    for side in sides:
      vals = [x[side] for x in rounds if x.get(side)]
      if not vals:
        continue
      med = statistics.median(v["step_ms"] for v in vals)
      summary["sides"][side] = dict(step_ms_median=med, tokens_per_sec=info["tokens"] / med * 1e3,
                                    step_ms_rounds=[v["step_ms"] for v in vals])
      for k in ("version", "threads", "commit", "config"):
        if k in vals[0]:
          summary["sides"][side][k] = vals[0][k]
    for other in sides[1:]:
      ratios = [x["dlm-jax"]["tokens_per_sec"] / x[other]["tokens_per_sec"]
                for x in rounds if x.get(other) and x.get("dlm-jax")]
      if ratios:
        summary["ratios"][other] = dict(median=statistics.median(ratios), min=min(ratios),
                                        max=max(ratios), rounds=ratios)
    summary["contended_rounds"] = sum(x["contended"] for x in rounds)
    report["settings"][name] = summary
    if "published" in summary["sides"]:
      p = summary["sides"]["published"]
      print(f"  published: {args.mdlm_repo} at commit {p.get('commit')}, torch {p.get('version')}, "
            f"{p.get('threads')} threads, config {p.get('config')}")
    for other, rr in summary["ratios"].items():
      print(f"  dlm-jax / {other} throughput: median {rr['median']:.2f}x over {len(rr['rounds'])} "
            f"rounds (range {rr['min']:.2f}-{rr['max']:.2f}x; rounds "
            f"{', '.join(f'{x:.2f}' for x in rr['rounds'])})")
  tag = lambda sm: " (contended)" if sm["contended_rounds"] else ""  # noqa: E731
  print("\n| setting | side | ms/step (median of rounds) | tok/s | dlm-jax / side: median ratio (range) |")
  print("|---|---|---|---|---|")
  for name, sm in report["settings"].items():
    s = sm["setting"]
    for side, v in sm["sides"].items():
      rr = sm["ratios"].get(side)
      ratio = f"{rr['median']:.2f}x ({rr['min']:.2f}-{rr['max']:.2f})" if rr else "-"
      print(f"| {name} (L {s['seq_len']}, B {s['batch']}, V {s['vocab']}){tag(sm)} | {side} | "
            f"{v['step_ms_median']:.1f} | {v['tokens_per_sec']:,.0f} | {ratio} |")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(report, f, indent=1, default=str)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
  main()
