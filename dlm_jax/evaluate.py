r"""Evaluation entry point: likelihood bound on the validation split, written as JSON.

  python -m dlm_jax.evaluate --workdir=/tmp/run [--num_batches=50] [--num_t=16]
  python -m dlm_jax.evaluate --workdir=/tmp/run --judge_workdir=/tmp/ar \
      --config.sample.num_steps=64        # gen-PPL samples: any config.sample override

Writes eval_step{N}.json into --workdir: NELBO (nats/token), bits/token, perplexity bound, the
number of tokens and of t-draws per sequence.
"""

from __future__ import annotations

import json

from absl import app
from absl import flags

from dlm_jax import config as config_lib
from dlm_jax import paths
from dlm_jax.run import checkpoint as ckpt_lib
from dlm_jax.run import cli
from dlm_jax.run.evaluation import run_eval, run_task_eval

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir to evaluate.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: newest).")
_BATCHES = flags.DEFINE_integer("num_batches", None, "Limit on eval batches (default: all).")
_NUM_T = flags.DEFINE_integer("num_t", None, "t-draws per sequence (default: config).")
_NO_EMA = flags.DEFINE_bool("no_ema", False, "Evaluate the raw parameters instead of the EMA.")
_JUDGE = flags.DEFINE_string("judge_workdir", None,
                             "Workdir of an autoregressive run ('ar') that scores samples for "
                             "generative perplexity (gen-PPL).")
_GEN_N = flags.DEFINE_integer("gen_samples", 32, "Samples drawn for gen-PPL.")
_SET = flags.DEFINE_multi_string("set", [], "Deprecated (use --config.sample.<key>=value): "
                                 "config.sample overrides for gen-PPL samples as key=value.")
_TASK = flags.DEFINE_bool("task_accuracy", False,
                          "ARITH-CHAIN runs: accuracy vs tokens per forward under threshold "
                          "decoding (1 token/pass and each --taus), AUP, plot + JSON; replaces "
                          "the likelihood evaluation.")
_TAUS = flags.DEFINE_list("taus", ["0.9", "0.7", "0.5", "0.3"], "Thresholds for --task_accuracy.")
_TASK_N = flags.DEFINE_integer("task_n", 2000, "Held-out prompts for --task_accuracy.")
_TASK_SEED = flags.DEFINE_integer("task_seed", 123, "Seed of the held-out prompts.")
_TEACHER = flags.DEFINE_string("teacher_workdir", None,
                               "Causal run for the reveal-rank correlation (default: the teacher "
                               "recorded in the run's scored SFT set, if any).")


def main(argv):
  cli.quiet_library_logs()
  if len(argv) > 1:
    cli.fail(f"Unexpected arguments: {argv[1:]} (flags need '--name=value').")
  if not _WORKDIR.value:
    cli.fail("--workdir is required (the training --workdir to evaluate).")
  if _TASK.value:
    _main_task_accuracy()
    return
  try:
    res = run_eval(_WORKDIR.value, _STEP.value, _BATCHES.value, _NUM_T.value, not _NO_EMA.value,
                   _JUDGE.value, _GEN_N.value, cli.sample_overrides(_SET.value))
  except (config_lib.ConfigError, ckpt_lib.CheckpointError, paths.StorageError) as e:
    cli.fail(str(e))
  print(json.dumps(res, indent=2))


def _main_task_accuracy() -> None:
  """--task_accuracy: evaluates, prints one line per decode setting, writes JSON + PNG."""
  try:
    taus = [float(t) for t in _TAUS.value]
  except ValueError:
    raise app.UsageError(f"--taus={_TAUS.value}: expected comma-separated numbers.") from None
  if any(not 0.0 < t <= 1.0 for t in taus):
    raise app.UsageError(f"--taus={_TAUS.value}: every tau must lie in (0, 1].")
  try:
    res = run_task_eval(_WORKDIR.value, taus=taus, n=_TASK_N.value, seed=_TASK_SEED.value,
                                  teacher_workdir=_TEACHER.value, step=_STEP.value,
                                  use_ema=not _NO_EMA.value)
  except (config_lib.ConfigError, ckpt_lib.CheckpointError, ValueError, paths.StorageError) as e:
    cli.fail(str(e))
  print(f"{'setting':>8} {'acc%':>6} {'95% CI':>13} {'valid%':>6} {'TPF_gen':>7} {'TPF_cont':>8} "
        f"{'NFE':>5} {'rank-corr':>9}")
  for p in res["points"]:
    lo, hi = p["acc_ci95"]
    print(f"{p['setting']:>8} {p['accuracy']:6.1f} [{lo:5.1f},{hi:5.1f}] {p['valid_trace_rate']:6.1f} "
          f"{p['tpf_gen']:7.2f} {p['tpf_content']:8.2f} {p['nfe_mean']:5.1f} "
          f"{p.get('reveal_rank_corr', float('nan')):9.3f}")
  print(f"AUP (TPF_gen) {res['aup_tpf_gen']:.1f}, AUP (TPF_content) {res['aup_tpf_content']:.1f} "
        f"(y_max = {res['y_max']:.1f}, n = {res['n']}); wrote {res.get('json')}"
        + (f" and {res['plot']}" if res.get("plot") else " (no plot: see the warning above)"))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.sample_flags_parser("evaluate"))
