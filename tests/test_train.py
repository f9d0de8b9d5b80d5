"""The train loop: sharding equivalence, exact resume, corrupt checkpoints, NaN policy."""

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlm_jax.run import api
from dlm_jax.run import checkpoint as ckpt_lib
from dlm_jax.run import experiment as exp_lib
from dlm_jax import parallel
from dlm_jax.run import trainer
from dlm_jax.methods import mdlm as mdlm_method
from tests.tiny import tiny_config


def _mesh(n, data, fsdp, tensor=1):
  import ml_collections
  cfg = ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor))
  return parallel.make_mesh(cfg, jax.devices()[:n])


def _batch(exp, seed=0):
  it = exp_lib.make_train_iterator(exp.config, exp.tokenizer)
  local = next(it)
  return {k: np.asarray(v) for k, v in local.items()}


def _loss_and_grads(exp, batch_np):
  batch = parallel.global_batch_from_local(batch_np, exp.mesh)
  batch["example_id"] = jnp.arange(batch_np["tokens"].shape[0])
  state = exp.init_state(0)

  def f(params, batch):
    return exp.method.train_loss(params, batch, jax.random.key(5), train=True)

  grad_fn = jax.jit(jax.value_and_grad(f, has_aux=True),
                    out_shardings=(parallel.replicated(exp.mesh), parallel.replicated(exp.mesh)))
  (loss, aux), grads = parallel.in_sharding_context(grad_fn, exp.mesh)(state.params, batch)
  if "dense_head" in aux:  # the masked-only head ran (not its dense fallback)
    assert float(aux["dense_head"]) == 0.0
  return float(loss), jax.device_get(grads)


# A budget of 3/4 of each device's tokens forces the masked-only fused output head
# (models/output_head.py), which selects per device: B L = 256 on 1 device, 64 per device of 4.
# (5/8 overflowed on a device of this batch; before the head's chunks were sized per path the
# budget was rounded up to all 64 rows, so the dense head ran and this test checked nothing.)
@pytest.mark.parametrize("shape,budget", [((2, 4, 1), None), ((4, 1, 2), None), ((2, 2, 2), 3 / 4)])
def test_loss_and_grads_same_on_1_and_8_devices(shape, budget, monkeypatch):
  if budget is not None:
    from dlm_jax.methods import mdlm as mdlm_method  # pylint: disable=g-import-not-at-top
    monkeypatch.setattr(mdlm_method, "head_budget",
                        lambda b, length, *_, **__: int(budget * b * length))
  cfg = tiny_config()
  exp1 = exp_lib.Experiment.create(cfg, mesh=_mesh(1, 1, 1))
  exp8 = exp_lib.Experiment.create(cfg, mesh=_mesh(8, *shape), tokenizer=exp1.tokenizer)
  batch = _batch(exp1)
  l1, g1 = _loss_and_grads(exp1, batch)
  l8, g8 = _loss_and_grads(exp8, batch)
  assert l1 == pytest.approx(l8, rel=1e-5)
  flat1, flat8 = jax.tree.leaves(g1), jax.tree.leaves(g8)
  assert len(flat1) == len(flat8)
  for a, b in zip(flat1, flat8):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)
  # The params really are split over the 8-device mesh (fsdp and/or tensor axes).
  abstract = exp8.abstract_state().params
  assert any(x.sharding.shard_shape(x.shape) != x.shape for x in jax.tree.leaves(abstract))


def _params(workdir):
  run = api.load(workdir, use_ema=False)
  return run.step, jax.device_get(run.params)


