"""The real entry points, run as a user would: train, evaluate, sample, SIGTERM, notebook."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.tiny import TINY_FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, timeout=300, **kw):
  return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout, **kw)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("entry") / "run")
  r = _run(["dlm_jax.train", "--config=configs/mdlm_tiny.py", f"--workdir={wd}",
            "--config.train.num_steps=4", *TINY_FLAGS])
  assert r.returncode == 0, r.stderr[-3000:]
  assert "step       4/4" in r.stdout and "tok/s" in r.stdout and "ETA" in r.stdout
  assert "First batch" in r.stdout
  return wd


def test_train_writes_checkpoints_and_metrics(trained):
  assert sorted(os.listdir(os.path.join(trained, "checkpoints"))) == ["2", "4"]
  assert os.path.exists(os.path.join(trained, "config.json"))
  assert any(f.startswith("events") for f in os.listdir(os.path.join(trained, "tb")))
  lines = [json.loads(l) for l in open(os.path.join(trained, "metrics.jsonl"))]
  keys = set([l for l in lines if "train/loss" in l][-1])  # eval/ records share the file
  for k in ("train/loss", "train/bits_per_token", "train/lr", "train/grad_norm",
            "train/tokens_per_sec"):
    assert k in keys


def test_evaluate_writes_json(trained):
  r = _run(["dlm_jax.evaluate", f"--workdir={trained}", "--num_batches=2", "--num_t=2"])
  assert r.returncode == 0, r.stderr[-3000:]
  res = json.load(open(os.path.join(trained, "eval_step4.json")))
  assert res["num_t"] == 2 and res["tokens"] > 0
  assert 0 < res["nelbo_nats_per_token"] < 10 and res["perplexity_bound"] > 1


@pytest.mark.parametrize("decoder", ["ancestral", "threshold"])
def test_sample_writes_jsonl(trained, tmp_path, decoder):
  out = str(tmp_path / decoder)
  extra = ["--set", "r2=conf,token,stability"] if decoder == "threshold" else []
  r = _run(["dlm_jax.sample", f"--workdir={trained}", "--num_samples=3", f"--out_dir={out}",
            "--set", f"decoder={decoder}", "--set", "batch_size=2", *extra])
  assert r.returncode == 0, r.stderr[-3000:]
  recs = [json.loads(l) for l in open(os.path.join(out, "samples.jsonl"))]
  assert len(recs) == 3 and all(r["nfe"] >= 1 for r in recs)
  summary = json.load(open(os.path.join(out, "samples_summary.json")))
  assert summary["decoder"] == decoder and summary["tokens_per_forward"] > 0
  assert "--- sample 0 ---" in r.stdout


def test_sample_bad_tau_is_refused(trained, tmp_path):
  r = _run(["dlm_jax.sample", f"--workdir={trained}", "--set", "decoder=threshold",
            "--set", "tau=1.5", f"--out_dir={tmp_path}"])
  assert r.returncode == 2 and "tau" in r.stderr


def test_unknown_flag_and_wrong_type(tmp_path):
  r = _run(["dlm_jax.train", "--config=configs/mdlm_tiny.py", f"--workdir={tmp_path}",
            "--config.optim.learning_rate=1e-3"])
  assert r.returncode != 0 and "learning_rate" in r.stderr
  r = _run(["dlm_jax.train", "--config=configs/mdlm_tiny.py", f"--workdir={tmp_path}",
            "--config.optim.lr=fast"])
  assert r.returncode != 0 and "lr" in r.stderr


def test_paper_config_without_data_says_how_to_prepare(tmp_path):
  r = _run(["dlm_jax.train", "--config=configs/mdlm_owt.py", f"--workdir={tmp_path / 'w'}",
            f"--config.data.tfds_data_dir={tmp_path / 'tfds'}"])
  assert r.returncode == 2, r.stderr[-2000:]
  assert "dlm_jax.prepare" in r.stderr
  assert not os.path.exists(tmp_path / "w" / "checkpoints" / "0")

  # With the data prepared (here from 40 small local files, as a user would from the OWT dump),
  # the same paper config starts and trains: GPT-2 BPE, the OWT ArrayRecords through TFDS.
  # Only the model and batch are shrunk, so the step fits a test's budget.
  src = tmp_path / "owt_src"
  src.mkdir()
  for i in range(40):
    (src / f"doc{i:02d}.txt").write_text(f"Document {i} of a small web corpus. " * (3 + i % 5))
  prep = _run(["dlm_jax.prepare", "--dataset=openwebtext", f"--source_dir={src}",
               f"--data_dir={tmp_path / 'tfds'}"])
  assert prep.returncode == 0, prep.stderr[-2000:]
  r = _run(["dlm_jax.train", "--config=configs/mdlm_owt.py", f"--workdir={tmp_path / 'w'}",
            f"--config.data.tfds_data_dir={tmp_path / 'tfds'}", "--config.model.num_layers=1",
            "--config.model.d_model=32", "--config.model.num_heads=2", "--config.data.seq_len=64",
            "--config.model.max_len=64", "--config.train.global_batch_size=8",
            "--config.train.num_steps=2", "--config.train.log_every=1",
            "--config.train.ckpt_every=2", "--config.train.eval_every=2",
            "--config.train.eval_batches=1", "--config.data.prefetch=0"])
  assert r.returncode == 0, r.stderr[-3000:]
  assert "step       2/2" in r.stdout, r.stdout[-2000:]
  assert os.path.exists(tmp_path / "w" / "checkpoints" / "2")
  cfg = json.load(open(tmp_path / "w" / "config.json"))
  assert cfg["data"]["tokenizer"] == "gpt2" and cfg["data"]["tfds_name"] == "openwebtext_local"


def test_sigterm_saves_and_exits_cleanly(tmp_path):
  wd = str(tmp_path / "run")
  proc = subprocess.Popen(
      [sys.executable, "-m", "dlm_jax.train", "--config=configs/mdlm_tiny.py", f"--workdir={wd}",
       *TINY_FLAGS, "--config.train.num_steps=100000", "--config.train.log_every=1",
       "--config.train.ckpt_every=100000"],
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 240
  for line in proc.stdout:
    if line.startswith("step") and time.time() < deadline:
      break
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  assert "after SIGTERM" in out
  steps = [int(s) for s in os.listdir(os.path.join(wd, "checkpoints")) if s.isdigit()]
  assert steps and steps[0] >= 1


def test_notebook_runs(trained):
  import nbformat
  nb = nbformat.read(os.path.join(ROOT, "notebooks", "quickstart.ipynb"), as_version=4)
  code = [c.source for c in nb.cells if c.cell_type == "code"]
  assert code, "the notebook has no code"
  ns = {"__name__": "__notebook__"}
  exec(f"WORKDIR = {trained!r}", ns)  # the first cell reads WORKDIR from the env or a default
  os.environ["DLM_JAX_WORKDIR"] = trained
  try:
    for src in code:
      exec(compile(src, "quickstart.ipynb", "exec"), ns)
  finally:
    os.environ.pop("DLM_JAX_WORKDIR")
  assert ns["run"].step == 4
  assert len(ns["texts"]) == 2 and all(isinstance(t, str) for t in ns["texts"])
  assert ns["losses"].shape == (2,)
