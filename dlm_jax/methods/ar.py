"""Autoregressive (causal) LM as a method: the TRIMS teacher and the gen-PPL judge, with its
decoder "autoregressive" (left-to-right sampling at temperature 1).

Same trunk as the denoisers with `causal=True`; next-token cross-entropy within each document
(segment). Batches with a `maskable` field (SFT: response positions) are scored only there.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dlm_jax.methods.base import Method
from dlm_jax.models.transformer import TransformerConfig
from dlm_jax.sampling.decoders import Decoder, cached, default_prompt, register


def next_token_targets(batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
  """(targets [B, L], weight [B, L] bool): position i predicts token i+1 of the same segment."""
  tok, seg = batch["tokens"], batch["segment_ids"]
  tgt = jnp.concatenate([tok[:, 1:], jnp.zeros_like(tok[:, :1])], axis=1)
  nseg = jnp.concatenate([seg[:, 1:], jnp.zeros_like(seg[:, :1])], axis=1)
  weight = (nseg == seg) & (seg > 0)
  if "maskable" in batch:
    m = batch["maskable"].astype(bool)
    weight &= jnp.concatenate([m[:, 1:], jnp.zeros_like(m[:, :1])], axis=1)
  return tgt, weight


def token_nll(logits: jax.Array, targets: jax.Array, mask_id: int | None = None) -> jax.Array:
  """-log p(target) per position [B, L] in float32 (the MASK id is never predicted)."""
  logits = logits.astype(jnp.float32)
  if mask_id is not None:
    logits = logits.at[..., mask_id].set(-jnp.inf)
  lse = jax.nn.logsumexp(logits, axis=-1)
  return lse - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]


class AutoRegressive(Method):
  """Causal transformer LM trained with next-token cross-entropy."""

  name = "ar"
  family = "causal"
  default_decoder = "autoregressive"

  def model_config(self) -> TransformerConfig:
    cfg = TransformerConfig.from_config(self.config.model, self.ids.vocab_size)
    return dataclasses.replace(cfg, causal=True, time_conditioning=False)

  def _nll(self, params, batch, dropout_key=None):
    logits, _ = self.apply(params, batch["tokens"], batch["positions"], batch["segment_ids"],
                           None, dropout_key)
    tgt, weight = next_token_targets(batch)
    nll = token_nll(logits, tgt, self.ids.mask)
    return jnp.where(weight, nll, 0.0), weight

  def train_loss(self, params, batch, key, train=True):
    nll, weight = self._nll(params, batch, jax.random.fold_in(key, 2) if train else None)
    targets = jnp.sum(weight.astype(jnp.float32))
    loss = jnp.sum(nll) / jnp.maximum(targets, 1.0)
    return loss, dict(loss=loss, nll=loss, bits_per_token=loss / jnp.log(2.0),
                      loss_weight=targets)

  def eval_sums(self, params, batch, key):
    del key
    nll, weight = self._nll(params, batch)
    return dict(nll_sum=jnp.sum(nll), token_count=jnp.sum(weight.astype(jnp.float32)))

  def per_token_nll(self, params, batch) -> tuple[jax.Array, jax.Array]:
    """NLL of each position's NEXT token [B, L] and its validity mask (teacher scoring)."""
    return self._nll(params, batch)


# -- the "autoregressive" decoder ----------------------------------------------------------------
def sample_causal(method, params, key, sample_cfg, prompt=None) -> dict:
  """Left-to-right ancestral sampling at temperature 1 (the mask id is never drawn)."""
  s = sample_cfg
  b = s.batch_size
  prompt = default_prompt(method, b, prompt)
  p = prompt.shape[1]
  gen_len = s.gen_len or (method.config.data.seq_len - p)
  total = p + gen_len
  if total > method.model_cfg.max_len:
    raise ValueError(f"prompt ({p}) + sample.gen_len ({gen_len}) is longer than model.max_len="
                     f"{method.model_cfg.max_len}.")
  mask_id, pad_id = method.ids.mask, method.ids.pad

  def build():
    @jax.jit
    def run(params, key, prompt):
      fn = method.logits_fn(params)
      tokens = jnp.concatenate([prompt, jnp.full((b, gen_len), pad_id, jnp.int32)], 1)

      def step(i, tokens):
        logits = fn(tokens)[:, p + i - 1].astype(jnp.float32)
        logits = logits.at[:, mask_id].set(-jnp.inf)
        nxt = jax.random.categorical(jax.random.fold_in(key, i), logits)
        return tokens.at[:, p + i].set(nxt.astype(jnp.int32))

      tokens = jax.lax.fori_loop(0, gen_len, step, tokens)
      return dict(tokens=tokens, nfe=jnp.full((b,), gen_len, jnp.int32))
    return run

  run = cached(method, ("autoregressive", b, p, gen_len), build)
  return dict(run(params, key, prompt), prompt_len=p, gen_len=gen_len)


register(Decoder("autoregressive", "causal", sample_causal, options=("gen_len",)))
