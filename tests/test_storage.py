"""Cloud workdirs (issue 14 item 1), storage faults and metrics without duplicates (issue 18), the
run's own tokenizer (issue 15 item 4).

gs:// runs against a real GCS JSON API served locally (tests/gcs_emulator.py, with generation
preconditions and injected write faults).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid

import jax
import numpy as np
import pytest

from dlm_jax import metrics as metrics_lib
from dlm_jax import paths
from dlm_jax.config import ConfigError
from dlm_jax.data import tokenizer_store
from dlm_jax.data import tokenizers
from dlm_jax.data.tasks import arith
from dlm_jax.run import api
from dlm_jax.run import checkpoint as ckpt_lib
from dlm_jax.run import evaluation
from dlm_jax.run import experiment as exp_lib
from dlm_jax.run import trainer
from tests.tiny import TINY_FLAGS, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _gs(name: str) -> str:
  return f"gs://bucket/{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(params=["local", "gcs"])
def folder(request, tmp_path):
  if request.param == "local":
    return str(tmp_path / "f")
  request.getfixturevalue("gcs_emulator")
  return _gs("paths")


def _rows(workdir, kind="train/"):
  """The metric rows of one kind (train/ or eval/: the final-step evaluation shares the file)."""
  rows = [json.loads(line) for line in paths.read_text(paths.join(workdir, "metrics.jsonl"))
          .splitlines() if line.strip()]
  return [r for r in rows if any(k.startswith(kind) for k in r)]


def _event_steps(workdir, tag="train/loss"):
  tb = paths.join(workdir, "tb")
  out = []
  for name in paths.listdir(tb):
    out += [(s, v) for s, t, v in metrics_lib.read_event_scalars(paths.join(tb, name)) if t == tag]
  return out


# -- the path layer --------------------------------------------------------------------------------
def test_paths_read_write_list_on_both_storages(folder):
  p = paths.join(folder, "a", "b.json")
  paths.write_text(p, '{"x": 1}')
  paths.write_bytes(paths.join(folder, "c.bin"), b"\x00\x01")
  assert json.loads(paths.read_text(p)) == {"x": 1}
  assert paths.exists(p) and paths.isfile(p) and paths.isdir(paths.join(folder, "a"))
  assert paths.listdir(folder) == ["a", "c.bin"]  # no temporary file left behind
  assert [os.path.basename(f) for f in paths.walk_files(folder)] == ["b.json", "c.bin"]
  paths.save_npz(paths.join(folder, "d.npz"), x=np.arange(3))
  np.testing.assert_array_equal(paths.load_npz(paths.join(folder, "d.npz"))["x"], np.arange(3))
  paths.remove(p)
  assert not paths.exists(p)


def test_gs_path_without_the_gcp_extra_names_it(tmp_path, monkeypatch):
  """train (the command), sample and load of a gs:// workdir without gcsfs: the error names the
  extra to install, and nothing is written to a local folder named 'gs:'."""
  hide = "import sys; sys.modules['gcsfs'] = None; sys.argv = sys.argv[1:]; import runpy; "
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  r = subprocess.run([sys.executable, "-c", hide + "runpy.run_module('dlm_jax.train', "
                      "run_name='__main__')", "dlm_jax.train", "--workdir=gs://bucket/run",
                      f"--config={ROOT}/configs/mdlm_tiny.py", *TINY_FLAGS],
                     cwd=tmp_path, env=dict(env, PYTHONPATH=ROOT), capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 2, r.stderr[-2000:]
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith("ERROR: gs://bucket/run") and "pip install 'dlm-jax[gcp]'" in last, last
  monkeypatch.setitem(sys.modules, "gcsfs", None)
  monkeypatch.setattr(paths, "_checked_gcs", False)
  monkeypatch.chdir(tmp_path)
  from dlm_jax import sample  # pylint: disable=g-import-not-at-top
  for call in (lambda: api.load("gs://bucket/run"),
               lambda: sample.run_sampling("gs://bucket/run", {}, 2, 0, None)):
    with pytest.raises(paths.MissingExtraError, match=r"\[gcp\] extra .*pip install 'dlm-jax\[gcp\]'"):
      call()
  assert os.listdir(tmp_path) == []  # no './gs:/bucket/run' folder


# -- metrics: one row per step ------------------------------------------------------------------
def test_metric_writer_drops_rows_past_the_restored_step(folder):
  w = metrics_lib.MetricWriter(folder, enabled=True)
  for s in range(1, 7):
    w.write_scalars(s, {"loss": 1.0 / s}, prefix="train/")
  w.flush(force=True)
  del w  # a crash: never closed (on gs:// what was uploaded at the last forced flush stays)
  if not paths.is_remote(folder):  # a row cut short by the crash
    with open(os.path.join(folder, "metrics.jsonl"), "a") as f:
      f.write('{"step": 7, "train/lo')
  w = metrics_lib.MetricWriter(folder, enabled=True, start_step=3)
  for s in range(4, 9):
    w.write_scalars(s, {"loss": 2.0 / s}, prefix="train/")
  w.close()
  assert [r["step"] for r in _rows(folder)] == list(range(1, 9))
  assert [r["train/loss"] for r in _rows(folder)][2:4] == [1.0 / 3, 2.0 / 4]
  events = sorted(_event_steps(folder))
  assert [s for s, _ in events] == list(range(1, 9))
  assert events[3][1] == pytest.approx(0.5)


def test_event_files_decode_like_tensorboardx_writes_them(tmp_path):
  """Oracle: our record framing reads tensorboardX's own SummaryWriter files, and its reader
  (the same framing) reads ours."""
  from tensorboardX import SummaryWriter
  w = SummaryWriter(str(tmp_path / "tbx"))
  for s in range(3):
    w.add_scalar("loss", 1.5 * s, s)
  w.close()
  (name,) = os.listdir(tmp_path / "tbx")
  assert metrics_lib.read_event_scalars(str(tmp_path / "tbx" / name)) == [
      (s, "loss", 1.5 * s) for s in range(3)]
  blob = open(tmp_path / "tbx" / name, "rb").read()
  records, end = metrics_lib.decode_records(blob)
  assert end == len(blob) and b"".join(metrics_lib.encode_record(r) for r in records) == blob


# -- the run's tokenizer ----------------------------------------------------------------------------
def _bpe(tmp_path):
  texts = [f"the {w} of the {v} and the {w}{v}" for w in ("light", "day", "night", "word")
           for v in ("earth", "waters", "heaven")] * 10
  return tokenizers.get_tokenizer("bpe", vocab_size=300, train_texts=texts,
                                  cache_dir=str(tmp_path / "cache"))


def test_tokenizer_files_give_back_the_same_tokenizer(folder, tmp_path):
  bpe = _bpe(tmp_path)
  user_file = str(tmp_path / "user_tokenizer.json")
  bpe.hf_tokenizer.save(user_file)
  for i, tok in enumerate([bpe, tokenizers.get_tokenizer("bytes"), tokenizers.get_tokenizer("gpt2"),
                           arith.arith_tokenizer(), tokenizers.get_tokenizer(f"file:{user_file}")]):
    sub = paths.join(folder, str(i))
    info = tokenizer_store.save(tok, sub)
    back = tokenizer_store.load(sub)
    assert type(back) is type(tok) and back.fingerprint() == tok.fingerprint() == info["fingerprint"]
    assert (back.bos_id, back.eos_id, back.mask_id, back.pad_id) == (
        tok.bos_id, tok.eos_id, tok.mask_id, tok.pad_id)
    text = "the light of the earth" if i != 3 else "12+3"
    assert back.encode(text) == tok.encode(text)
    # Fixed tokenizers are stored by name; only a vocabulary of the run's own is a file.
    assert paths.exists(paths.join(sub, "tokenizer.json")) == (i in (0, 4))
  # A vocabulary file that is not the one recorded (here: another BPE) is refused.
  other = tokenizers.get_tokenizer("bpe", vocab_size=280, train_texts=["other words entirely"] * 50,
                                   cache_dir=str(tmp_path / "cache"))
  paths.write_text(paths.join(folder, "0", "tokenizer.json"), other.hf_tokenizer.to_str())
  with pytest.raises(tokenizer_store.TokenizerFilesError, match="fingerprint"):
    tokenizer_store.load(paths.join(folder, "0"))


def test_a_run_carries_its_tokenizer_when_the_corpus_moves(tmp_path, monkeypatch):
  """Train on a text corpus with a BPE trained on it, move the corpus away: load, sample and
  score never read it again; evaluate (which needs the evaluation split) names data.path."""
  monkeypatch.setenv("DLM_JAX_CACHE", str(tmp_path / "bpe_cache"))
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("\n\n".join(f"In the beginning {i} the light was {i * 7 % 13} and the "
                                f"waters {i % 5} were divided." for i in range(120)))
  wd = str(tmp_path / "run")
  cfg = tiny_config(data__source="text", data__path=str(corpus), data__tokenizer="bpe",
                    data__vocab_size=300, train__num_steps=2, train__ckpt_every=2)
  trainer.train(cfg, wd)
  info = json.load(open(os.path.join(wd, "tokenizer", "tokenizer_info.json")))
  assert info["kind"] == "hf" and info["vocab_size"] == 300
  trained = exp_lib.Experiment.create(cfg).tokenizer

  shutil.move(str(corpus), str(tmp_path / "moved.txt"))
  shutil.rmtree(tmp_path / "bpe_cache")  # nor the tokenizer cache
  run = api.load(wd)
  assert run.tokenizer.fingerprint() == trained.fingerprint() == info["fingerprint"]
  assert len(run.sample_text(num_samples=2)) == 2
  from dlm_jax import score_difficulty  # pylint: disable=g-import-not-at-top
  tok, _, _ = score_difficulty.student_tokenizer(None, wd)
  assert tok.fingerprint() == trained.fingerprint()
  with pytest.raises(ConfigError, match="config.data.path.*does not exist.*evaluation split"):
    evaluation.run_eval(wd, num_batches=1)


def test_a_saved_run_needs_no_data_files_to_open(tmp_path):
  """load/sample validate a saved config without its data files (corpus, tokenizer file);
  training still checks them."""
  cfg = tiny_config(data__source="text", data__path=str(tmp_path / "gone.txt"),
                    data__tokenizer=f"file:{tmp_path / 'gone.json'}")
  exp_lib.validate_config(cfg, check_data=False)
  with pytest.raises(ConfigError, match="config.data.tokenizer: tokenizer file .*gone.json"):
    exp_lib.validate_config(cfg)


def test_save_run_tokenizer_writes_what_load_reads(tmp_path):
  """The function other tools (e.g. an importer of foreign weights) call."""
  wd = str(tmp_path / "imported")
  info = exp_lib.save_run_tokenizer(wd, tokenizers.get_tokenizer("gpt2"))
  assert info["kind"] == "gpt2" and info["vocab_size"] == 50258
  assert exp_lib.run_tokenizer(wd).fingerprint() == info["fingerprint"]


# -- storage faults: a failed upload --------------------------------------------------------------
def _losses(rows):
  return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def test_failed_upload_keeps_the_previous_checkpoint_and_resume_matches(gcs_emulator, tmp_path):
  """The storage answers errors in the middle of the step-4 save: the run stops with a message
  naming step 4 and the intact step 2; after the storage recovers, the resumed run gives the
  losses and parameters of an uninterrupted run, with one metric row per step."""
  cfg = tiny_config(train__num_steps=6, train__ckpt_every=2, train__log_every=1)
  straight = str(tmp_path / "straight")
  trainer.train(cfg, straight)
  wd = _gs("fault")
  gcs_emulator.set_fault(r"/checkpoints/4/", status=503, skip=3)  # 3 objects of step 4 get through
  try:
    with pytest.raises(ckpt_lib.CheckpointSaveError) as e:
      trainer.train(cfg, wd)
  finally:
    gcs_emulator.clear_fault()
  msg = str(e.value)
  assert "step 4" in msg and "previous checkpoint (step 2) is intact" in msg, msg
  ck = ckpt_lib.Checkpointer(wd, async_save=False)
  assert ck.all_steps() == [2]
  ck.close()
  out = trainer.train(cfg, wd)
  assert out["step"] == 6
  got, want = _losses(_rows(wd)), _losses(_rows(straight))
  assert sorted(got) == [r["step"] for r in _rows(wd)] == list(range(1, 7))
  assert [r["step"] for r in _rows(wd, "eval/")] == [6]  # one final evaluation, not one per attempt
  for step in want:
    assert got[step] == pytest.approx(want[step], rel=1e-6), (step, got, want)
  a = jax.device_get(api.load(wd, use_ema=False).params)
  b = jax.device_get(api.load(straight, use_ema=False).params)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
  assert sorted(s for s, _ in _event_steps(wd)) == list(range(1, 7))
  assert not paths.exists(paths.join(wd, "lease.json"))


# -- the whole cycle on gs:// -------------------------------------------------------------------
def _local_files(*dirs):
  return sorted(os.path.join(r, n) for d in dirs for r, _, names in os.walk(d) for n in names)


@pytest.mark.slow
def test_whole_cycle_on_gs_writes_nothing_locally(gcs_emulator, tmp_path):
  """train (a second trainer refused, SIGTERM), resume, evaluate, sample and dlm_jax.load, all
  with --workdir=gs://...; run from an empty folder with HOME, TMPDIR and the caches in empty
  folders, which must stay empty (JAX's compilation cache is the one local write, set apart)."""
  cwd, home, tmp = tmp_path / "cwd", tmp_path / "home", tmp_path / "tmp"
  for d in (cwd, home, tmp):
    d.mkdir()
  env = dict(os.environ, **gcs_emulator.env, HOME=str(home), TMPDIR=str(tmp),
             XDG_CACHE_HOME=str(home / ".cache"), PYTHONDONTWRITEBYTECODE="1",
             JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", PYTHONPATH=ROOT)
  env.pop("DLM_JAX_CACHE", None)
  wd = _gs("cycle") + "/run"
  config = os.path.join(ROOT, "configs", "mdlm_tiny.py")
  train = [sys.executable, "-m", "dlm_jax.train", f"--config={config}", f"--workdir={wd}",
           *TINY_FLAGS, "--config.train.num_steps=100000", "--config.train.log_every=1",
           "--config.train.print_batch=false"]
  run = lambda *a: subprocess.run(a, cwd=cwd, env=env, capture_output=True, text=True,  # noqa: E731
                                  timeout=400)

  first = subprocess.Popen(train, cwd=cwd, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, text=True)
  try:
    for line in first.stdout:
      if line.startswith("step") and int(line.split()[1].split("/")[0]) >= 3:
        break
    second = run(*train)
    assert second.returncode == 2 and "Another trainer holds the workdir" in second.stderr, (
        second.stderr[-2000:])
    first.send_signal(signal.SIGTERM)
    rest = first.communicate(timeout=300)[0]
    assert first.returncode == 0 and "after SIGTERM" in rest, rest[-2000:]
  finally:
    if first.poll() is None:
      first.kill()
  stopped = int([ln for ln in rest.splitlines() if "Saved checkpoint at step" in ln][0].split()[4])

  resumed = run(*train, "--stop_after_steps=3")
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"Resumed from checkpoint step {stopped}." in resumed.stdout
  last = stopped + 3
  ev = run(sys.executable, "-m", "dlm_jax.evaluate", f"--workdir={wd}", "--num_batches=1")
  assert ev.returncode == 0, ev.stderr[-3000:]
  sa = run(sys.executable, "-m", "dlm_jax.sample", f"--workdir={wd}", "--num_samples=2")
  assert sa.returncode == 0, sa.stderr[-3000:]
  lo = run(sys.executable, "-c", f"import dlm_jax; r = dlm_jax.load({wd!r}); "
           "print('LOADED', r.step, len(r.sample_text(num_samples=2)))")
  assert lo.returncode == 0 and f"LOADED {last} 2" in lo.stdout, lo.stderr[-3000:]

  assert _local_files(cwd, home, tmp) == []
  assert not os.path.exists(os.path.join(ROOT, "gs:"))
  names = paths.listdir(wd)
  for want in ("checkpoints", "config.json", "metrics.jsonl", "tb", "tokenizer",
               f"eval_step{last}.json", "samples.jsonl", "samples_summary.json"):
    assert want in names, (want, names)
  assert "lease.json" not in names  # released by the last trainer
  rows = [r["step"] for r in _rows(wd)]
  assert rows == list(range(1, last + 1)), rows
  assert sorted(s for s, _ in _event_steps(wd)) == list(range(1, last + 1))
  assert json.loads(paths.read_text(paths.join(wd, f"eval_step{last}.json")))["step"] == last


@pytest.mark.slow
def test_score_difficulty_and_sft_on_gs(gcs_emulator):
  """A teacher run, a scored SFT set (resumed from its partial file) and a fine-tuning run that
  reads it: all on gs://."""
  from configs import arith_pretrain, arith_teacher  # pylint: disable=g-import-not-at-top
  from dlm_jax import score_difficulty  # pylint: disable=g-import-not-at-top
  from dlm_jax.data.tasks import sft  # pylint: disable=g-import-not-at-top
  from tests.tiny import apply_overrides  # pylint: disable=g-import-not-at-top
  shrink = dict(model__num_layers=1, model__d_model=32, model__num_heads=2,
                train__global_batch_size=8, train__num_steps=2, train__log_every=1,
                train__ckpt_every=2, train__print_batch=False, data__prefetch=0,
                optim__warmup_steps=1)
  base = _gs("scoring")
  teacher = base + "/teacher"
  trainer.train(apply_overrides(arith_teacher.get_config(), **shrink), teacher)
  out = base + "/sets/scored.npz"
  kw = dict(num_buckets=4, batch_size=8, save_every=8, progress=False)
  assert score_difficulty.run(teacher, "arith:seed=5,n=24", out, stop_after=8, **kw) is None
  assert paths.exists(sft.partial_path(out)) and not paths.exists(out)
  summary = score_difficulty.run(teacher, "arith:seed=5,n=24", out, **kw)
  assert summary["num_examples"] == 24 and summary["teacher_workdir"] == teacher
  assert not paths.exists(sft.partial_path(out))
  assert json.loads(paths.read_text(base + "/sets/scored.json"))["out"] == out
  data = sft.load_sft_set(out)
  assert data["buckets"].shape == data["response"].shape == (24, data["response"].shape[1])
  student = apply_overrides(arith_pretrain.get_config(), **shrink, data__path=out,
                            trims__masking="trims", trims__num_buckets=4)
  assert trainer.train(student, base + "/student")["step"] == 2
