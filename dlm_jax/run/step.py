"""The sharded steps of a run as the trainer jits them, lowered without data or devices to run on.

`python -m dlm_jax.compile` uses this to compile the exact train step (and the sampling step) of a
config for a target it does not have (a TPU slice, a GPU node): the mesh is built from the target's
abstract devices (`parallel.make_mesh(config.mesh, devices)`), the state is abstract
(`Experiment.abstract_state()`, i.e. `jax.eval_shape` of the initialiser with its shardings), the
batch is ShapeDtypeStructs sharded like the trainer's global batches, and the step functions are the
trainer's own (`trainer.jit_steps`). Nothing here allocates device memory.

It also holds the analytic count of a step's FLOPs (the trainer's TFLOP/s and MFU, and the compile
report).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from dlm_jax import parallel
from dlm_jax.run import experiment as exp_lib
from dlm_jax.run import trainer


def abstract_train_batch(exp: exp_lib.Experiment) -> dict[str, jax.ShapeDtypeStruct]:
  """The global training batch as the data pipeline delivers it, as sharded ShapeDtypeStructs.

  Every source gives tokens, segment_ids and positions [B, L] int32; SFT batches add `maskable`
  [B, L] and TRIMS masking adds `buckets` [B, L] (the trainer adds `example_id` inside the step).
  """
  cfg = exp.config
  b, length = cfg.train.global_batch_size, cfg.data.seq_len
  sharding = parallel.batch_sharding(exp.mesh, 2)
  spec = lambda dtype: jax.ShapeDtypeStruct((b, length), dtype, sharding=sharding)  # noqa: E731
  batch = dict(tokens=spec(jnp.int32), segment_ids=spec(jnp.int32), positions=spec(jnp.int32))
  if cfg.data.source == "sft":
    batch["maskable"] = spec(jnp.bool_)
  if cfg.trims.masking != "random":
    batch["buckets"] = spec(jnp.int32)
  return batch


def abstract_key(mesh: jax.sharding.Mesh) -> jax.ShapeDtypeStruct:
  key = jax.random.key(0)
  return jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=parallel.replicated(mesh))


def lower_train_step(exp: exp_lib.Experiment) -> jax.stages.Lowered:
  """The trainer's jitted train step, lowered for `exp.mesh` with an abstract state and batch."""
  train_step, _ = trainer.jit_steps(exp)
  # Abstract arguments first: eager ops (the PRNG key of eval_shape) may not run under a mesh of
  # compile-only devices.
  args = (exp.abstract_state(), abstract_train_batch(exp), abstract_key(exp.mesh))
  with parallel.sharding_context(exp.mesh):
    return train_step.lower(*args)


def lower_eval_step(exp: exp_lib.Experiment) -> jax.stages.Lowered:
  """The trainer's jitted evaluation step (the likelihood bound of one global batch), lowered."""
  _, eval_step = trainer.jit_steps(exp)
  batch = {k: v for k, v in abstract_train_batch(exp).items()
           if k in ("tokens", "segment_ids", "positions")}
  args = (exp.abstract_state().params, batch, abstract_key(exp.mesh))
  with parallel.sharding_context(exp.mesh):
    return eval_step.lower(*args)


def lower_sample_step(exp: exp_lib.Experiment,
                      sample_cfg: ml_collections.ConfigDict | None = None) -> jax.stages.Lowered:
  """One call of the configured decoder (its whole loop, `sample.batch_size` rows), lowered.

  Parameters are sharded as in training; the decoder's own jitted loop is traced inside.
  """
  s = sample_cfg or exp.config.sample
  params = exp.abstract_state().params

  def sample(p, key):
    out = exp.method.sample(p, key, s)
    return {k: v for k, v in out.items() if isinstance(v, jax.Array)}

  key = abstract_key(exp.mesh)
  with parallel.sharding_context(exp.mesh):
    return jax.jit(sample).lower(params, key)


def train_model_shape(exp: exp_lib.Experiment) -> tuple[int, int]:
  """(rows, length) the network processes per training step (DID: packed model rows)."""
  return exp.method.train_model_shape(int(exp.config.train.global_batch_size))


def step_flops(exp: exp_lib.Experiment) -> float:
  """Analytic model FLOPs of one training step over the global batch (`Experiment.step_flops`)."""
  return exp.step_flops()


def data_tokens_per_step(config: ml_collections.ConfigDict) -> int:
  return int(config.train.global_batch_size) * int(config.data.seq_len)
