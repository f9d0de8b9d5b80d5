"""Per-example PRNG keys: every random draw of an example comes from its global index.

The train step folds its key with the step; `example_keys` then folds in each example's global
id, so the noise an example sees depends on neither the device count, the sharding nor the order
of the rows in a batch (a resumed run, or one on another mesh, draws the same masks).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def example_keys(key: jax.Array, example_ids: jax.Array) -> jax.Array:
  """Keys fold_in(key, example_id) [B] (typed keys) or [B, 2] (raw uint32 keys).

  Args:
    key: the step's key (already folded with the step and the purpose of the draw).
    example_ids: [B] int stable global example ids (never positions in a local batch).
  """
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.asarray(example_ids, jnp.int32))


def step_rows(batch: dict[str, jax.Array], step_batch_size: int) -> tuple[jax.Array, int]:
  """(index [B], N): each row's position among the N rows of the optimizer update.

  A micro-batch of gradient accumulation carries `row_index` (its rows' positions in the
  update's global batch of N = `step_batch_size` rows), so draws stratified over the batch see
  the same strata as the undivided batch; a whole batch is rows 0..B-1 of B.
  """
  if "row_index" in batch:
    return batch["row_index"], int(step_batch_size)
  b = batch["tokens"].shape[0]
  return jnp.arange(b), b
