"""Toy reproduction of DID vs MDLM (arXiv 2603.23507): same budget on the embedded corpus, gen-PPL vs steps.

Trains DID (configs/did_tiny.py: variable length, packed survivors), MDLM (configs/mdlm_tiny.py) and the AR
judge (configs/ar_tiny.py) with the same number of steps, batch, model and optimiser, then draws samples at
16, 32, 64 and 128 sampling steps with several sampling seeds and scores them with the judge (gen-PPL, with the
samples' unigram entropy and length, since low-entropy collapse scores well). Also reports each run's NELBO
bound on the validation split, training wall time and tokens the network processed per step.

Writes benchmarks/results/did_toy.{md,json,png}. Never asserts anything.

  python benchmarks/did_toy.py [--steps 600] [--seeds 0,1,2] [--num_samples 32] [--workdir /tmp/did_toy]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from dlm_jax import metrics as metrics_lib  # noqa: E402
from dlm_jax.run import api  # noqa: E402
from dlm_jax.run import trainer  # noqa: E402
from dlm_jax.evaluation import gen_ppl as gen_ppl_lib  # noqa: E402

STEP_COUNTS = (16, 32, 64, 128)


def _config(name: str, steps: int):
  import importlib  # pylint: disable=g-import-not-at-top
  c = importlib.import_module(f"configs.{name}").get_config()
  c.train.num_steps = steps
  c.train.ckpt_every = steps
  c.train.eval_every = 10 * steps  # no evaluation during training; done once below
  c.train.log_every = max(steps // 10, 1)
  c.train.print_batch = False
  c.optim.warmup_steps = min(c.optim.warmup_steps, max(steps // 10, 1))
  return c


def train_run(name: str, steps: int, workdir: str) -> dict:
  """Trains configs/{name}.py for `steps` (skipped when the workdir already holds that step)."""
  wd = os.path.join(workdir, name)
  marker = os.path.join(wd, "toy_train.json")
  if os.path.exists(marker):
    info = json.load(open(marker))
    if info.get("steps") == steps:
      print(f"[{name}] reusing {wd} (trained {steps} steps)", flush=True)
      return info
  cfg = _config(name, steps)
  t0 = time.perf_counter()
  last = trainer.train(cfg, wd)
  wall = time.perf_counter() - t0
  info = dict(steps=steps, wall_sec=wall, sec_per_step=wall / steps,
              final_loss=float(last.get("loss", float("nan"))),
              model_tokens_per_step=float(last.get("model_tokens", cfg.train.global_batch_size
                                                   * cfg.data.seq_len)),
              overflow_tokens=float(last.get("overflow_tokens", 0.0)))
  json.dump(info, open(marker, "w"), indent=2)
  print(f"[{name}] trained {steps} steps in {wall:.0f}s ({info['sec_per_step']:.3f} s/step, incl. "
        f"compile); last loss {info['final_loss']:.3f}", flush=True)
  return info


def nelbo(workdir: str, num_batches: int, use_ema: bool) -> float:
  from dlm_jax.run import evaluation  # pylint: disable=g-import-not-at-top  (no absl flags)
  res = evaluation.run_eval(workdir, num_batches=num_batches, use_ema=use_ema)
  return float(res["nelbo_nats_per_token"])


def generated_ids(out: dict, i: int, special: set[int]) -> list[int]:
  """The generated token ids of sample i (prompt/BOS and special ids dropped)."""
  row = np.asarray(out["tokens"][i])
  if "total_lengths" in out:
    row = row[:int(out["total_lengths"][i])]
  else:
    row = row[int(out.get("prompt_len", 0)):]
  return [int(x) for x in row if int(x) not in special]


def evaluate_samples(run, judge, steps: int, seed: int, num_samples: int) -> dict:
  decoder = "did" if run.config.method == "did" else "ancestral"
  t0 = time.perf_counter()
  out = run.sample(num_samples=num_samples, seed=seed, decoder=decoder, num_steps=steps,
                   batch_size=num_samples)
  wall = time.perf_counter() - t0
  tok = run.tokenizer
  special = set(int(x) for x in tok.special_ids)
  ids = [generated_ids(out, i, special) for i in range(num_samples)]
  texts = [tok.decode(x) for x in ids]
  g = gen_ppl_lib.gen_ppl(judge, texts, token_ids=ids)
  lens = np.asarray([len(x) for x in ids], np.float64)
  return dict(gen_ppl=g["gen_ppl"], unigram_entropy=g["unigram_entropy"], mean_len=float(lens.mean()),
              std_len=float(lens.std()), min_len=float(lens.min()), max_len=float(lens.max()),
              mean_nfe=float(np.mean(out["nfe"])), sample_sec=wall, example=texts[0][:160])


def summarise(records: list[dict]) -> dict:
  out = {}
  for r in records:
    out.setdefault((r["method"], r["steps"]), []).append(r)
  table = {}
  for (m, s), rs in sorted(out.items()):
    row = {}
    for k in ("gen_ppl", "unigram_entropy", "mean_len", "std_len", "mean_nfe", "sample_sec"):
      v = np.asarray([r[k] for r in rs], np.float64)
      row[k] = (float(v.mean()), float(v.std()))
    table[f"{m}@{s}"] = dict(method=m, steps=s, seeds=len(rs), **row)
  return table


def write_outputs(results: dict, out_dir: str) -> None:
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "did_toy.json"), "w", encoding="utf-8") as f:
    json.dump(results, f, indent=2)
  tab = results["table"]
  c = _config("mdlm_tiny", 1)
  lines = [f"Toy DID vs MDLM on the embedded Bible corpus: {results['train_steps']} training steps each "
           f"(batch {c.train.global_batch_size}, L = {c.data.seq_len}, {c.model.num_layers} x "
           f"{c.model.d_model} transformer, {c.data.vocab_size}-id BPE), judge = AR model trained the "
           "same way. "
           f"gen-PPL mean +- std over {len(results['seeds'])} sampling seeds x {results['num_samples']} "
           "samples; entropy = mean per-sample unigram entropy (nats); length = generated tokens; "
           f"{results.get('params', 'raw')} parameters.", "",
           "| method | steps | gen-PPL | entropy | length (mean +- std) | NFE | sec/batch |",
           "|---|---:|---:|---:|---:|---:|---:|"]
  for key in sorted(tab, key=lambda k: (tab[k]["method"], tab[k]["steps"])):
    r = tab[key]
    lines.append(f"| {r['method']} | {r['steps']} | {r['gen_ppl'][0]:.1f} +- {r['gen_ppl'][1]:.1f} | "
                 f"{r['unigram_entropy'][0]:.2f} | {r['mean_len'][0]:.1f} +- {r['std_len'][0]:.1f} | "
                 f"{r['mean_nfe'][0]:.1f} | {r['sample_sec'][0]:.1f} |")
  lines += ["", "| run | NELBO bound (nats/token) | train s/step | network tokens/step |", "|---|---:|---:|---:|"]
  for m, info in results["runs"].items():
    nb = info.get("nelbo")
    lines.append(f"| {m} | {nb:.3f} | {info['sec_per_step']:.3f} | {info['model_tokens_per_step']:.0f} |"
                 if nb is not None else f"| {m} | - | {info['sec_per_step']:.3f} | "
                 f"{info['model_tokens_per_step']:.0f} |")
  lines += ["", f"Reference (judge on held-out data): NELBO/NLL of the AR judge = "
            f"{results['runs']['ar_tiny'].get('nelbo', float('nan')):.3f} nats/token."]
  with open(os.path.join(out_dir, "did_toy.md"), "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines), flush=True)

  plt = metrics_lib.pyplot()  # names the [plots] extra when matplotlib is missing
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
  for method, color in (("did", "tab:blue"), ("mdlm", "tab:orange")):
    rows = sorted((r for r in tab.values() if r["method"] == method), key=lambda r: r["steps"])
    if not rows:
      continue
    xs = [r["steps"] for r in rows]
    for ax, k, label in zip(axes, ("gen_ppl", "unigram_entropy", "mean_len"),
                            ("gen-PPL (AR judge)", "unigram entropy (nats)", "generated tokens")):
      ax.errorbar(xs, [r[k][0] for r in rows], yerr=[r[k][1] for r in rows], marker="o", color=color,
                  label=method.upper(), capsize=3)
      ax.set_xscale("log", base=2)
      ax.set_xlabel("sampling steps")
      ax.set_title(label)
  axes[0].legend()
  fig.suptitle(f"DID vs MDLM, toy scale ({results['train_steps']} training steps each, "
               f"{len(results['seeds'])} seeds)")
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "did_toy.png"), dpi=110)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--steps", type=int, default=600, help="training steps of every run (same budget)")
  parser.add_argument("--seeds", default="0,1,2", help="sampling seeds")
  parser.add_argument("--num_samples", type=int, default=32)
  parser.add_argument("--sampling_steps", default=",".join(map(str, STEP_COUNTS)))
  parser.add_argument("--eval_batches", type=int, default=4)
  parser.add_argument("--workdir", default="/tmp/did_toy")
  parser.add_argument("--use_ema", action="store_true",
                      help="use the EMA parameters (decay 0.999: only meaningful after a few thousand steps; "
                      "short budgets use the raw parameters)")
  parser.add_argument("--out_dir", default=os.path.join(ROOT, "benchmarks", "results"))
  args = parser.parse_args()
  seeds = [int(s) for s in args.seeds.split(",")]
  step_counts = [int(s) for s in args.sampling_steps.split(",")]
  t_start = time.perf_counter()
  print(f"backend={jax.default_backend()} devices={jax.device_count()} steps={args.steps}", flush=True)
  runs = {name: train_run(name, args.steps, args.workdir) for name in ("did_tiny", "mdlm_tiny", "ar_tiny")}
  for name in runs:
    runs[name]["nelbo"] = nelbo(os.path.join(args.workdir, name), args.eval_batches, args.use_ema)
    print(f"[{name}] validation NELBO {runs[name]['nelbo']:.3f} nats/token", flush=True)

  jax.config.update("jax_enable_x64", True)  # float64 categorical draws, as dlm_jax.sample does
  judge = api.load(os.path.join(args.workdir, "ar_tiny"), use_ema=args.use_ema)
  records = []
  for name, method in (("did_tiny", "did"), ("mdlm_tiny", "mdlm")):
    run = api.load(os.path.join(args.workdir, name), use_ema=args.use_ema)
    for steps in step_counts:
      for seed in seeds:
        r = evaluate_samples(run, judge, steps, seed, args.num_samples)
        r.update(method=method, steps=steps, seed=seed)
        records.append(r)
        print(f"[{method} T={steps} seed={seed}] gen-PPL {r['gen_ppl']:.1f} entropy "
              f"{r['unigram_entropy']:.2f} len {r['mean_len']:.1f} nfe {r['mean_nfe']:.1f} "
              f"({r['sample_sec']:.1f}s)", flush=True)
  results = dict(train_steps=args.steps, seeds=seeds, params="ema" if args.use_ema else "raw",
                 num_samples=args.num_samples, runs=runs,
                 records=records, table=summarise(records),
                 total_wall_sec=time.perf_counter() - t_start, backend=jax.default_backend())
  write_outputs(results, args.out_dir)
  print(f"total wall time {results['total_wall_sec'] / 60:.1f} min", flush=True)


if __name__ == "__main__":
  main()
