r"""TRIMS toy reproduction on ARITH-CHAIN (spec/trims.md, "Toy reproduction on CPU").

  python benchmarks/trims_toy.py [--workdir=workdirs/trims_toy] [--seeds=0,1,2] \
      [--pretrain_steps=3000] [--teacher_steps=400] [--sft_steps=800] [--n_test=1000]

Chain: pretrain the MDLM student (configs/arith_pretrain.py) -> train the causal teacher,
early-stopped (configs/arith_teacher.py) -> score the SFT set (1,000 examples, seed 11, K = 8)
-> SFT arms S, S-u, T-hard, T-easy, T-rand (configs/arith_sft_*.py) for every seed, all from the
same pretrained student and the same scored set -> decode held-out prompts (seed 123, block 8,
1 token/pass and each tau) -> table of accuracy @ tau with TPF, AUP per arm, mean +- std over
seeds. Writes trims_toy.{md,json,png} into --out. Every stage is skipped when its output exists,
so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

from absl import app
from absl import flags
from absl import logging as absl_logging

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402

ARMS = {
    "S": "configs/arith_sft_standard.py",
    "S-u": "configs/arith_sft_standard_uniform.py",
    "T-hard": "configs/arith_sft_trims.py",
    "T-easy": "configs/arith_sft_trims_easy.py",
    "T-rand": "configs/arith_sft_trims_rand.py",
}

_WORKDIR = flags.DEFINE_string("workdir", "workdirs/trims_toy", "Where runs and checkpoints go.")
_OUT = flags.DEFINE_string("out", "benchmarks/results", "Where trims_toy.{md,json,png} go.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "SFT seeds (data order and masks).")
_ARMS = flags.DEFINE_list("arms", list(ARMS), "SFT arms.")
_PRE = flags.DEFINE_integer("pretrain_steps", 3000, "Student pretraining steps.")
_TEACH = flags.DEFINE_integer("teacher_steps", 400, "Teacher steps (early stop).")
_SFT = flags.DEFINE_integer("sft_steps", 800, "SFT steps per arm and seed.")
_NSFT = flags.DEFINE_integer("n_sft", 1000, "Examples in the scored SFT set (seed 11).")
_NTEST = flags.DEFINE_integer("n_test", 1000,
                             "Held-out prompts (seed 123; the spec pilot's 1,000, s.e. ~1 point).")
_TAUS = flags.DEFINE_list("taus", ["0.9", "0.7", "0.5", "0.3"], "Decode thresholds.")


def _done(workdir: str, steps: int) -> bool:
  return os.path.isdir(os.path.join(workdir, "checkpoints", str(steps)))


def _train(config, workdir: str, what: str, timings: dict) -> None:
  from dlm_jax.run import trainer  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  if not _done(workdir, config.train.num_steps):
    config.train.print_batch = False
    trainer.train(config, workdir)
  timings[what] = timings.get(what, 0.0) + time.perf_counter() - t0
  print(f"[{what}] {config.train.num_steps} steps in {workdir} ({time.perf_counter() - t0:.0f} s)", flush=True)


def _load_config(path: str):
  from dlm_jax import score_difficulty  # pylint: disable=g-import-not-at-top
  return score_difficulty.load_config_file(os.path.join(ROOT, path))


def _eval(workdir: str, teacher, taus, n_test: int, timings: dict) -> dict:
  from dlm_jax.run import api  # pylint: disable=g-import-not-at-top
  from dlm_jax.evaluation import task_accuracy as task_eval  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, f"toy_eval_n{n_test}.json")
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      res = json.load(f)
    if [p["tau"] for p in res["points"]][1:] == list(taus):
      return res
  t0 = time.perf_counter()
  run = api.load(workdir, use_ema=False)
  res = task_eval.evaluate_run(run, taus=taus, n=n_test, seed=123, teacher=teacher)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(res, f, indent=2)
  timings["decode"] = timings.get("decode", 0.0) + time.perf_counter() - t0
  print(f"[eval] {workdir}: " + ", ".join(
      f"{p['setting']} {p['accuracy']:.1f}% @ {p['tpf_gen']:.2f}" for p in res["points"]) +
      f" ({time.perf_counter() - t0:.0f} s)", flush=True)
  return res


def _mean_std(xs) -> tuple[float, float]:
  xs = np.asarray([x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))], float)
  if xs.size == 0:
    return float("nan"), float("nan")
  return float(xs.mean()), float(xs.std(ddof=1)) if xs.size > 1 else 0.0


def aggregate(results: dict[str, dict[str, dict]], base: dict, seeds: list[int]) -> dict:
  """Per arm: mean +- std over seeds of each point's metrics and of AUP (y_max per seed over arms)."""
  from dlm_jax.evaluation import task_accuracy as task_eval  # pylint: disable=g-import-not-at-top
  out = {}
  y_max = {s: max([p["accuracy"] for p in base["points"]] +
                  [p["accuracy"] for arm in results for p in results[arm][str(s)]["points"]]) for s in seeds}
  arms = {"base": {str(s): base for s in seeds}, **results}
  for arm, per_seed in arms.items():
    runs = [per_seed[str(s)] for s in seeds]
    settings = [p["setting"] for p in runs[0]["points"]]
    pts = []
    for i, name in enumerate(settings):
      row = {"setting": name}
      for key in ("accuracy", "valid_trace_rate", "tpf_gen", "tpf_content", "nfe_mean", "reveal_rank_corr"):
        m, sd = _mean_std([r["points"][i].get(key) for r in runs])
        row[key], row[key + "_std"] = m, sd
      pts.append(row)
    aups = {}
    for key in ("tpf_gen", "tpf_content"):
      vals = [task_eval.aup_of(r["points"], y_max[s], key) if y_max[s] > 0 else 0.0 for r, s in zip(runs, seeds)]
      aups[key] = _mean_std(vals) + (vals,)
    out[arm] = dict(points=pts, aup_tpf_gen=aups["tpf_gen"][0], aup_tpf_gen_std=aups["tpf_gen"][1],
                    aup_tpf_content=aups["tpf_content"][0], aup_tpf_content_std=aups["tpf_content"][1],
                    aup_tpf_gen_per_seed=aups["tpf_gen"][2], aup_tpf_content_per_seed=aups["tpf_content"][2])
  return dict(arms=out, y_max_per_seed={str(s): y for s, y in y_max.items()})


