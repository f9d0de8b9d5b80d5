r"""Teacher scoring for TRIMS: per-token difficulty buckets stored with an SFT set.

  python -m dlm_jax.score_difficulty --teacher_workdir=/tmp/teacher \
      --data=arith:seed=11,n=1000 --out=/tmp/sft_arith.npz [--num_buckets=8]
  python -m dlm_jax.score_difficulty --teacher_workdir=/tmp/teacher \
      --data=/path/pairs.jsonl --student_config=configs/my_sft.py --out=/tmp/sft.npz

One teacher-forced forward per example gives nll[i] = -log p_T(r_i | prompt, r_<i) on every
response slot (EOS fill included); each response's slots are then ranked into K quantile
buckets (spec/trims.md: 1 = hardest .. K = easiest). The output `.npz` (its layout is documented
in `dlm_jax.data.tasks.sft`, which also reads it for training) serves every
`config.trims.masking` arm. A JSON summary is written next to it (`<out>.json`). Partial results
go to `<out>.partial.npz` every --save_every examples; re-running the same command resumes there,
with nothing recomputed or lost.

The scoring maths is `dlm_jax.trims.scoring`, the file format `dlm_jax.data.tasks.sft`; this
command joins them to a loaded teacher run.
"""

from __future__ import annotations

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any, Sequence

from absl import app
from absl import flags

from dlm_jax import paths
from dlm_jax.config import ConfigError
from dlm_jax.data.tasks import arith, sft
from dlm_jax.data.tokenizers import tokenizer_id
from dlm_jax.run import api
from dlm_jax.run import checkpoint as ckpt_lib
from dlm_jax.run import cli
from dlm_jax.run.experiment import make_tokenizer, run_tokenizer
from dlm_jax.trims import scoring

ScoringError = sft.SFTDataError


def check_teacher(teacher: Any, teacher_workdir: str, student_tok: Any | None, student_setting: str) -> None:
  """Raises ScoringError when the run is not causal or its tokenizer differs from the student's."""
  if teacher.config.method != "ar" or not hasattr(teacher.method, "per_token_nll"):
    raise ScoringError(f"--teacher_workdir={teacher_workdir!r} holds a run with config.method="
                       f"{teacher.config.method!r}; the teacher must be a causal LM (method 'ar').")
  if student_tok is None:
    return
  same = tokenizer_id(teacher.tokenizer) == tokenizer_id(student_tok)
  if not same:
    raise ScoringError(
        f"The teacher's tokenizer {tokenizer_id(teacher.tokenizer)} (--teacher_workdir={teacher_workdir}, "
        f"config.data.tokenizer={teacher.config.data.tokenizer!r}, data.source={teacher.config.data.source!r}) "
        f"differs from the student's {tokenizer_id(student_tok)} ({student_setting}). Train the teacher "
        "with the student's tokenizer; mapping scores across tokenizers is not implemented.")


def score_dataset(teacher: Any, data: sft.SFTSet, out: str, *, teacher_workdir: str,
                  num_buckets: int = 8, batch_size: int = 256, save_every: int = 4096,
                  score: str = "nll", stop_after: int | None = None,
                  progress: bool = True) -> dict[str, Any] | None:
  """Scores `data` with a loaded causal run and writes the scored set (see `sft.score_dataset`)."""
  n, r = data.response.shape
  p = data.prompt.shape[1]
  if p + r > teacher.method.model_cfg.max_len:
    raise ScoringError(f"prompt ({p}) + response ({r}) is longer than the teacher's "
                       f"model.max_len = {teacher.method.model_cfg.max_len}.")
  meta = dict(data=data.spec, teacher_workdir=paths.absolute(teacher_workdir),
              teacher_step=int(teacher.step), teacher_tokenizer=tokenizer_id(teacher.tokenizer),
              num_examples=n, prompt_len=p, response_len=r, score=score, batch_size=int(batch_size))
  scorer = scoring.make_scorer(teacher.method.logits_fn, teacher.params, batch_size, p, r, score)
  return sft.score_dataset(scorer, data, out, meta, num_buckets=num_buckets,
                           batch_size=batch_size, save_every=save_every, stop_after=stop_after,
                           progress=progress)


