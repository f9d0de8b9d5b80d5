r"""Teacher scoring for TRIMS: per-token difficulty buckets stored with an SFT set.

  python -m dlm_jax.score_difficulty --teacher_workdir=/tmp/teacher \
      --data=arith:seed=11,n=1000 --out=/tmp/sft_arith.npz [--num_buckets=8]
  python -m dlm_jax.score_difficulty --teacher_workdir=/tmp/teacher \
      --data=/path/pairs.jsonl --student_config=configs/my_sft.py --out=/tmp/sft.npz

One teacher-forced forward per example gives nll[i] = -log p_T(r_i | prompt, r_<i) on every
response slot (EOS fill included); each response's slots are then ranked into K quantile
buckets (spec/trims.md: 1 = hardest .. K = easiest). The output `.npz` (read by
`dlm_jax.data.task_pipeline` through grain-style index access) holds

  prompt [N, P] int32, response [N, R] int32, example_id [N] int32, response_len [N] int32,
  nll [N, R] float32 (0 off the valid slots), buckets [N, R] int8 (hard_first),
  buckets_easy_first [N, R] int8, buckets_random [N, R] int8 (seeded by example id),
  bucket_mean_nll [K] float32, answer [N] int32 (ARITH-CHAIN only), meta (a JSON string),

so one scored file serves every `config.diffusion.masking` arm. A JSON summary is written next
to it (`<out>.json`). Partial results go to `<out>.partial.npz` every --save_every examples;
re-running the same command resumes there, with nothing recomputed or lost.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sys
import time
from typing import Any, Callable, Sequence

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from dlm_jax.diffusion import trims

ORDERS = {"hard_first": "buckets", "easy_first": "buckets_easy_first", "random": "buckets_random"}
"""Bucket order -> array name in the scored file."""


class ScoringError(ValueError):
  """A setting or an input line that makes scoring impossible; the message names it."""


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SFTSet:
  """Prompt/response pairs in the fixed-width layout of the scored file.

  Attributes:
    prompt: [N, P] int32, prompt tokens then PAD (never masked).
    response: [N, R] int32, response tokens then EOS fill (learned, scored, maskable).
    example_id: [N] int32 stable ids.
    response_len: [N] int32 response tokens before the EOS fill.
    extra: other per-example arrays to store (e.g. ARITH-CHAIN answers).
    spec: the --data value it came from.
  """
  prompt: np.ndarray
  response: np.ndarray
  example_id: np.ndarray
  response_len: np.ndarray
  extra: dict[str, np.ndarray]
  spec: str

  def __len__(self) -> int:
    return int(self.prompt.shape[0])


def parse_arith_spec(spec: str) -> dict[str, int]:
  """'arith:seed=11,n=1000[,kmax=3,swap=1]' -> dict; errors name the bad part."""
  body = spec[len("arith:"):] if spec.startswith("arith:") else spec
  out = dict(seed=11, n=1000, kmax=3, swap=1)
  for part in filter(None, body.split(",")):
    if "=" not in part:
      raise ScoringError(f"--data={spec!r}: expected key=value in {part!r} (keys: {sorted(out)}).")
    k, v = part.split("=", 1)
    if k not in out:
      raise ScoringError(f"--data={spec!r}: unknown key {k!r} (keys: {sorted(out)}).")
    try:
      out[k] = int(v)
    except ValueError:
      raise ScoringError(f"--data={spec!r}: {k} must be an integer, got {v!r}.") from None
  if out["n"] < 1:
    raise ScoringError(f"--data={spec!r}: n must be >= 1.")
  return out


def arith_set(spec: str) -> SFTSet:
  """A generated ARITH-CHAIN set: `generate(seed, n)` (example i depends only on (seed, i))."""
  from dlm_jax.data import tasks  # pylint: disable=g-import-not-at-top
  a = parse_arith_spec(spec)
  task = tasks.ArithChain(kmax=a["kmax"], swap=bool(a["swap"]))
  ex = task.generate(a["seed"], a["n"])
  resp_len = (ex["response"] != tasks.EOS).sum(1).astype(np.int32)
  return SFTSet(prompt=ex["prompt"], response=ex["response"],
                example_id=np.arange(a["n"], dtype=np.int32), response_len=resp_len,
                extra=dict(answer=ex["answer"], num_steps=ex["num_steps"]), spec=spec)


def jsonl_set(path: str, tokenizer: Any, max_len: int, limit_name: str) -> SFTSet:
  """Prompt/response JSONL of real users, laid out as [prompt, PAD..][response, EOS..].

  P = longest prompt (BOS prepended), R = longest response + 1 (at least one EOS to learn).

  Args:
    path: the .jsonl file (fields "prompt" and "response", strings).
    tokenizer: has encode(text) -> ids, bos_id, eos_id, pad_id.
    max_len: largest allowed P + R (the model's length).
    limit_name: the setting `max_len` comes from, named in errors.

  Raises:
    ScoringError: naming the file and line of a bad example, or the setting that is too small.
  """
  from dlm_jax.data import tasks  # pylint: disable=g-import-not-at-top
  if not os.path.exists(path):
    raise ScoringError(f"--data={path!r} does not exist.")
  try:
    # BOS before the prompt and one EOS after the response must fit too.
    rows = tasks.load_prompt_response_jsonl(path, tokenizer.encode, max_len - 2)
  except ValueError as e:
    raise ScoringError(f"{e} (the limit is {limit_name} = {max_len}, minus BOS and one EOS)") from None
  p_max = 1 + max(len(r["prompt"]) for r in rows)
  r_max = 1 + max(len(r["response"]) for r in rows)
  if p_max + r_max > max_len:
    lp = max(rows, key=lambda r: len(r["prompt"]))["line"]
    lr = max(rows, key=lambda r: len(r["response"]))["line"]
    raise ScoringError(
        f"{path}: the longest prompt (line {lp}, {p_max} tokens with BOS) plus the longest response "
        f"(line {lr}, {r_max} tokens with EOS) do not fit in {limit_name} = {max_len} in the fixed "
        "prompt/response layout; shorten them or raise the limit.")
  n = len(rows)
  prompt = np.full((n, p_max), tokenizer.pad_id, np.int32)
  response = np.full((n, r_max), tokenizer.eos_id, np.int32)
  for i, r in enumerate(rows):
    ids = [tokenizer.bos_id] + list(r["prompt"])
    prompt[i, :len(ids)] = ids
    response[i, :len(r["response"])] = r["response"]
  return SFTSet(prompt=prompt, response=response, example_id=np.arange(n, dtype=np.int32),
                response_len=np.array([len(r["response"]) for r in rows], np.int32),
                extra=dict(line=np.array([r["line"] for r in rows], np.int32)), spec=path)


# ---------------------------------------------------------------------------------------------------------------
# Teacher
# ---------------------------------------------------------------------------------------------------------------


def tokenizer_id(tok: Any) -> str:
  """A printable identity of a tokenizer: name, vocabulary size and fingerprint."""
  fp = tok.fingerprint() if hasattr(tok, "fingerprint") else "?"
  return f"{getattr(tok, 'name', type(tok).__name__)} (vocab {tok.vocab_size}, fingerprint {fp})"


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


def make_scorer(teacher: Any, batch_size: int, prompt_len: int, response_len: int,
                score: str = "nll") -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
  """A jitted (prompt [b, P], response [b, R]) -> scores [b, R] float32 for b <= batch_size.

  Rows are padded to a fixed batch so every chunk runs the same compiled program (and a resumed
  run reproduces an uninterrupted one bit for bit).
  """
  if prompt_len + response_len > teacher.method.model_cfg.max_len:
    raise ScoringError(f"prompt ({prompt_len}) + response ({response_len}) is longer than the teacher's "
                       f"model.max_len = {teacher.method.model_cfg.max_len}.")

  @jax.jit
  def fn(params, prompt, response):
    return trims.teacher_response_scores(teacher.method.logits_fn(params), prompt, response, score)

  def run(prompt: np.ndarray, response: np.ndarray) -> np.ndarray:
    b = prompt.shape[0]
    pp = np.zeros((batch_size, prompt_len), np.int32)
    rr = np.zeros((batch_size, response_len), np.int32)
    pp[:b], rr[:b] = prompt, response
    return np.asarray(jax.device_get(fn(teacher.params, jnp.asarray(pp), jnp.asarray(rr))))[:b]

  return run


# ---------------------------------------------------------------------------------------------------------------
# Buckets and the output file
# ---------------------------------------------------------------------------------------------------------------


def bucket_arrays(nll: np.ndarray, valid: np.ndarray, example_id: np.ndarray, K: int) -> dict[str, np.ndarray]:
  """Buckets of every order: {'buckets', 'buckets_easy_first', 'buckets_random'} int8 [N, R]."""
  out = {}
  for order, name in ORDERS.items():
    seed = example_id if order == "random" else None
    out[name] = trims.assign_buckets(nll, valid, K=K, order=order, seed=seed)
  return out


def bucket_mean_nll(nll: np.ndarray, buckets: np.ndarray, K: int) -> np.ndarray:
  """Mean teacher NLL of the slots of each hard-first bucket 1..K -> float64 [K] (NaN if empty)."""
  out = np.full((K,), np.nan)
  for k in range(1, K + 1):
    sel = buckets == k
    if sel.any():
      out[k - 1] = float(nll[sel].mean())
  return out


def response_valid(data: SFTSet) -> np.ndarray:
  """[N, R] bool: the slots that are scored, bucketed and maskable (the whole response incl. EOS fill)."""
  return np.ones(data.response.shape, bool)


def _atomic_savez(path: str, **arrays: Any) -> None:
  tmp = path + ".tmp.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def partial_path(out: str) -> str:
  return (out[:-4] if out.endswith(".npz") else out) + ".partial.npz"


def write_scored_set(out: str, data: SFTSet, nll: np.ndarray, num_buckets: int,
                     meta: dict[str, Any]) -> dict[str, Any]:
  """Buckets `nll` [N, R] in every order and writes the scored file `out` plus `<out>.json`.

  Returns:
    The summary (meta plus K, bucket_mean_nll [K], mean_nll, the bucket 1 / bucket K ratio, out).
  """
  valid = response_valid(data)
  nll = np.where(valid, nll, 0.0).astype(np.float32)
  buckets = bucket_arrays(nll, valid, data.example_id, num_buckets)
  means = bucket_mean_nll(nll, buckets["buckets"], num_buckets)
  summary = dict(meta, num_buckets=num_buckets, bucket_mean_nll=[float(x) for x in means],
                 mean_nll=float(nll[valid].mean()), ratio_bucket1_to_bucketK=float(means[0] / max(means[-1], 1e-12)),
                 out=os.path.abspath(out))
  _atomic_savez(out, prompt=data.prompt.astype(np.int32), response=data.response.astype(np.int32),
                example_id=data.example_id.astype(np.int32), response_len=data.response_len.astype(np.int32),
                nll=nll, bucket_mean_nll=means.astype(np.float32), num_buckets=np.int32(num_buckets),
                meta=json.dumps(summary), **buckets, **data.extra)
  with open(os.path.splitext(out)[0] + ".json", "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=2)
  return summary


def score_dataset(teacher: Any, data: SFTSet, out: str, *, teacher_workdir: str, num_buckets: int = 8,
                  batch_size: int = 256, save_every: int = 4096, score: str = "nll",
                  stop_after: int | None = None, progress: bool = True) -> dict[str, Any] | None:
  """Scores `data` with `teacher`, writes `out` (.npz) and its JSON summary; resumes a partial run.

  Args:
    teacher: a `dlm_jax.api.LoadedRun` of a causal ('ar') run.
    data: the examples.
    out: output path (.npz).
    teacher_workdir: recorded in the file (and used to check a partial file belongs to this run).
    num_buckets: K.
    batch_size: examples per teacher forward.
    save_every: write partial results every this many examples (rounded up to whole batches).
    score: "nll" (default) or "entropy" (ablation).
    stop_after: stop (after saving the partial file) once this many examples are done in total;
      simulates an interruption in tests.
    progress: print a progress line to stderr.

  Returns:
    The summary dict (also written to `<out>.json`), or None when stopped by `stop_after`.
  """
  if not out.endswith(".npz"):
    raise ScoringError(f"--out={out!r} must end in .npz.")
  n, r = data.response.shape
  p = data.prompt.shape[1]
  meta = dict(data=data.spec, teacher_workdir=os.path.abspath(teacher_workdir), teacher_step=int(teacher.step),
              teacher_tokenizer=tokenizer_id(teacher.tokenizer), num_examples=n, prompt_len=p,
              response_len=r, score=score, batch_size=int(batch_size))
  part = partial_path(out)
  done = 0
  nll = np.zeros((n, r), np.float32)
  if os.path.exists(part):
    with np.load(part) as z:
      pmeta = json.loads(str(z["meta"]))
      if pmeta != meta:
        diff = sorted(k for k in set(meta) | set(pmeta) if meta.get(k) != pmeta.get(k))
        raise ScoringError(f"{part} was written by a different scoring run (differs in {diff}); delete it "
                           "to start over, or re-run with the original settings to resume.")
      done = int(z["done"])
      nll[:done] = z["nll"][:done]
    if progress:
      print(f"Resuming {out}: {done}/{n} examples already scored.", file=sys.stderr, flush=True)
  out_dir = os.path.dirname(os.path.abspath(out))
  os.makedirs(out_dir, exist_ok=True)
  scorer = make_scorer(teacher, batch_size, p, r, score)
  save_every = max(batch_size, -(-int(save_every) // batch_size) * batch_size)
  t0, start, last_saved = time.perf_counter(), done, done
  while done < n:
    hi = min(done + batch_size, n)
    nll[done:hi] = scorer(data.prompt[done:hi], data.response[done:hi])
    done = hi
    if done - last_saved >= save_every or done == n or (stop_after is not None and done >= stop_after):
      _atomic_savez(part, nll=nll[:done], done=np.int64(done), meta=json.dumps(meta))
      last_saved = done
    if progress:
      rate = (done - start) / max(time.perf_counter() - t0, 1e-9)
      eta = (n - done) / max(rate, 1e-9)
      print(f"\rscoring {done}/{n} examples ({100.0 * done / n:5.1f}%), {rate:,.0f} ex/s, ETA {eta:,.0f} s, "
            f"saved up to {last_saved}", end="", file=sys.stderr, flush=True)
    if stop_after is not None and done >= stop_after and done < n:
      if progress:
        print("", file=sys.stderr, flush=True)
      return None
  if progress:
    print("", file=sys.stderr, flush=True)

  summary = write_scored_set(out, data, nll, num_buckets, meta)
  os.remove(part)
  return summary


# ---------------------------------------------------------------------------------------------------------------
# Student tokenizer and the command line
# ---------------------------------------------------------------------------------------------------------------


def load_config_file(path: str) -> Any:
  """get_config() of a configs/*.py file given by path."""
  if not os.path.exists(path):
    raise ScoringError(f"--student_config={path!r} does not exist.")
  spec = importlib.util.spec_from_file_location("_student_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def student_tokenizer(student_config: str | None, student_workdir: str | None) -> tuple[Any, Any, str]:
  """(tokenizer, config, setting name) of the student, or (None, None, '') when not given."""
  from dlm_jax import experiment as exp_lib  # pylint: disable=g-import-not-at-top
  if student_config:
    cfg = load_config_file(student_config)
    return exp_lib.make_tokenizer(cfg), cfg, f"--student_config={student_config}"
  if student_workdir:
    from dlm_jax import api  # pylint: disable=g-import-not-at-top
    cfg, _ = api.read_run_config(student_workdir)
    cfg = api._fix_types(cfg)  # pylint: disable=protected-access
    return exp_lib.make_tokenizer(cfg), cfg, f"--student_workdir={student_workdir}"
  return None, None, ""


def run(teacher_workdir: str, data_spec: str, out: str, *, num_buckets: int = 8, batch_size: int = 256,
        save_every: int = 4096, score: str = "nll", student_config: str | None = None,
        student_workdir: str | None = None, stop_after: int | None = None,
        progress: bool = True) -> dict[str, Any] | None:
  """The whole step: load the teacher, check it against the student, read the data, score, store."""
  from dlm_jax import api  # pylint: disable=g-import-not-at-top
  from dlm_jax.data import task_pipeline  # pylint: disable=g-import-not-at-top
  if not 1 <= num_buckets <= 127:
    raise ScoringError(f"--num_buckets={num_buckets} must be in 1..127.")
  teacher = api.load(teacher_workdir)
  s_tok, s_cfg, s_setting = student_tokenizer(student_config, student_workdir)
  if data_spec.startswith("arith:") or data_spec == "arith":
    if s_tok is None:
      s_tok, s_setting = task_pipeline.arith_tokenizer(), "the ARITH-CHAIN task vocabulary of --data=arith:..."
    check_teacher(teacher, teacher_workdir, s_tok, s_setting)
    data = arith_set(data_spec)
  else:
    check_teacher(teacher, teacher_workdir, s_tok, s_setting)
    limit, name = teacher.method.model_cfg.max_len, "the teacher's config.model.max_len"
    if s_cfg is not None and s_cfg.data.seq_len < limit:
      limit, name = int(s_cfg.data.seq_len), f"the student's config.data.seq_len ({s_setting})"
    data = jsonl_set(data_spec, s_tok or teacher.tokenizer, limit, name)
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
  f = _FLAGS
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  for name in ("teacher", "data", "out"):
    if not f[name].value:
      raise app.UsageError(f"--{f[name].name} is required.")
  from dlm_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from dlm_jax import config_lib  # pylint: disable=g-import-not-at-top
  try:
    summary = run(f["teacher"].value, f["data"].value, f["out"].value, num_buckets=f["k"].value,
                  batch_size=f["bs"].value, save_every=f["save"].value, score=f["score"].value,
                  student_config=f["sconf"].value, student_workdir=f["swd"].value)
  except (ScoringError, config_lib.ConfigError, ckpt_lib.CheckpointError, FileNotFoundError) as e:
    print(f"ERROR: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
  means = summary["bucket_mean_nll"]
  print("mean teacher NLL per bucket (1 = hardest): " + ", ".join(f"{m:.4f}" for m in means))
  print(f"bucket 1 / bucket {len(means)} = {summary['ratio_bucket1_to_bucketK']:.1f}x; wrote {summary['out']}")


if __name__ == "__main__":
  _FLAGS.update(_define_flags())
  app.run(main)