def table_markdown(agg: dict, taus: list[float]) -> str:
  """Markdown: accuracy % (mean +- std) @ each setting with TPF_gen / TPF_content, AUP per arm."""
  settings = ["1tok"] + [f"tau={t:g}" for t in taus]
  head = "| arm | " + " | ".join(f"{s}: acc % (TPF_gen / TPF_content)" for s in settings) + \
         " | valid % @ tau=0.5 | rank-corr @ tau=0.9 | AUP (TPF_gen) | AUP (TPF_content) |"
  lines = [head, "|" + "---|" * (len(settings) + 5)]
  for arm, a in agg["arms"].items():
    by = {p["setting"]: p for p in a["points"]}
    cells = []
    for s in settings:
      p = by.get(s)
      cells.append("-" if p is None else
                   f"{p['accuracy']:.1f} ± {p['accuracy_std']:.1f} ({p['tpf_gen']:.2f} / {p['tpf_content']:.2f})")
    v = by.get("tau=0.5", {})
    rc = by.get("tau=0.9", {})
    lines.append(f"| {arm} | " + " | ".join(cells) +
                 f" | {v.get('valid_trace_rate', float('nan')):.1f} ± {v.get('valid_trace_rate_std', float('nan')):.1f}"
                 f" | {rc.get('reveal_rank_corr', float('nan')):+.3f}"
                 f" | {a['aup_tpf_gen']:.1f} ± {a['aup_tpf_gen_std']:.1f}"
                 f" | {a['aup_tpf_content']:.1f} ± {a['aup_tpf_content_std']:.1f} |")
  return "\n".join(lines)


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)
  import logging  # pylint: disable=g-import-not-at-top
  logging.getLogger().setLevel(logging.WARNING)
  wd = os.path.abspath(_WORKDIR.value)
  os.makedirs(wd, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", os.path.join(wd, "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  from dlm_jax.run import api  # pylint: disable=g-import-not-at-top
  from dlm_jax import score_difficulty  # pylint: disable=g-import-not-at-top
  from dlm_jax.evaluation import task_accuracy as task_eval  # pylint: disable=g-import-not-at-top

  seeds = [int(s) for s in _SEEDS.value]
  taus = [float(t) for t in _TAUS.value]
  arms = list(_ARMS.value)
  for a in arms:
    if a not in ARMS:
      raise app.UsageError(f"--arms: unknown arm {a!r}; choose from {list(ARMS)}.")
  timings: dict[str, float] = {}
  t_start = time.perf_counter()

  pre_wd, teach_wd = os.path.join(wd, "pretrain"), os.path.join(wd, "teacher")
  c = _load_config("configs/arith_pretrain.py")
  c.train.num_steps = _PRE.value
  c.train.eval_every = 10 * _PRE.value
  c.train.ckpt_every = max(_PRE.value // 2, 1)
  _train(c, pre_wd, "pretrain", timings)
  c = _load_config("configs/arith_teacher.py")
  c.train.num_steps = _TEACH.value
  c.train.eval_every = 10 * _TEACH.value
  c.train.ckpt_every = _TEACH.value
  _train(c, teach_wd, "teacher", timings)

  sft_set = os.path.join(wd, "sft_seed11.npz")
  t0 = time.perf_counter()
  if not os.path.exists(sft_set):
    score_difficulty.run(teach_wd, f"arith:seed=11,n={_NSFT.value}", sft_set, batch_size=250, save_every=500)
  with open(os.path.splitext(sft_set)[0] + ".json", encoding="utf-8") as f:
    scored = json.load(f)
  timings["score"] = time.perf_counter() - t0
  means = scored["bucket_mean_nll"]
  print("[score] mean teacher NLL per bucket (1 = hardest): " + ", ".join(f"{m:.3f}" for m in means) +
        f"; bucket 1 / bucket K = {scored['ratio_bucket1_to_bucketK']:.1f}x (needs >= 10x); "
        f"mean response NLL {scored['mean_nll']:.3f}", flush=True)

  for seed in seeds:
    for arm in arms:
      c = _load_config(ARMS[arm])
      c.seed = seed
      c.data.path = sft_set
      c.train.init_from = pre_wd
      c.train.num_steps = _SFT.value
      c.train.ckpt_every = _SFT.value
      c.optim.warmup_steps = min(c.optim.warmup_steps, max(_SFT.value // 16, 1))
      _train(c, os.path.join(wd, f"sft_{arm}_seed{seed}"), "sft", timings)

  teacher = api.load(teach_wd)
  base = _eval(pre_wd, teacher, taus, _NTEST.value, timings)
  results = {arm: {str(s): _eval(os.path.join(wd, f"sft_{arm}_seed{s}"), teacher, taus, _NTEST.value, timings)
                   for s in seeds} for arm in arms}
  agg = aggregate(results, base, seeds)
  total = time.perf_counter() - t_start

  out = os.path.abspath(_OUT.value)
  os.makedirs(out, exist_ok=True)
  curves = {arm: a["points"] for arm, a in agg["arms"].items()}
  errors = {arm: ([p["tpf_content_std"] for p in a["points"]], [p["accuracy_std"] for p in a["points"]])
            for arm, a in agg["arms"].items()}
  png = task_eval.plot_curves(
      curves, os.path.join(out, "trims_toy.png"), "tpf_content",
      title=f"ARITH-CHAIN toy: accuracy vs TPF_content, mean ± std over seeds {seeds}", errors=errors)
  budget = dict(pretrain_steps=_PRE.value, teacher_steps=_TEACH.value, sft_steps=_SFT.value, n_sft=_NSFT.value,
                n_test=_NTEST.value, seeds=seeds, taus=taus, block_len=8, batch=32, devices=jax.device_count(),
                cpu_count=os.cpu_count())
  md = table_markdown(agg, taus)
  record = dict(budget=budget, bucket_mean_nll=means, bucket_ratio=scored["ratio_bucket1_to_bucketK"],
                teacher_mean_nll=scored["mean_nll"], timings_sec={**timings, "total": total}, aggregate=agg,
                per_run=dict(base=base, **results))
  with open(os.path.join(out, "trims_toy.json"), "w", encoding="utf-8") as f:
    json.dump(record, f, indent=2)
  with open(os.path.join(out, "trims_toy.md"), "w", encoding="utf-8") as f:
    f.write("# TRIMS toy reproduction (ARITH-CHAIN)\n\n")
    f.write(f"Budget: {json.dumps(budget)}\n\n")
    f.write("Teacher mean NLL per hard-first bucket (1 = hardest): " + ", ".join(f"{m:.3f}" for m in means) +
            f" (bucket 1 / bucket 8 = {scored['ratio_bucket1_to_bucketK']:.1f}x)\n\n")
    f.write(md + "\n\n")
    f.write(f"AUP y_max per seed (best accuracy of any arm): {agg['y_max_per_seed']}\n\n")
    f.write("Timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in record["timings_sec"].items()) + "\n\n")
    f.write(f"![accuracy vs TPF]({os.path.basename(png)})\n")
  print("\n" + md)
  print("\nTimings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in record["timings_sec"].items()))
  print(f"Wrote {out}/trims_toy.md, trims_toy.json, {png}")


if __name__ == "__main__":
  app.run(main)
