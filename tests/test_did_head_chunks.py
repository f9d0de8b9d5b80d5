"""DID's V-wide head and loss run per device and in chunks of model rows (methods/did/head_loss.py):
the same loss and gradients as one pass over every row, and the same on 1 and 8 devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlm_jax import parallel
from dlm_jax.methods.did import head_loss
from dlm_jax.run import experiment as exp_lib
from tests.test_did_method import _batch, _mesh, did_config


def _loss_and_grads(exp, batch_np, chunk_bytes, monkeypatch):
  monkeypatch.setattr(head_loss, "CHUNK_BYTES", chunk_bytes)
  batch = parallel.global_batch_from_local(batch_np, exp.mesh)
  batch["example_id"] = jnp.arange(batch_np["tokens"].shape[0])
  f = jax.jit(jax.value_and_grad(lambda p, b: exp.method.train_loss(p, b, jax.random.key(7))[0]),
              out_shardings=parallel.replicated(exp.mesh))
  loss, grads = parallel.in_sharding_context(f, exp.mesh)(exp.init_state(0).params, batch)
  return float(loss), jax.device_get(grads)


@pytest.mark.parametrize("variant", ["fixed", "variable"])
def test_chunked_head_equals_one_pass(variant, monkeypatch):
  cfg = did_config(did__variant=variant, model__time_conditioning=variant == "variable")
  exp1 = exp_lib.Experiment.create(cfg, mesh=_mesh(1, 1, 1))
  exp8 = exp_lib.Experiment.create(cfg, mesh=_mesh(8, 4, 2), tokenizer=exp1.tokenizer)
  batch = _batch(exp1)
  whole = _loss_and_grads(exp1, batch, 1 << 40, monkeypatch)   # one chunk of all 8 model rows
  rows = _loss_and_grads(exp1, batch, 1, monkeypatch)          # 8 chunks of one row
  sharded = _loss_and_grads(exp8, batch, 1, monkeypatch)       # 2 rows per device, 1 per chunk
  for loss, grads in (rows, sharded):
    assert loss == pytest.approx(whole[0], rel=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(whole[1])):
      np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)


def test_chunk_size_divides_the_rows():
  assert head_loss.chunk_size(16, 100, chunk_bytes=350) == 2
  assert head_loss.chunk_size(12, 100, chunk_bytes=1000) == 6
  assert head_loss.chunk_size(7, 100, chunk_bytes=350) == 1
  assert head_loss.chunk_size(8, 100, chunk_bytes=1 << 30) == 8
