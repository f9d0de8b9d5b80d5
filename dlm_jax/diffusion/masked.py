"""Masked diffusion (MDLM) as pure functions: time sampling, masking, SUBS, NELBO.

Reference: Sahoo et al., "Simple and Effective Masked Diffusion Language Models" (arXiv 2406.07524).
Shared by every masked method: MDLM's loss, TRIMS fine-tuning, the ancestral and blockwise
samplers and the step-importance curves. Log-probabilities and losses are float32 whatever the
trunk's dtype (the samplers ask for float64 through `dtype`).
"""

from __future__ import annotations

import itertools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

TIME_SAMPLING_MODES = ("stratified", "vdm", "iid")


def sample_times(key: jax.Array, batch_size: int, t_min: float = 1e-3,
                 mode: str = "stratified", index_offset: int | jax.Array = 0,
                 global_batch: int | None = None, index: jax.Array | None = None) -> jax.Array:
  """Draws one diffusion time per sequence, t [B] in [t_min, 1).

  "stratified": u_i = (i + U_i) / N with U_i from fold_in(key, i) and i the GLOBAL index, so
  the set of times does not depend on how the batch is split across devices (or into the
  micro-batches of gradient accumulation).
  "vdm": one shared U, u_i = (U + i / N) mod 1. "iid": u_i = U_i.
  The global indices are `index` [B] when given, else index_offset + 0..B-1; N is global_batch
  (default B).
  """
  n = batch_size if global_batch is None else global_batch
  idx = index_offset + jnp.arange(batch_size) if index is None else jnp.asarray(index)
  if mode == "stratified":
    u = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(key, i)))(idx)
    u = (idx + u) / n
  elif mode == "iid":
    u = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(key, i)))(idx)
  elif mode == "vdm":
    u = jnp.mod(jax.random.uniform(key) + idx / n, 1.0)
  else:
    raise ValueError(f"config.diffusion.time_sampling={mode!r}; choose one of {TIME_SAMPLING_MODES}.")
  return t_min + (1.0 - t_min) * u


def forward_mask(keys: jax.Array, x0: jax.Array, t: jax.Array, maskable: jax.Array,
                 schedule: Any, mask_id: int) -> tuple[jax.Array, jax.Array]:
  """Masks each maskable token independently with probability 1 - alpha(t).

  Args:
    keys: per-example PRNG keys [B] (or one key, split over the batch).
    x0: clean tokens [B, L] int32.
    t: times [B].
    maskable: [B, L] bool; other positions are copied unchanged.
  Returns:
    (xt [B, L] int32, is_masked [B, L] bool).
  """
  b, l = x0.shape
  if keys.ndim == 0 or (jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key) and keys.shape == ()):
    keys = jax.random.split(keys, b)
  u = jax.vmap(lambda k: jax.random.uniform(k, (l,)))(keys)
  is_masked = (u < schedule.mask_prob(t)[:, None]) & maskable
  return jnp.where(is_masked, mask_id, x0), is_masked


def subs_log_probs(logits: jax.Array, mask_id: int, xt: jax.Array | None = None,
                   dtype: Any = jnp.float32) -> jax.Array:
  """SUBS parameterisation: log p(x0 | xt) [..., V] in `dtype` (float32 by default).

  The mask column gets probability zero (-inf before the log-softmax). With `xt`, positions
  where xt is not masked carry over: the distribution is the point mass on xt. The samplers
  call it without `xt` (they only read masked slots) and with float64 under x64.
  """
  logits = logits.astype(dtype)
  logits = logits.at[..., mask_id].set(-jnp.inf)
  logp = jax.nn.log_softmax(logits, axis=-1)
  if xt is not None:
    onehot = jax.nn.one_hot(xt, logits.shape[-1], dtype=jnp.bool_)
    point = jnp.where(onehot, 0.0, -jnp.inf)
    logp = jnp.where((xt != mask_id)[..., None], point, logp)
  return logp


