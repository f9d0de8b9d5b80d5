"""The V-wide output head fused with a weighted cross-entropy, and its masked-positions-only form.

At V = 50k the head (a [N, d] x [d, V] matmul, its softmax and their gradients) is most of a
small denoiser's training step. Two things make it cheaper here, both exact:

* `head_nll` computes the weighted NLL and, in the same pass, its gradients with respect to the
  hidden states, the kernel and the bias (softmax minus one-hot, scaled by the weights), and hands
  them to autodiff through a custom VJP. The [N, V] logits are never kept for the backward pass,
  which saves their memory and the extra passes over them.
* `masked_head_nll` runs that head only on the positions a loss reads (MDLM: the masked ones,
  about half of them), gathered up to a static budget; when more positions are scored the dense
  head runs instead (`lax.cond`). The cond sits inside the custom VJP's forward rule, which
  autodiff never linearises, so the branch not taken costs nothing (differentiating a cond
  would keep zero-filled [N, V] residuals of both branches).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _nll_and_grads(h, kernel, bias, targets, weights, mask_id, dtype):
  """sum_i weights_i * CE_i and its gradients w.r.t. h [K, d], kernel [d, V], bias [V]."""
  logits = jax.lax.dot_general(h.astype(dtype), kernel.astype(dtype), (((1,), (0,)), ((), ())),
                               preferred_element_type=jnp.float32)
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  if mask_id is not None:  # SUBS: the mask token is never predicted
    logits = logits.at[:, mask_id].set(-jnp.inf)
  lse = jax.nn.logsumexp(logits, axis=-1)
  tgt = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
  ce = lse - tgt
  nll = jnp.sum(weights * ce)
  probs = jnp.exp(logits - lse[:, None])
  onehot = jax.nn.one_hot(targets, kernel.shape[1], dtype=jnp.float32)
  dlogits = weights[:, None] * (probs - onehot)  # [K, V]
  dh = jax.lax.dot_general(dlogits.astype(dtype), kernel.astype(dtype), (((1,), (1,)), ((), ())),
                           preferred_element_type=jnp.float32)
  dkernel = jax.lax.dot_general(h.astype(dtype), dlogits.astype(dtype), (((0,), (0,)), ((), ())),
                                preferred_element_type=jnp.float32)
  dbias = None if bias is None else jnp.sum(dlogits, axis=0)
  return nll, ce, (dh, dkernel, dbias)


def _masked_forward(h, kernel, bias, targets, weights, budget, mask_id, dtype):
  """(nll, ce [N], grads): the head on the rows with weight != 0, or on all rows on overflow."""
  n = h.shape[0]
  scored = weights != 0
  count = jnp.sum(scored.astype(jnp.int32))

  def sparse(_):
    idx = jnp.nonzero(scored, size=budget, fill_value=0)[0]
    keep = jnp.arange(budget) < count
    w = jnp.where(keep, weights[idx], 0.0)
    nll, ce_k, (dh_k, dk, db) = _nll_and_grads(h[idx], kernel, bias, targets[idx], w, mask_id,
                                               dtype)
    ce = jnp.zeros((n,), jnp.float32).at[idx].add(jnp.where(keep, ce_k, 0.0))
    dh = jnp.zeros((n, h.shape[1]), jnp.float32).at[idx].add(jnp.where(keep[:, None], dh_k, 0.0))
    return nll, ce, (dh, dk, db)

  def dense(_):
    nll, ce, grads = _nll_and_grads(h, kernel, bias, targets, weights, mask_id, dtype)
    return nll, jnp.where(scored, ce, 0.0), grads

  if budget >= n:
    return dense(None)
  return jax.lax.cond(count <= budget, sparse, dense, None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def masked_head_nll(h, kernel, bias, targets, weights, budget, mask_id, dtype=jnp.float32):
  """sum_i weights_i * CE(h_i @ kernel + bias, targets_i), exact, with a cheap backward pass.

  Args:
    h: [N, d] final hidden states (after the final norm).
    kernel: [d, V]; bias: [V] or None.
    targets: [N] int32 token ids.
    weights: [N] float32; rows with weight 0 are not scored (their logits are never formed
      when at most `budget` rows are scored).
    budget: static number of rows the sparse head scores; >= N means always dense.
    mask_id: a vocabulary column excluded from the softmax (SUBS), or None.
    dtype: matmul input dtype (accumulation is float32).

  Returns:
    The weighted NLL (float32 scalar). Differentiable w.r.t. h, kernel and bias; the gradient
    w.r.t. weights is CE on scored rows and 0 on the others (their CE is never formed).
  """
  return _masked_forward(h, kernel, bias, targets, weights, budget, mask_id, dtype)[0]


def _fwd(h, kernel, bias, targets, weights, budget, mask_id, dtype):
  nll, ce, (dh, dk, db) = _masked_forward(h, kernel, bias, targets, weights, budget, mask_id,
                                          dtype)
  return nll, (ce, dh.astype(h.dtype), dk.astype(kernel.dtype), db)


def _bwd(budget, mask_id, dtype, res, g):  # pylint: disable=unused-argument
  ce, dh, dk, db = res
  return (g.astype(dh.dtype) * dh, g.astype(dk.dtype) * dk,
          None if db is None else g * db, None, g * ce)


masked_head_nll.defvjp(_fwd, _bwd)
