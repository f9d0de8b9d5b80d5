"""Paper-scale conveniences: gradient accumulation, EMA warm-up, checkpoint retention, final eval.

The accumulation oracle is the undivided batch: k micro-batches must give its loss, gradient and
optimizer update. That holds only if every random draw of a row is the one it gets in the whole
batch: per-example keys come from global example ids, and the stratified times (MDLM) and the
antithetic pairs' strata (DID) from the row's place in the update's batch (`row_index`). With
data.packing='pad' the micro-batches hold different numbers of tokens, so the loss weights
(metrics['loss_weight']) matter too.
"""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dlm_jax import config as config_lib
from dlm_jax import parallel
from dlm_jax.run import api
from dlm_jax.run import experiment as exp_lib
from dlm_jax.run import trainer
from tests.tiny import tiny_config


def _mesh4():
  cfg = ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=1))
  return parallel.make_mesh(cfg, jax.devices()[:4])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """Short documents of varied length: with data.packing='pad' every row has its own length."""
  rng = np.random.default_rng(0)
  words = "in the beginning god created heaven and earth light was good".split()
  docs = [" ".join(rng.choice(words, size=int(rng.integers(1, 6)))) for _ in range(400)]
  path = tmp_path_factory.mktemp("corpus") / "docs.txt"
  path.write_text("\n\n".join(docs))
  return str(path)


def _config(method: str, k: int, corpus: str):
  # optim.eps = 1e-3: Adam's first update is then a smooth function of the gradient, so
  # comparing parameters checks the gradient's values (with eps = 1e-8 the update is about
  # lr * sign(g) and would hide a wrongly weighted micro-batch).
  c = tiny_config(train__global_batch_size=16, data__source="text", data__path=corpus,
                  data__packing="pad", optim__grad_accum_steps=k,
                  optim__lr=1e-2, optim__warmup_steps=0, optim__eps=1e-3, optim__ema_decay=0.5)
  if method == "did":
    c.method = "did"
    c.model.time_conditioning = True  # did.variant='variable' (DISE, count head), packed pairs
  return c


def _batch(exp):
  it = exp_lib.make_train_iterator(exp.config, exp.tokenizer)
  local = {k: np.asarray(v) for k, v in next(it).items()}
  return parallel.global_batch_from_local(local, exp.mesh)


def _max_rel_err(a, b):
  errs = [float(jnp.max(jnp.abs(x - y)) / (jnp.max(jnp.abs(x)) + 1e-30))
          for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]
  return max(errs)


@pytest.mark.parametrize("method,k", [("mdlm", 4), ("did", 2)])
def test_k_micro_batches_give_the_update_of_one_batch_k_times_larger(method, k, corpus):
  mesh = _mesh4()
  whole = exp_lib.Experiment.create(_config(method, 1, corpus), mesh=mesh)
  accum = exp_lib.Experiment.create(_config(method, k, corpus), mesh=mesh,
                                    tokenizer=whole.tokenizer)
  batch = _batch(whole)
  # The micro-batches differ in token count, so their weights matter.
  seg = np.asarray(batch["segment_ids"]) > 0
  split = np.asarray(trainer.micro_batches({"tokens": jnp.asarray(seg)}, k)["tokens"])
  assert len({int(m.sum()) for m in split}) > 1

  # The loss and its gradient, before the optimizer.
  key = jax.random.key(3)
  ids = dict(batch, example_id=jnp.arange(16))

  def grads(exp):
    fn = jax.jit(lambda p, b: trainer._loss_and_grads(exp, p, b, key))  # pylint: disable=protected-access
    return parallel.in_sharding_context(fn, exp.mesh)(exp.init_state(0).params, ids)

  l1, m1, g1 = grads(whole)
  lk, mk, gk = grads(accum)
  assert float(lk) == pytest.approx(float(l1), rel=1e-6)
  for name in set(m1) & set(mk) - {"dense_head"}:
    assert float(mk[name]) == pytest.approx(float(m1[name]), rel=1e-5, abs=1e-6), name
  assert _max_rel_err(g1, gk) < 1e-5

  # One optimizer update through the jitted train step: parameters, EMA, optimizer state and
  # step counter of the whole batch.
  step1, stepk = trainer.compile_steps(whole)[0], trainer.compile_steps(accum)[0]
  s1, n1 = step1(whole.init_state(0), batch, jax.random.key(0))
  sk, nk = stepk(accum.init_state(0), batch, jax.random.key(0))
  assert int(s1.step) == int(sk.step) == 1
  for a, b in zip(jax.tree.leaves((s1.params, s1.ema_params, s1.opt_state)),
                  jax.tree.leaves((sk.params, sk.ema_params, sk.opt_state))):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
  for name in ("loss", "grad_norm", "update_norm", "lr"):
    assert float(nk[name]) == pytest.approx(float(n1[name]), rel=1e-5), name
  if method == "did":  # counts of the batch are summed over micro-batches, not averaged
    assert float(nk["model_tokens"]) == float(n1["model_tokens"])