def test_resume_gives_identical_parameters(tmp_path):
  cfg = tiny_config()
  straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
  trainer.train(cfg, straight)
  trainer.train(cfg, split, stop_after_steps=3)
  assert _params(split)[0] == 3
  trainer.train(cfg, split)  # resumes at 3, runs to 6
  s1, p1 = _params(straight)
  s2, p2 = _params(split)
  assert s1 == s2 == 6
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def _corrupt(workdir, step):
  files = [f for f in glob.glob(os.path.join(ckpt_lib.checkpoint_dir(workdir), str(step), "state",
                                             "**", "*"), recursive=True) if os.path.isfile(f)]
  assert files
  for f in files:
    with open(f, "r+b") as fh:
      size = os.path.getsize(f)
      fh.truncate(max(size // 3, 1))
      fh.seek(0)
      fh.write(b"\x00garbage\xff" * 4)


def test_corrupt_latest_checkpoint_falls_back(tmp_path, caplog):
  cfg = tiny_config()
  wd = str(tmp_path / "run")
  trainer.train(cfg, wd)  # checkpoints at 3 and 6
  _corrupt(wd, 6)
  step, _ = _params(wd)
  assert step == 3
  assert "corrupt" in caplog.text or "unreadable" in caplog.text
  # Training resumes from the good one and finishes; the unreadable step 6 is moved aside (not
  # deleted) so that this run can save its own step 6.
  out = trainer.train(tiny_config(train__num_steps=8), wd)
  assert out["step"] == 8
  assert os.listdir(os.path.join(wd, "checkpoints_unreadable"))[0].startswith("6.")


def test_incompatible_checkpoint_is_refused(tmp_path):
  wd = str(tmp_path / "run")
  trainer.train(tiny_config(train__num_steps=2, train__ckpt_every=2), wd)
  with pytest.raises(ckpt_lib.CheckpointError, match="config.model.d_model"):
    trainer.train(tiny_config(train__num_steps=4, model__d_model=64), wd)


class _NaNAfter:
  """Patches MDLM.train_loss to return NaN when the step's batch starts at example >= n."""

  def __init__(self, monkeypatch, first_bad_example):
    orig = mdlm_method.MDLM.train_loss

    def patched(self, params, batch, key, train=True):
      loss, m = orig(self, params, batch, key, train)
      bad = batch["example_id"][0] >= first_bad_example
      return jnp.where(bad, jnp.nan, loss), m

    monkeypatch.setattr(mdlm_method.MDLM, "train_loss", patched)


def test_nan_stop_keeps_last_good_checkpoint(tmp_path, monkeypatch):
  wd = str(tmp_path / "run")
  cfg = tiny_config(train__num_steps=6, train__ckpt_every=2)
  _NaNAfter(monkeypatch, first_bad_example=3 * 8)  # steps 4.. are NaN
  with pytest.raises(trainer.NonFiniteLossError, match="nan_policy"):
    trainer.train(cfg, wd)
  ck = ckpt_lib.Checkpointer(wd)
  assert ck.latest_step() == 2
  ck.close()


def test_nan_skip_continues_without_applying(tmp_path, monkeypatch):
  wd = str(tmp_path / "run")
  cfg = tiny_config(train__num_steps=4, train__ckpt_every=4, train__nan_policy="skip",
                    optim__ema_decay=0.0)
  _NaNAfter(monkeypatch, first_bad_example=0)  # every step NaN
  out = trainer.train(cfg, wd)
  assert out["step"] == 4
  exp = exp_lib.Experiment.create(cfg)
  init = jax.device_get(exp.init_state(cfg.seed).params)
  _, params = _params(wd)
  for a, b in zip(jax.tree.leaves(init), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)


def test_progress_counts_the_tokens_the_network_processed(monkeypatch):
  """tok/s is batch x seq_len by default and the method's `model_tokens` when it reports one."""
  import io  # pylint: disable=g-import-not-at-top
  from dlm_jax import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  clock = iter([0.0, 2.0, 4.0])
  monkeypatch.setattr(metrics_lib.time, "perf_counter", lambda: next(clock))
  p = metrics_lib.Progress(total_steps=30, start_step=0, tokens_per_step=100, stream=io.StringIO(),
                           enabled=True)
  r = p.rates(10)  # 10 steps in 2 s
  assert r["tokens_per_sec"] == pytest.approx(500.0) and r["eta_sec"] == pytest.approx(4.0)
  r = p.rates(20, tokens_per_step=60.0)  # e.g. DID's packed rows
  assert r["tokens_per_sec"] == pytest.approx(300.0)
  assert "tok/s 300" in p.line(20, {"loss": 1.0}, r)
