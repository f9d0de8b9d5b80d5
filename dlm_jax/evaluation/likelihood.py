"""The likelihood bound of a method on held-out data: NELBO per token, bits per token, PPL bound."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import jax

from dlm_jax import metrics as metrics_lib
from dlm_jax import parallel


def nelbo_report(eval_step: Callable[[Any, dict, jax.Array], dict], params: Any,
                 batches: Iterable[dict], mesh: jax.sharding.Mesh, num_batches: Optional[int],
                 num_t: int, seed: int = 0) -> dict[str, float]:
  """Sums a method's likelihood terms ({'nll_sum', 'token_count'} per batch) over `batches`.

  Args:
    eval_step: jitted (params, global batch, key) -> sums (the method's `eval_sums`).
    params: the parameters to evaluate.
    batches: local batches of the evaluation split (assembled into global ones on `mesh`).
    mesh: the device mesh.
    num_batches: at most this many batches (None: all).
    num_t: t-draws per sequence the method used (reported with the result).
    seed: batch i draws its noise with fold_in(key(seed + 12345), i).

  Raises:
    RuntimeError: the split produced no batch.
  """
  nll, count, n = 0.0, 0.0, 0
  key = jax.random.key(seed + 12345)
  for i, local in enumerate(batches):
    if num_batches is not None and i >= num_batches:
      break
    batch = parallel.global_batch_from_local(local, mesh)
    out = eval_step(params, batch, jax.random.fold_in(key, i))
    nll += float(out["nll_sum"])
    count += float(out["token_count"])
    n += 1
  if n == 0:
    raise RuntimeError("The evaluation split produced no batch; check config.data.eval_split.")
  return dict(nelbo_nats_per_token=nll / max(count, 1.0),
              bits_per_token=metrics_lib.bits_per_token(nll, count),
              perplexity_bound=metrics_lib.perplexity_bound(nll, count),
              tokens=count, batches=n, num_t=int(num_t))
