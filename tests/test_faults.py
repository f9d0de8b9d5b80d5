"""Faults: kill -9 and restart, disk full while saving, truncated checkpoints, other meshes."""

import errno
import glob
import json
import os
import random
import shutil
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from dlm_jax import metrics as metrics_lib
from dlm_jax.run import api
from dlm_jax.run import checkpoint as ckpt_lib
from dlm_jax.run import experiment as exp_lib
from dlm_jax import parallel
from dlm_jax.run import trainer
from tests.tiny import TINY_FLAGS, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _losses(workdir):
  """step -> [every logged loss of that step] (one each, however often the run restarted)."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      rec = json.loads(line)
      if "train/loss" in rec:  # eval/ records share the file
        out.setdefault(rec["step"], []).append(rec["train/loss"])
  return out


def _params(workdir, step=None, devices=None):
  run = api.load(workdir, step=step, use_ema=False, devices=devices)
  return run, jax.device_get(run.params)


def _assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


# -- kill -9 at a random step, then restart ---------------------------------------------------------
def _train_cmd(workdir, *extra):
  return [sys.executable, "-m", "dlm_jax.train", "--config=configs/mdlm_tiny.py",
          f"--workdir={workdir}", *TINY_FLAGS, "--config.train.num_steps=16",
          "--config.train.log_every=1", "--config.train.print_batch=false",
          "--config.data.prefetch=2", *extra]


# The kill step is drawn from a seed, so a failure repeats: DLM_JAX_FAULT_SEED=<seed> re-runs it.
FAULT_SEED = int(os.environ.get("DLM_JAX_FAULT_SEED", "18"))


def test_kill_9_then_restart_gives_the_uninterrupted_losses(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / "cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  run = lambda *a: subprocess.run(a, cwd=ROOT, env=env, capture_output=True, text=True,  # noqa: E731
                                  timeout=400)
  straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
  r = run(*_train_cmd(straight, "--config.train.ckpt_every=1000"))
  assert r.returncode == 0, r.stderr[-3000:]

  kill_at = random.Random(FAULT_SEED).randint(3, 10)
  why = f"kill_at={kill_at}, DLM_JAX_FAULT_SEED={FAULT_SEED}"
  proc = subprocess.Popen(_train_cmd(killed, "--config.train.ckpt_every=1"), cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  ckdir = ckpt_lib.checkpoint_dir(killed)
  deadline = time.time() + 300
  for line in proc.stdout:
    if not line.startswith("step") or time.time() > deadline:
      continue
    step = int(line.split()[1].split("/")[0])
    done = [d for d in os.listdir(ckdir) if d.isdigit()] if os.path.isdir(ckdir) else []
    if step >= kill_at and done:  # at least one finished checkpoint to come back to
      break
  proc.kill()  # SIGKILL: no handler runs, an async save may be half written
  proc.wait(timeout=60)
  assert proc.returncode == -9, f"the run ended before the kill ({why})"

  r = run(*_train_cmd(killed, "--config.train.ckpt_every=1"))
  assert r.returncode == 0, r.stderr[-3000:]
  assert "Resumed from checkpoint step" in r.stdout

  want, got = _losses(straight), _losses(killed)
  assert sorted(got) == sorted(want) == list(range(1, 17)), why
  for step, values in got.items():
    # One row per step: the rows the killed run logged past its last checkpoint were dropped.
    assert values == want[step], (why, step, values, want[step])
  # The TensorBoard events too: each step once, with the uninterrupted run's loss.
  events = []
  for name in os.listdir(os.path.join(killed, "tb")):
    events += [(st, v) for st, tag, v in metrics_lib.read_event_scalars(
        os.path.join(killed, "tb", name)) if tag == "train/loss"]
  assert sorted(st for st, _ in events) == list(range(1, 17)), (why, sorted(events))
  for st, v in events:
    assert v == pytest.approx(want[st][0], rel=1e-6), (why, st)
  _assert_trees_close(_params(straight)[1], _params(killed)[1], rtol=0, atol=0)

  # A truncated newest checkpoint (its array data gone) is detected; the one before is used.
  newest = ckpt_lib.Checkpointer(killed, async_save=False)
  steps = newest.all_steps()
  newest.close()
  for f in glob.glob(os.path.join(ckdir, str(steps[-1]), "state", "**", "*"), recursive=True):
    if os.path.isfile(f) and not f.endswith("_METADATA"):
      os.truncate(f, 0)
  loaded, _ = _params(killed)
  assert loaded.step == steps[-2]


# -- disk full while saving ---------------------------------------------------------------------
def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
  wd = str(tmp_path / "run")
  cfg = tiny_config(train__num_steps=4, train__ckpt_every=2, train__log_every=1)
  straight = str(tmp_path / "straight")
  trainer.train(cfg, straight)
  orig = ocp.handlers.JsonCheckpointHandler._save_fn  # pylint: disable=protected-access

  async def full_disk(self, x, directory):
    if "4.orbax-checkpoint-tmp" in str(directory):  # the arrays of step 4 are written already
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
    return await orig(self, x, directory)

  monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, "_save_fn", full_disk)
  with pytest.raises(ckpt_lib.CheckpointSaveError) as e:
    trainer.train(cfg, wd)
  msg = str(e.value)
  assert "step 4" in msg and "No space left on device" in msg, msg
  assert "previous checkpoint (step 2) is intact" in msg, msg
  monkeypatch.undo()

  ck = ckpt_lib.Checkpointer(wd, async_save=False)
  assert ck.all_steps() == [2]
  ck.close()
  assert _params(wd)[0].step == 2
  out = trainer.train(cfg, wd)  # space is back: resume from 2 and finish
  assert out["step"] == 4
  # The losses of an uninterrupted run, one metric row per step.
  assert _losses(wd) == _losses(straight) and sorted(_losses(wd)) == [1, 2, 3, 4]
  _assert_trees_close(_params(straight)[1], _params(wd)[1], rtol=0, atol=0)


# -- another mesh, another device count ---------------------------------------------------------
def test_checkpoint_restores_on_4_and_1_devices_and_resumes_on_4(tmp_path):
  mesh8 = ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=2))
  cfg8 = tiny_config(train__num_steps=4, train__ckpt_every=2, train__log_every=1)
  cfg8.mesh.update(mesh8)
  wd8 = str(tmp_path / "on8")
  trainer.train(cfg8, wd8)
  run8, p8 = _params(wd8)
  # The run really was sharded over fsdp and tensor.
  shardings = [x.sharding for x in jax.tree.leaves(exp_lib.Experiment.create(
      cfg8).abstract_state().params)]
  assert any("fsdp" in str(s.spec) for s in shardings) and any("tensor" in str(s.spec)
                                                               for s in shardings)

  for n in (4, 1):
    run, p = _params(wd8, devices=jax.devices()[:n])
    assert run.step == 4 and run.mesh.devices.size == n
    assert {d for x in jax.tree.leaves(run.params) for d in x.devices()} <= set(jax.devices()[:n])
    _assert_trees_close(p8, p, rtol=0, atol=0)
  del run8

  # Resume step 2 -> 4 on a 4-device mesh of another shape: same losses and parameters.
  wd4 = str(tmp_path / "on4")
  shutil.copytree(wd8, wd4)
  shutil.rmtree(os.path.join(ckpt_lib.checkpoint_dir(wd4), "4"))
  cfg4 = tiny_config(train__num_steps=4, train__ckpt_every=2, train__log_every=1)
  cfg4.mesh.update(dict(data=1, fsdp=2, tensor=2))
  trainer.train(cfg4, wd4, devices=jax.devices()[:4])
  l8, l4 = _losses(wd8), _losses(wd4)
  for step in (3, 4):
    assert l4[step][-1] == pytest.approx(l8[step][-1], rel=1e-5)
  _assert_trees_close(p8, _params(wd4)[1], rtol=1e-4, atol=1e-6)
  assert parallel.data_parallel_size(parallel.make_mesh(cfg4.mesh, jax.devices()[:4])) == 2
