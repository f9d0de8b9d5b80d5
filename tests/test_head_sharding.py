"""Where the output head's work runs: each device computes the head for its OWN rows only.

Compiles the real sharded train step on the 8 fake CPU devices and reads the per-device shapes of
the compiled HLO. Issue 14: the masked-only head selected the masked positions with one `nonzero`
over the flattened global batch, which XLA cannot split, so every device computed the head for
the whole batch (16x the work and the memory at the paper size on 16 chips). Values were right,
so the loss tests could not see it; these shapes do.
"""

import re

import jax
import ml_collections
import pytest

from dlm_jax import parallel
from dlm_jax.methods import mdlm as mdlm_method
from dlm_jax.run import experiment as exp_lib
from dlm_jax.run import step as step_lib
from tests.tiny import tiny_config


def _compiled_head_rows(data, fsdp, tensor, batch=64, length=64):
  cfg = tiny_config()
  cfg.train.global_batch_size = batch
  cfg.data.seq_len = length
  cfg.model.max_len = length
  mesh = parallel.make_mesh(ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor)),
                            jax.devices()[:data * fsdp * tensor])
  exp = exp_lib.Experiment.create(cfg, mesh=mesh)
  vocab = exp.tokenizer.vocab_size
  hlo = step_lib.lower_train_step(exp).compile().as_text()
  rows = {}  # columns -> largest row count of a float32 [rows, columns] array in the step
  for r, c in re.findall(r"f32\[(\d+),(\d+)\]", hlo):
    rows[int(c)] = max(rows.get(int(c), 0), int(r))
  return vocab, rows


def test_head_runs_on_each_devices_rows_only():
  """8 data-parallel devices, 8 of the 64 rows each: the head's [rows, V] arrays have at most one
  device's 8 x 64 = 512 rows (sparse budget 448 of them); the global selection had 2304."""
  vocab, rows = _compiled_head_rows(data=8, fsdp=1, tensor=1)
  local_tokens = 64 // 8 * 64
  assert mdlm_method.head_budget(8, 64) < local_tokens  # the sparse head runs per device
  assert vocab in rows, f"no float32 [rows, {vocab}] array in the compiled step"
  assert rows[vocab] <= local_tokens, (
      f"a device computes the head on {rows[vocab]} rows, more than its own {local_tokens}: the "
      "selection of masked positions is not per device")


def test_vocabulary_is_split_over_tensor():
  """data 4 x tensor 2: 16 rows per device and half the vocabulary's columns each."""
  vocab, rows = _compiled_head_rows(data=4, fsdp=1, tensor=2)
  if vocab % 2:
    pytest.skip(f"vocabulary {vocab} is odd: the head cannot split it over tensor=2")
  local_tokens = 64 // 4 * 64
  assert vocab // 2 in rows and rows[vocab // 2] <= local_tokens
  assert rows.get(vocab, 0) == 0, f"full-vocabulary [rows, {vocab}] logits on a tensor=2 mesh"


def test_the_sparse_head_stays_sparse_when_chunks_are_large():
  """At the comparison shape (8 x 256 rows on one device, V 50,258) the per-device budget is 1,472
  rows and one chunk holds 1,328 rows of logits. Rounding the budget up to whole chunks of the dense
  path's size gave 2,656 >= 2,048 rows, so every step ran the dense head (2.2x the head's rows;
  the train step 25% slower on CPU); the overflow metric could not show it. Each path now sizes its
  own chunks."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from dlm_jax.models import output_head  # pylint: disable=g-import-not-at-top
  n, d, vocab = 8 * 256, 64, 50258
  budget = mdlm_method.head_budget(8, 256)
  assert budget == 1472
  chunk, padded = output_head.chunking(budget, vocab)
  assert padded < n and padded - budget < 8 * (padded // chunk)
  f32 = jnp.float32
  args = (jax.ShapeDtypeStruct((n, d), f32), jax.ShapeDtypeStruct((d, vocab), f32),
          jax.ShapeDtypeStruct((vocab,), f32), jax.ShapeDtypeStruct((n,), jnp.int32),
          jax.ShapeDtypeStruct((n,), f32))
  jaxpr = str(jax.make_jaxpr(lambda h, k, b, t, w: output_head.masked_head_nll(
      h, k, b, t, w, budget, vocab - 1))(*args))
  assert "cond[" in jaxpr  # the sparse path exists (with the dense one as the overflow branch)
  assert f"f32[{chunk},{vocab}]" in jaxpr and f"f32[{n},{vocab}]" not in jaxpr