def masked_cross_entropy(logits: jax.Array, x0: jax.Array, mask_id: int) -> jax.Array:
  """-log p(x0_l | xt) per position [B, L] under SUBS (mask column excluded), float32."""
  logits = logits.astype(jnp.float32)
  logits = logits.at[..., mask_id].set(-jnp.inf)
  lse = jax.nn.logsumexp(logits, axis=-1)
  tgt = jnp.take_along_axis(logits, x0[..., None], axis=-1)[..., 0]
  return lse - tgt


def mdlm_loss(logits: jax.Array, x0: jax.Array, is_masked: jax.Array, t: jax.Array,
              schedule: Any, valid: jax.Array, mask_id: int,
              normalize: str = "token") -> tuple[jax.Array, dict[str, jax.Array]]:
  """Continuous-time NELBO estimate, one t per sequence.

  ell_b = w(t_b) * sum_l is_masked * CE. Reductions: "token" = sum_b ell_b / sum valid,
  "sequence" = mean_b ell_b / n_b, "sum" = sum_b ell_b.
  Returns (loss, aux) with aux = {nll_sum, token_count, per_seq [B], masked_count}.
  """
  ce = masked_cross_entropy(logits, x0, mask_id)
  m = (is_masked & valid).astype(jnp.float32)
  per_seq = schedule.weight(t) * jnp.sum(jnp.where(m > 0, ce, 0.0), axis=-1)
  n_b = jnp.sum(valid.astype(jnp.float32), axis=-1)
  token_count = jnp.sum(n_b)
  nll_sum = jnp.sum(per_seq)
  if normalize == "token":
    loss = nll_sum / jnp.maximum(token_count, 1.0)
  elif normalize == "sequence":
    loss = jnp.mean(per_seq / jnp.maximum(n_b, 1.0))
  elif normalize == "sum":
    loss = nll_sum
  else:
    raise ValueError(f"config.diffusion.normalize={normalize!r}; choose token, sequence or sum.")
  aux = dict(nll_sum=nll_sum, token_count=token_count, per_seq=per_seq,
             masked_count=jnp.sum(m))
  return loss, aux


def nelbo(logits_fn: Callable[[jax.Array], jax.Array], x0: jax.Array, valid: jax.Array,
          key: jax.Array, schedule: Any, mask_id: int, num_t: int = 16,
          t_min: float = 1e-3) -> jax.Array:
  """Monte Carlo NELBO per sequence (nats) [B], averaged over `num_t` stratified t-draws.

  `logits_fn(xt [B, L]) -> logits [B, L, V]`. Within each sequence the draws are stratified.
  """
  b = x0.shape[0]

  def one(i, acc):
    k = jax.random.fold_in(key, i)
    kt, km = jax.random.split(k)
    u = jax.random.uniform(kt, (b,))
    t = t_min + (1.0 - t_min) * (i + u) / num_t
    xt, is_masked = forward_mask(km, x0, t, valid, schedule, mask_id)
    _, aux = mdlm_loss(logits_fn(xt), x0, is_masked, t, schedule, valid, mask_id, "sum")
    return acc + aux["per_seq"]

  return jax.lax.fori_loop(0, num_t, one, jnp.zeros((b,), jnp.float32)) / num_t


def exact_nelbo_enumerate(log_prob_fn: Callable[[np.ndarray, np.ndarray], np.ndarray],
                          x0: np.ndarray) -> float:
  """Exact NELBO (nats) of one short sequence by enumerating mask subsets (tests only).

  NELBO = sum_k (1/k) E_{|M|=k}[sum_{l in M} -log p(x0_l | x0 with M masked)].
  `log_prob_fn(x0, mask [L] bool) -> log p(x0_l | visible) [L]` for the masked slots.
  """
  x0 = np.asarray(x0)
  length = len(x0)
  if length > 12:
    raise ValueError("exact_nelbo_enumerate is for sequences of at most 12 tokens.")
  total = 0.0
  for k in range(1, length + 1):
    subsets = list(itertools.combinations(range(length), k))
    acc = 0.0
    for sub in subsets:
      mask = np.zeros(length, bool)
      mask[list(sub)] = True
      lp = log_prob_fn(x0, mask)
      acc += -np.sum(lp[mask])
    total += acc / len(subsets) / k
  return float(total)
