"""Evaluating a saved run (no flags): likelihood bound, gen-PPL, and task accuracy.

`python -m dlm_jax.evaluate` is the command-line front end; tests, benchmarks and notebooks call
`run_eval` / `run_task_eval` here, so importing it never defines absl flags. The measurements
themselves are `dlm_jax.evaluation`; this module loads the runs and writes the reports.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Optional, Sequence

import jax
import numpy as np

from dlm_jax import config as config_lib
from dlm_jax import metrics as metrics_lib
from dlm_jax import parallel
from dlm_jax import paths
from dlm_jax.data import sources
from dlm_jax.evaluation import gen_ppl as gen_ppl_lib
from dlm_jax.evaluation import task_accuracy
from dlm_jax.run import api
from dlm_jax.run import trainer as train_lib


def run_eval(workdir: str, step: int | None = None, num_batches: int | None = None,
             num_t: int | None = None, use_ema: bool = True, judge_workdir: str | None = None,
             gen_samples: int = 32, sample_overrides: dict | None = None,
             seed: int | None = None) -> dict:
  """Likelihood bound (and gen-PPL with a judge) of a saved run; writes eval_step{N}.json.

  The gen-PPL samples use config.sample (with `sample_overrides`); `seed` None: its seed.
  """
  run = api.load(workdir, step=step, use_ema=use_ema)
  exp = run.experiment
  try:  # the tokenizer came from the workdir; the evaluation split still comes from the data
    sources.get(run.config.data.source).check(run.config)
  except config_lib.ConfigError as e:
    raise config_lib.ConfigError(f"{e} (evaluate reads the run's evaluation split from its data; "
                                 "the checkpoint and tokenizer are fine).") from None
  if num_t is not None:
    exp.config.diffusion.eval_num_t = num_t
  eval_step = parallel.in_sharding_context(jax.jit(train_lib.make_eval_step(exp)), exp.mesh)
  res = train_lib.evaluate_nelbo(exp, eval_step, run.params, num_batches)
  res.update(step=run.step, method=run.config.method, params="ema" if use_ema else "raw",
             split=run.config.data.eval_split)
  if judge_workdir:
    judge = api.load(judge_workdir)
    overrides = dict(sample_overrides or {})
    sample_seed = overrides.pop("seed", None) if seed is None else seed
    out = run.sample(num_samples=gen_samples, seed=sample_seed, **overrides)
    res["gen"] = dict(gen_ppl_lib.gen_ppl(judge, out["texts"]), judge=judge_workdir,
                      decoder=run.config.sample.decoder,
                      num_steps=int(sample_overrides.get("num_steps", run.config.sample.num_steps))
                      if sample_overrides else int(run.config.sample.num_steps),
                      mean_nfe=float(np.mean(out["nfe"])))
  path = paths.join(workdir, f"eval_step{run.step}.json")
  if parallel.is_main_process():
    paths.write_text(path, json.dumps(res, indent=2))
  res["path"] = path
  return res


def teacher_from_sft_set(config: Any) -> Optional[str]:
  """The teacher workdir recorded in the run's scored SFT set (config.data.path), if any."""
  path = getattr(config.data, "path", "")
  if not path or not path.endswith(".npz") or not paths.exists(path):
    return None
  z = paths.load_npz(path)
  if "meta" not in z:
    return None
  wd = json.loads(str(z["meta"])).get("teacher_workdir")
  return wd if wd and paths.exists(wd) else None


def run_task_eval(workdir: str, *, taus: Sequence[float] = task_accuracy.DEFAULT_TAUS, n: int = 2000, seed: int = 123,
                  teacher_workdir: Optional[str] = None, step: Optional[int] = None, use_ema: bool = True,
                  out_dir: Optional[str] = None) -> dict[str, Any]:
  """`python -m dlm_jax.evaluate --task_accuracy`: evaluates, writes JSON + PNG, returns the result.

  The teacher for the reveal-rank correlation is `teacher_workdir`, else the one recorded in the
  run's scored SFT set, else none. AUP uses y_max = the run's own best accuracy (compare arms with
  a shared y_max via `aup_of`).
  """
  run = api.load(workdir, step=step, use_ema=use_ema)
  teacher_wd = teacher_workdir or teacher_from_sft_set(run.config)
  teacher = api.load(teacher_wd) if teacher_wd else None
  res = task_accuracy.evaluate_run(run, taus=taus, n=n, seed=seed, teacher=teacher)
  y_max = max(p["accuracy"] for p in res["points"])
  res.update(teacher_workdir=teacher_wd, y_max=y_max,
             aup_tpf_gen=task_accuracy.aup_of(res["points"], y_max, "tpf_gen") if y_max > 0 else 0.0,
             aup_tpf_content=task_accuracy.aup_of(res["points"], y_max, "tpf_content") if y_max > 0 else 0.0)
  out_dir = out_dir or workdir
  base = paths.join(out_dir, f"task_eval_step{res['step']}")
  if parallel.is_main_process():
    try:
      res["plot"] = task_accuracy.plot_curves(
          {os.path.basename(os.path.normpath(workdir)): res["points"]}, base + ".png")
    except metrics_lib.MissingExtraError as e:  # the JSON is still written: nothing is lost
      logging.warning("No plot: %s", e)
      res["plot"] = None
    res["json"] = base + ".json"
    paths.write_text(base + ".json", json.dumps(res, indent=2))
  return res
