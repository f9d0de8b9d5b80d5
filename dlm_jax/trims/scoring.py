"""Teacher scoring for TRIMS: per-token difficulty of each response under a causal teacher.

One teacher-forced forward per example gives nll[i] = -log p_T(r_i | prompt, r_<i) on every
response slot; `dlm_jax.trims.buckets` ranks them into buckets. The scored-set file (arrays,
resume, summary) is `dlm_jax.data.tasks.sft`; `python -m dlm_jax.score_difficulty` runs both.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np


def _shifted_log_probs(logits_fn: Callable[[jax.Array], jax.Array], tokens: jax.Array) -> jax.Array:
  """log p_T(. | x_<i) for i = 1..L-1 from one causal forward: float32 [B, L-1, V]."""
  logits = jnp.asarray(logits_fn(tokens)).astype(jnp.float32)
  return jax.nn.log_softmax(logits[:, :-1], axis=-1)


def teacher_token_nll(logits_fn: Callable[[jax.Array], jax.Array], tokens: jax.Array,
                      response_mask: jax.Array) -> jax.Array:
  """Teacher-forced NLL of every token: nll[b, i] = -log p_T(tokens[b, i] | tokens[b, :i]).

  One causal forward over `tokens`; the prediction for position i is read from the logits at i - 1.

  Args:
    logits_fn: causal teacher, tokens [B, L] int32 -> logits [B, L, V] (params closed over).
    tokens: [B, L] int32 (prompt ++ response).
    response_mask: [B, L] bool, slots to score. Position 0 has no context and always scores 0.

  Returns:
    float32 [B, L]: the NLL on response_mask slots, 0 elsewhere.
  """
  tok = jnp.asarray(tokens, jnp.int32)
  logp = _shifted_log_probs(logits_fn, tok)
  nll = -jnp.take_along_axis(logp, tok[:, 1:, None], axis=-1)[..., 0]
  nll = jnp.concatenate([jnp.zeros_like(nll[:, :1]), nll], axis=1)
  return jnp.where(jnp.asarray(response_mask, bool), nll, 0.0)


def teacher_token_entropy(logits_fn: Callable[[jax.Array], jax.Array], tokens: jax.Array,
                          response_mask: jax.Array) -> jax.Array:
  """Teacher predictive entropy at every slot: H(p_T(. | tokens[b, :i])) (ablation score), float32 [B, L].

  Same conventions as `teacher_token_nll` (position 0 and non-response slots score 0).
  """
  logp = _shifted_log_probs(logits_fn, jnp.asarray(tokens, jnp.int32))
  ent = -jnp.sum(jnp.where(jnp.isfinite(logp), jnp.exp(logp) * logp, 0.0), axis=-1)
  ent = jnp.concatenate([jnp.zeros_like(ent[:, :1]), ent], axis=1)
  return jnp.where(jnp.asarray(response_mask, bool), ent, 0.0)


def teacher_response_scores(logits_fn: Callable[[jax.Array], jax.Array], prompt: jax.Array, response: jax.Array,
                            score: str = "nll") -> jax.Array:
  """Scores of the response slots of (prompt [B, P], response [B, R]) -> float32 [B, R] ("nll" or "entropy")."""
  prompt = jnp.asarray(prompt, jnp.int32)
  response = jnp.asarray(response, jnp.int32)
  if prompt.shape[1] < 1:
    raise ValueError("teacher scoring needs a prompt of at least one token (e.g. BOS)")
  tokens = jnp.concatenate([prompt, response], axis=1)
  rmask = jnp.concatenate([jnp.zeros(prompt.shape, bool), jnp.ones(response.shape, bool)], axis=1)
  if score == "nll":
    s = teacher_token_nll(logits_fn, tokens, rmask)
  elif score == "entropy":
    s = teacher_token_entropy(logits_fn, tokens, rmask)
  else:
    raise ValueError(f"score must be 'nll' or 'entropy', got {score!r}")
  return s[:, prompt.shape[1]:]


def make_scorer(logits_fn_of: Callable[[Any], Callable[[jax.Array], jax.Array]], params: Any,
                batch_size: int, prompt_len: int, response_len: int, score: str = "nll"
                ) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
  """A jitted (prompt [b, P], response [b, R]) -> scores [b, R] float32 for b <= batch_size.

  Args:
    logits_fn_of: params -> causal logits function (e.g. `method.logits_fn`).
    params: the teacher's parameters.
    batch_size: rows per call; shorter chunks are padded so every chunk runs the same compiled
      program (and a resumed scoring run reproduces an uninterrupted one bit for bit).
    prompt_len, response_len: P and R.
    score: "nll" or "entropy".
  """

  @jax.jit
  def fn(params, prompt, response):
    return teacher_response_scores(logits_fn_of(params), prompt, response, score)

  def run(prompt: np.ndarray, response: np.ndarray) -> np.ndarray:
    b = prompt.shape[0]
    pp = np.zeros((batch_size, prompt_len), np.int32)
    rr = np.zeros((batch_size, response_len), np.int32)
    pp[:b], rr[:b] = prompt, response
    return np.asarray(jax.device_get(fn(params, jnp.asarray(pp), jnp.asarray(rr))))[:b]

  return run
