"""Two real processes joined by jax.distributed over 127.0.0.1 (CPU collectives).

The two-process run trains, checkpoints, resumes and stops on a SIGTERM sent to one process only;
its losses must equal those of one process that sees the same global batches.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from dlm_jax.run import checkpoint as ckpt_lib
from dlm_jax.run import experiment as exp_lib
from dlm_jax.run import trainer
from tests.tiny import TINY_FLAGS, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 200  # the schedule's length; runs stop early with --stop_after_steps or SIGTERM


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(cache_dir):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1",
             # The second and third launches reuse the first one's compiled step.
             JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return env


def _launch(workdir, cache_dir, log_dir, extra=()):
  """Starts processes 0 and 1 of `dlm_jax.train`; returns the Popen objects."""
  port = _free_port()
  procs = []
  for pid in range(2):
    log = open(os.path.join(log_dir, f"p{pid}_{time.time_ns()}.log"), "w")
    cmd = [sys.executable, "-m", "dlm_jax.train", "--config=configs/mdlm_tiny.py",
           f"--workdir={workdir}", f"--coordinator_address=127.0.0.1:{port}",
           "--num_processes=2", f"--process_id={pid}", *TINY_FLAGS,
           f"--config.train.num_steps={NUM_STEPS}", "--config.train.log_every=1",
           "--config.train.print_batch=false", *extra]
    procs.append(subprocess.Popen(cmd, cwd=ROOT, env=_env(cache_dir), stdout=log,
                                  stderr=subprocess.STDOUT, text=True))
    procs[-1].log_path = log.name
  return procs


def _wait(procs, timeout=300):
  deadline = time.time() + timeout
  try:
    for p in procs:
      p.wait(timeout=max(deadline - time.time(), 1))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  logs = [open(p.log_path).read() for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  return logs


def _losses(workdir):
  """step -> loss, from metrics.jsonl (the last record of a step wins)."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      rec = json.loads(line)
      if "train/loss" in rec:
        out[rec["step"]] = rec["train/loss"]
  return out


class _TwoShards:
  """One process's view of what two processes read: shard 0's rows, then shard 1's."""

  def __init__(self, config, tokenizer):
    from dlm_jax.data import pipeline, sources
    src = sources.get(config.data.source).documents(config, config.data.train_split)
    d = config.data
    self._its = [pipeline.make_lm_iterator(
        src, tokenizer, seq_len=d.seq_len, global_batch_size=config.train.global_batch_size,
        process_index=i, process_count=2, seed=config.seed, shuffle=d.shuffle, packing=d.packing)
        for i in range(2)]

  def __next__(self):
    parts = [next(it) for it in self._its]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def get_state(self):
    return [it.get_state() for it in self._its]

  def set_state(self, state):
    for it, st in zip(self._its, state):
      it.set_state(st)


def _sigterm_one_process_when(procs, marker, timeout=240):
  """Sends SIGTERM to process 1 only, once process 0 has logged `marker` (both are then training)."""
  deadline = time.time() + timeout
  while time.time() < deadline and procs[0].poll() is None:
    with open(procs[0].log_path) as f:
      if marker in f.read():
        break
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGTERM)  # e.g. a maintenance event on one host only


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
  """Launch 1: steps 1-2, checkpoint, exit. Launch 2: restore on every process, train on until a
  SIGTERM reaches process 1 alone; both processes then stop at the same step with a checkpoint."""
  base = tmp_path_factory.mktemp("mp")
  wd, cache, logs = str(base / "run"), base / "cache", str(base)
  t0 = time.time()
  _wait(_launch(wd, cache, logs, ["--stop_after_steps=2"]))
  first = _losses(wd)
  procs = _launch(wd, cache, logs)
  _sigterm_one_process_when(procs, "step       4/")
  log0, log1 = _wait(procs)
  ck = ckpt_lib.Checkpointer(wd)
  steps = ck.all_steps()
  ck.close()
  print(f"two launches took {time.time() - t0:.0f} s")
  return dict(workdir=wd, first=first, log0=log0, log1=log1, steps=steps)


def test_two_processes_match_one_process(two_process_run, tmp_path, monkeypatch):
  wd, last = two_process_run["workdir"], two_process_run["steps"][-1]
  got = _losses(wd)
  assert sorted(got) == list(range(1, last + 1)), got
  # Only process 0 writes metrics: one record per step (steps 1-2 were not re-run on resume).
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    assert len(f.readlines()) == last
  assert two_process_run["first"] == {k: got[k] for k in (1, 2)}
  assert "Resumed from checkpoint step 2." in two_process_run["log0"]
  assert os.path.exists(os.path.join(wd, "config.json"))
  # Every process wrote its own data-iterator state into the shared checkpoint.
  data_dir = os.path.join(ckpt_lib.checkpoint_dir(wd), str(last), "data")
  assert sorted(f for f in os.listdir(data_dir) if f.startswith("process_")) == [
      "process_0-of-2.json", "process_1-of-2.json"]

  # One process, 2 devices, reading both shards: the same global batches.
  monkeypatch.setattr(exp_lib, "make_train_iterator", _TwoShards)
  ref_wd = str(tmp_path / "ref")
  cfg = tiny_config(train__num_steps=NUM_STEPS, train__log_every=1, train__ckpt_every=1000)
  trainer.train(cfg, ref_wd, stop_after_steps=last, devices=jax.devices()[:2])
  ref = _losses(ref_wd)
  assert sorted(ref) == sorted(got)
  for step in ref:
    assert got[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-6), (step, got, ref)
  # The losses differ from step to step, so matching them is not a coincidence.
  assert len({round(v, 4) for v in ref.values()}) == len(ref)

  # The two-process checkpoint opens in this single process and holds the same parameters.
  from dlm_jax.run import api
  a = jax.device_get(api.load(wd, use_ema=False).params)
  b = jax.device_get(api.load(ref_wd, use_ema=False).params)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


def test_sigterm_to_one_process_stops_both_at_the_same_step(two_process_run):
  last = two_process_run["steps"][-1]
  # Both stop at the same synchronisation point, well before the end of the schedule.
  assert last % trainer.SIGNAL_SYNC_EVERY == 0 and 2 < last < NUM_STEPS, two_process_run["steps"]
  assert f"Stopping at step {last} after SIGTERM" in two_process_run["log0"]
  assert f"Stopping at step {last} after SIGTERM" in two_process_run["log1"]
  # Process 0 did not receive the signal but reports the stop; process 1 prints nothing.
  assert f"Saved checkpoint at step {last} after SIGTERM" in two_process_run["log0"]
  assert "Saved checkpoint at step" not in two_process_run["log1"]