def load_config_file(path: str) -> Any:
  """get_config() of a configs/*.py file given by path."""
  if not os.path.exists(path):
    raise ScoringError(f"--student_config={path!r} does not exist.")  # a config is a local .py
  spec = importlib.util.spec_from_file_location("_student_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def student_tokenizer(student_config: str | None, student_workdir: str | None) -> tuple[Any, Any, str]:
  """(tokenizer, config, setting name) of the student, or (None, None, '') when not given."""
  if student_config:
    cfg = load_config_file(student_config)
    return make_tokenizer(cfg), cfg, f"--student_config={student_config}"
  if student_workdir:
    cfg, _ = api.read_run_config(student_workdir)
    # The tokenizer files saved with the student run (its corpus is not read).
    return run_tokenizer(student_workdir, cfg), cfg, f"--student_workdir={student_workdir}"
  return None, None, ""


def run(teacher_workdir: str, data_spec: str, out: str, *, num_buckets: int = 8, batch_size: int = 256,
        save_every: int = 4096, score: str = "nll", student_config: str | None = None,
        student_workdir: str | None = None, stop_after: int | None = None,
        progress: bool = True) -> dict[str, Any] | None:
  """The whole step: load the teacher, check it against the student, read the data, score, store."""
  if not 1 <= num_buckets <= 127:
    raise ScoringError(f"--num_buckets={num_buckets} must be in 1..127.")
  teacher = api.load(teacher_workdir)
  s_tok, s_cfg, s_setting = student_tokenizer(student_config, student_workdir)
  if data_spec.startswith("arith:") or data_spec == "arith":
    if s_tok is None:
      s_tok, s_setting = arith.arith_tokenizer(), "the ARITH-CHAIN task vocabulary of --data=arith:..."
    check_teacher(teacher, teacher_workdir, s_tok, s_setting)
    data = arith.arith_set(data_spec)
  else:
    check_teacher(teacher, teacher_workdir, s_tok, s_setting)
    limit, name = teacher.method.model_cfg.max_len, "the teacher's config.model.max_len"
    if s_cfg is not None and s_cfg.data.seq_len < limit:
      limit, name = int(s_cfg.data.seq_len), f"the student's config.data.seq_len ({s_setting})"
    data = sft.jsonl_set(data_spec, s_tok or teacher.tokenizer, limit, name)
  return score_dataset(teacher, data, out, teacher_workdir=teacher_workdir, num_buckets=num_buckets,
                       batch_size=batch_size, save_every=save_every, score=score, stop_after=stop_after,
                       progress=progress)


def _define_flags() -> dict[str, Any]:
  """Command-line flags (defined only when run as a program, so the module imports as a library)."""
  return dict(
      teacher=flags.DEFINE_string("teacher_workdir", None,
                                  "Workdir of a causal ('ar') run loadable with dlm_jax.load."),
      data=flags.DEFINE_string("data", None,
                               "'arith:seed=11,n=1000[,kmax=3,swap=1]' or a prompt/response .jsonl file."),
      out=flags.DEFINE_string("out", None, "Output .npz (a JSON summary is written next to it)."),
      k=flags.DEFINE_integer("num_buckets", 8, "K, buckets per response."),
      bs=flags.DEFINE_integer("batch_size", 256, "Examples per teacher forward."),
      save=flags.DEFINE_integer("save_every", 4096, "Write partial results every N examples."),
      score=flags.DEFINE_enum("score", "nll", ["nll", "entropy"], "Difficulty score."),
      sconf=flags.DEFINE_string("student_config", None,
                                "Config file of the student (its tokenizer must match the teacher's)."),
      swd=flags.DEFINE_string("student_workdir", None, "Or: a workdir of the student run."),
  )


_FLAGS: dict[str, Any] = {}


def main(argv: Sequence[str]) -> None:
  cli.quiet_library_logs()
  f = _FLAGS
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  for name in ("teacher", "data", "out"):
    if not f[name].value:
      raise app.UsageError(f"--{f[name].name} is required.")
  try:
    summary = run(f["teacher"].value, f["data"].value, f["out"].value, num_buckets=f["k"].value,
                  batch_size=f["bs"].value, save_every=f["save"].value, score=f["score"].value,
                  student_config=f["sconf"].value, student_workdir=f["swd"].value)
  except (ScoringError, ConfigError, ckpt_lib.CheckpointError, FileNotFoundError,
          paths.StorageError) as e:
    print(f"ERROR: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
  means = summary["bucket_mean_nll"]
  print("mean teacher NLL per bucket (1 = hardest): " + ", ".join(f"{m:.4f}" for m in means))
  print(f"bucket 1 / bucket {len(means)} = {summary['ratio_bucket1_to_bucketK']:.1f}x; wrote {summary['out']}")


if __name__ == "__main__":
  _FLAGS.update(_define_flags())
  app.run(main)
