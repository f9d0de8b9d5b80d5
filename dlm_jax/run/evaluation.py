"""Evaluation as a library (no flags): likelihood bound and optional gen-PPL of a run.

`python -m dlm_jax.evaluate` is the command-line front end; tests, benchmarks and notebooks call
`run_eval` here, so importing it never defines absl flags.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from dlm_jax import api
from dlm_jax import parallel


def run_eval(workdir: str, step: int | None = None, num_batches: int | None = None,
             num_t: int | None = None, use_ema: bool = True, judge_workdir: str | None = None,
             gen_samples: int = 32, sample_overrides: dict | None = None, seed: int = 0) -> dict:
  from dlm_jax import trainer as train_lib  # pylint: disable=g-import-not-at-top
  run = api.load(workdir, step=step, use_ema=use_ema)
  exp = run.experiment
  if num_t is not None:
    exp.config.diffusion.eval_num_t = num_t
  eval_step = parallel.in_sharding_context(jax.jit(train_lib.make_eval_step(exp)), exp.mesh)
  res = train_lib.evaluate_nelbo(exp, eval_step, run.params, num_batches)
  res.update(step=run.step, method=run.config.method, params="ema" if use_ema else "raw",
             split=run.config.data.eval_split)
  if judge_workdir:
    from dlm_jax.analysis import gen_ppl as gen_ppl_lib  # pylint: disable=g-import-not-at-top
    judge = api.load(judge_workdir)
    out = run.sample(num_samples=gen_samples, seed=seed, **(sample_overrides or {}))
    res["gen"] = dict(gen_ppl_lib.gen_ppl(judge, out["texts"]), judge=judge_workdir,
                      decoder=run.config.sample.decoder,
                      num_steps=int(sample_overrides.get("num_steps", run.config.sample.num_steps))
                      if sample_overrides else int(run.config.sample.num_steps),
                      mean_nfe=float(np.mean(out["nfe"])))
  path = os.path.join(workdir, f"eval_step{run.step}.json")
  if parallel.is_main_process():
    with open(path, "w", encoding="utf-8") as f:
      json.dump(res, f, indent=2)
  res["path"] = path
  return res
