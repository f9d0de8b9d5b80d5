"""The TRIMS fine-tuning loss: masked cross-entropy with a uniform weight (no 1/t).

Masked slots are weighted equally (spec/trims.md): the loss is the mean CE over the masked slots
of the global batch ("token") or the mean over sequences of their own masked-slot mean
("sequence"). The 1/t-weighted SFT loss of the control arm S is the MDLM NELBO
(`dlm_jax.diffusion.masked.mdlm_loss`), not a second implementation here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dlm_jax.diffusion.masked import masked_cross_entropy

NORMALIZATIONS = ("token", "sequence")


def sft_loss(logits: jax.Array, targets: jax.Array, mask: jax.Array, mask_id: int,
             normalize: str = "token") -> tuple[jax.Array, dict]:
  """Uniformly weighted masked cross-entropy for diffusion SFT (float32 whatever the logits dtype).

  CE[b, l] = -log p(targets[b, l]) under SUBS (the [MASK] column removed), read on masked slots:
    "token"    -> sum_{b,l} mask CE / sum_{b,l} mask        (TRIMS: mean CE over the batch's masked slots)
    "sequence" -> mean over b of sum_l mask CE / max(1, sum_l mask[b])
  A batch with nothing masked gives loss 0, never NaN. Sums run over the global batch.

  Args:
    logits: [B, L, V] any float dtype.
    targets: [B, L] int clean tokens.
    mask: [B, L] bool, True where the input was masked (maskable slots only).
    mask_id: id of [MASK] (its logit column is removed).
    normalize: "token" or "sequence".

  Returns:
    (loss scalar float32, aux) with aux = {"ce_sum": masked CE sum, "num_masked", "per_seq" [B]
    (masked CE sum per sequence), "accuracy" (top-1 on masked slots)}.
  """
  if normalize not in NORMALIZATIONS:
    raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
  m = jnp.asarray(mask, bool)
  ce = jnp.where(m, masked_cross_entropy(logits, targets, mask_id), 0.0)
  mf = m.astype(jnp.float32)
  num_masked = jnp.sum(mf)
  per_seq = jnp.sum(ce, axis=-1)
  if normalize == "token":
    loss = jnp.sum(ce) / jnp.maximum(num_masked, 1.0)
  else:
    loss = jnp.mean(per_seq / jnp.maximum(jnp.sum(mf, axis=-1), 1.0))
  tgt = jnp.asarray(targets, jnp.int32)
  f = logits.astype(jnp.float32).at[..., mask_id].set(-jnp.inf)
  correct = (jnp.argmax(f, axis=-1) == tgt) & m
  aux = dict(ce_sum=jnp.sum(ce), num_masked=num_masked, per_seq=per_seq,
             accuracy=jnp.sum(correct) / jnp.maximum(num_masked, 1.0))
  return loss, aux