def test_micro_batches_are_strided_groups():
  x = jnp.arange(16)
  got = trainer.micro_batches({"tokens": x}, 4)
  np.testing.assert_array_equal(got["tokens"][1], [1, 5, 9, 13])
  np.testing.assert_array_equal(got["row_index"], got["tokens"])
  pairs = trainer.micro_batches({"tokens": x}, 2, group=2)["tokens"]
  np.testing.assert_array_equal(pairs[1], [2, 3, 6, 7, 10, 11, 14, 15])


def test_ema_warmup_follows_its_closed_form():
  decay = 0.999
  for n in (0, 1, 5, 100, 10_000):
    assert float(trainer.ema_decay_at(decay, True, n)) == pytest.approx(
        min(decay, (1 + n) / (10 + n)), rel=1e-6)
    assert float(trainer.ema_decay_at(decay, False, n)) == pytest.approx(decay)
  cfg = tiny_config(optim__ema_decay=decay, optim__ema_warmup=True)
  exp = exp_lib.Experiment.create(cfg, mesh=parallel.make_mesh(
      ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1)), jax.devices()[:1]))
  step = trainer.compile_steps(exp)[0]
  s0 = exp.init_state(0)
  p0 = jax.device_get(s0.params)
  batch = _batch(exp)
  s1, m1 = step(s0, batch, jax.random.key(0))
  p1 = jax.device_get(s1.params)  # the step donates its input state
  s2, m2 = step(s1, batch, jax.random.key(0))
  d0, d1 = 1 / 10, 2 / 11  # updates 0 and 1: min(0.999, (1 + n) / (10 + n))
  assert float(m1["ema_decay"]) == pytest.approx(d0) and float(m2["ema_decay"]) == pytest.approx(d1)
  want1 = jax.tree.map(lambda a, b: d0 * a + (1 - d0) * b, p0, p1)
  want2 = jax.tree.map(lambda a, b: d1 * a + (1 - d1) * b, want1, jax.device_get(s2.params))
  for a, b in zip(jax.tree.leaves(want2), jax.tree.leaves(jax.device_get(s2.ema_params))):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)


def test_accumulated_run_counts_updates_keeps_checkpoints_and_evaluates_the_last_step(tmp_path):
  wd = str(tmp_path / "run")
  cfg = tiny_config(optim__grad_accum_steps=2, train__num_steps=7, train__log_every=2,
                    train__ckpt_every=1, train__keep_ckpts=2, train__keep_period=3,
                    train__eval_every=3, optim__warmup_steps=4)
  out = trainer.train(cfg, wd, devices=jax.devices()[:2])  # micro-batches of 4 rows on 2
  assert out["step"] == 7
  # Retention: the newest 2 (6, 7) plus every multiple of 3 (3, 6).
  kept = sorted(int(s) for s in os.listdir(os.path.join(wd, "checkpoints")) if s.isdigit())
  assert kept == [3, 6, 7]
  records = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
  train_steps = [r["step"] for r in records if "train/loss" in r]
  eval_steps = [r["step"] for r in records if "eval/nelbo_nats_per_token" in r]
  assert train_steps == [2, 4, 6, 7]  # optimizer updates, not micro-batches
  assert eval_steps == [3, 6, 7]      # the final step is evaluated, once
  # The learning rate logged at step 2 is the mean of the schedule at updates 0 and 1.
  lr = exp_lib.learning_rate_schedule(cfg.optim, cfg.train.num_steps)
  first = next(r for r in records if r["step"] == 2 and "train/lr" in r)
  assert first["train/lr"] == pytest.approx((float(lr(0)) + float(lr(1))) / 2, rel=1e-6)
  assert api.load(wd).step == 7


def test_accumulation_and_retention_settings_are_validated():
  def error(devices=4, **kw):
    cfg = tiny_config(**kw)
    with pytest.raises(config_lib.ConfigError) as e:
      exp_lib.validate_config(cfg, num_data_parallel=devices)
    return str(e.value)

  assert "config.optim.grad_accum_steps: must be >= 1" in error(optim__grad_accum_steps=0)
  assert "does not divide train.global_batch_size=8" in error(optim__grad_accum_steps=3)
  assert "micro-batch of 2 rows" in error(optim__grad_accum_steps=4)  # 8 / 4 over 4 devices
  assert "config.train.keep_period" in error(train__keep_period=-1)
  assert "micro-batch of 8 / 8 rows is odd" in error(
      devices=1, method="did", model__time_conditioning=True, optim__grad_accum_steps=8)
