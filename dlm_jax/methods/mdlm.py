"""MDLM as a method: masking forward process, SUBS, continuous-time NELBO, and SFT with standard
or TRIMS masking. Its maths is `dlm_jax.diffusion`; its decoders (ancestral, threshold, fixed_k)
are the masked family of `dlm_jax.sampling`."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dlm_jax.config import ConfigError
from dlm_jax.diffusion import masked as mdlm_lib
from dlm_jax.diffusion import schedules
from dlm_jax.diffusion.keys import example_keys, step_rows
from dlm_jax.methods.base import Method
from dlm_jax.models import output_head
from dlm_jax.models.transformer import DTYPES
from dlm_jax.trims import loss as trims_loss
from dlm_jax.trims import masks as trims_masks


def default_maskable(batch: dict[str, jax.Array], bos_id: int) -> jax.Array:
  """Positions the forward process may corrupt [B, L]: non-padding, except a document's BOS.

  SFT batches carry their own `maskable` (response positions only).
  """
  if "maskable" in batch:
    return batch["maskable"].astype(bool)
  seg, pos, tok = batch["segment_ids"], batch["positions"], batch["tokens"]
  return (seg > 0) & ~((pos == 0) & (tok == bos_id))


def head_budget(batch: int, length: int, time_sampling: str = "stratified") -> int:
  """Static number of positions the sparse output head scores on one device's `batch` rows.

  About half the tokens are masked. The masked count's variance is sum_b L t_b (1 - t_b)
  (about B L / 6) plus that of L sum_b t_b: L^2 / (12 B) for stratified t (independent
  offsets), at most L^2 / 12 for 'vdm', B L^2 / 12 for independent t ('iid', 'example').
  A device's rows hold strata spread over [0, 1) (`spread_order`), whose mean is within one
  row of 1/2: the budget adds L for that, then 5 standard deviations plus 32, rounded up to 64
  (overflow probability < 1e-6; an overflowing shard runs the dense head, so the loss stays
  exact).
  """
  n = batch * length
  var_t = {"stratified": length**2 / (12 * batch), "vdm": length**2 / 12}.get(
      time_sampling, batch * length**2 / 12)
  k = n / 2 + length + 5 * math.sqrt(n / 6 + var_t) + 32
  return min(n, int(-(-k // 64) * 64))


def spread_order(n: int) -> np.ndarray:
  """A fixed permutation of range(n) whose aligned contiguous blocks are spread evenly over [0, n).

  Row i of a batch gets stratum spread_order(n)[i] of the stratified times, so every device's
  contiguous block of rows sees small and large t alike (its masked count, and so the per-device
  budget of the sparse head, stays near half its tokens), whatever the device count. It is the
  mixed-radix digit reversal of i with the odd prime factors of n as the lowest digits and the
  2s above them (for a power of two: the bit reversal): a block of b rows, with b = n / (a power
  of two), gets strata n / b apart.
  """
  radices, m = [], n
  for p in range(3, int(math.isqrt(max(n, 1))) + 2, 2):
    while m % p == 0:
      radices.append(p)
      m //= p
  if m > 1 and m % 2:
    radices.append(m)
    m = 1
  while m > 1 and m % 2 == 0:
    radices.append(2)
    m //= 2
  i = np.arange(n)
  out = np.zeros(n, np.int64)
  weight = n
  for r in radices:  # digit t (radix r_t, least significant first) gets weight prod_{s > t} r_s
    weight //= r
    out += (i % r) * weight
    i //= r
  return out


class MDLM(Method):
  """Masked diffusion LM (arXiv 2406.07524) with optional TRIMS masking for SFT."""

  name = "mdlm"
  family = "masked"
  default_decoder = "ancestral"

  @classmethod
  def check_config(cls, config: ml_collections.ConfigDict) -> None:
    super().check_config(config)
    if config.trims.weighting == "uniform" and config.diffusion.normalize == "sum":
      raise ConfigError("config.diffusion.normalize='sum' does not apply to trims.weighting="
                        "'uniform' (a mean CE over masked slots); use 'token' or 'sequence'.")

  def __init__(self, config: ml_collections.ConfigDict, ids):
    super().__init__(config, ids)
    d = config.diffusion
    self.schedule = schedules.get_schedule(d.schedule, d.eps)

  # -- corruption ----------------------------------------------------------------------------
  def corrupt(self, batch: dict[str, jax.Array], key: jax.Array):
    """Draws t and masks for a global batch.

    Every draw but the stratified/vdm/iid t of the 'random' law comes from the per-example key
    fold_in(fold_in(key, 1), example_id) (`key` is already folded with the step), so masks do not
    depend on device count, sharding or the order of the rows.

    Args:
      batch: tokens / positions / segment_ids [B, L], example_id [B]; optional maskable [B, L]
        (SFT: response slots) and buckets [B, L] int (TRIMS: 1 = hardest .. K, 0 = never mask),
        already in the order of config.trims.masking (see `trims.masks.masking_for`).
      key: the step's key.

    Returns:
      (xt [B, L] int32, is_masked [B, L] bool, t [B] float32, maskable [B, L] bool).
    """
    d, tr = self.config.diffusion, self.config.trims
    tokens = batch["tokens"]
    b = tokens.shape[0]
    maskable = default_maskable(batch, self.ids.bos)
    ex_keys = example_keys(jax.random.fold_in(key, 1), batch["example_id"])
    if trims_masks.masking_for(tr.masking).law == "standard":
      if d.time_sampling == "example":
        t = jax.vmap(lambda k: jax.random.uniform(
            jax.random.fold_in(k, 7), (), jnp.float32, d.t_min, 1.0))(ex_keys)
      else:
        # Stratified over the update's global batch (a micro-batch of gradient accumulation
        # draws its rows' strata of it), strata spread over the rows so that every device's rows
        # cover [0, 1) (see `spread_order`).
        index, n = step_rows(batch, self.config.train.global_batch_size)
        if d.time_sampling in ("stratified", "vdm"):
          index = jnp.asarray(spread_order(n))[index]
        t = mdlm_lib.sample_times(jax.random.fold_in(key, 0), b, d.t_min, d.time_sampling,
                                  global_batch=n, index=index)
      xt, is_masked = mdlm_lib.forward_mask(ex_keys, tokens, t, maskable, self.schedule,
                                            self.ids.mask)
      return xt, is_masked, t, maskable
    if "buckets" not in batch:
      raise ValueError(f"config.trims.masking={tr.masking!r} needs per-token difficulty "
                       "buckets in the data (run `python -m dlm_jax.score_difficulty` and set "
                       "config.data.path to its output).")
    mask, _, t = trims_masks.trims_mask_batch(
        ex_keys, batch["buckets"].astype(jnp.int32), tr.num_buckets,
        p_context=tr.p_context, p_future=tr.p_future, k_law=tr.k_law, t_min=d.t_min)
    is_masked = mask & maskable
    return jnp.where(is_masked, self.ids.mask, tokens), is_masked, t, maskable

  # -- training --------------------------------------------------------------------------------
  def train_loss(self, params, batch, key, train=True):
    """Loss of one global batch.

    trims.weighting='inv_t' (default, pretraining): the NELBO estimate w(t) sum CE with
    config.diffusion.normalize over maskable slots (arm S: 'sequence'). trims.weighting='uniform'
    (TRIMS default, and the S-u control with masking='random'): the uniformly weighted masked CE
    of `trims.loss.sft_loss` with config.diffusion.normalize ('token': mean over the masked slots
    of the global batch), no 1/t.
    """
    d, weighting = self.config.diffusion, self.config.trims.weighting
    xt, is_masked, t, maskable = self.corrupt(batch, key)
    dropout_key = jax.random.fold_in(key, 2) if train else None
    if weighting != "uniform" and d.normalize == "token":
      if head_budget(xt.shape[0], xt.shape[1], d.time_sampling) < xt.size:
        budget = functools.partial(head_budget, time_sampling=d.time_sampling)
        return self._sparse_head_loss(params, batch, xt, is_masked & maskable, t, maskable,
                                      dropout_key, budget)
    logits, _ = self.apply(params, xt, batch["positions"], batch["segment_ids"], t, dropout_key)
    valid_count = jnp.maximum(jnp.sum(maskable.astype(jnp.float32)), 1.0)
    if weighting == "uniform":
      loss, aux = trims_loss.sft_loss(logits, batch["tokens"], is_masked, self.ids.mask,
                                      d.normalize)
      metrics = dict(loss=loss, masked_ce=aux["ce_sum"] / jnp.maximum(aux["num_masked"], 1.0),
                     masked_frac=aux["num_masked"] / valid_count, mean_t=jnp.mean(t))
      if d.normalize == "token":
        metrics["loss_weight"] = aux["num_masked"]
      return loss, metrics
    loss, aux = mdlm_lib.mdlm_loss(logits, batch["tokens"], is_masked, t, self.schedule,
                                   maskable, self.ids.mask, d.normalize)
    nelbo_tok = aux["nll_sum"] / jnp.maximum(aux["token_count"], 1.0)
    metrics = dict(loss=loss, nelbo=nelbo_tok, bits_per_token=nelbo_tok / jnp.log(2.0),
                   masked_frac=aux["masked_count"] / jnp.maximum(aux["token_count"], 1.0))
    if d.normalize == "token":
      metrics["loss_weight"] = aux["token_count"]
    return loss, metrics

  def _sparse_head_loss(self, params, batch, xt, scored, t, maskable, dropout_key, budget):
    """The NELBO with the V-wide output head run only on (up to `budget`) masked positions.

    The loss reads masked slots only, and with stratified t about half the tokens are masked,
    so this skips about half of the head's matmul and softmax (the largest cost at V = 50k).
    The head and its cross-entropy are fused (`output_head.masked_head_nll`): it selects the
    masked slots of each device's own rows (`budget(local_rows, L)` per device), runs the head
    in chunks of rows, never keeps the logits for the backward pass, and runs the dense head on a
    device whose masked slots exceed its budget, so the result is always the exact loss.
    `dense_head` counts those devices.
    """
    h, _ = self.apply(params, xt, batch["positions"], batch["segment_ids"], t, dropout_key,
                      features_only=True)
    if self.model_cfg.tie_embeddings:
      kernel = params["embed"]["embedding"].T / math.sqrt(self.model_cfg.d_model)
      bias = None
    else:
      kernel, bias = params["head"]["kernel"], params["head"]["bias"]
    weights = jnp.where(scored, self.schedule.weight(t)[:, None], 0.0)
    nll_sum, overflow = output_head.masked_head_nll_and_overflow(
        h, kernel, bias, batch["tokens"], weights, budget, self.ids.mask,
        DTYPES[self.model_cfg.dtype])
    count = jnp.sum(scored.astype(jnp.int32))
    maskable_count = jnp.sum(maskable.astype(jnp.float32))
    token_count = jnp.maximum(maskable_count, 1.0)
    loss = nll_sum / token_count
    return loss, dict(loss=loss, nelbo=loss, bits_per_token=loss / jnp.log(2.0),
                      masked_frac=count / token_count,
                      dense_head=jax.lax.stop_gradient(overflow),
                      loss_weight=maskable_count)

  def eval_sums(self, params, batch, key):
    maskable = default_maskable(batch, self.ids.bos)

    def logits_fn(xt):
      return self.apply(params, xt, batch["positions"], batch["segment_ids"], None)[0]

    per_seq = mdlm_lib.nelbo(logits_fn, batch["tokens"], maskable, key, self.schedule,
                             self.ids.mask, num_t=self.config.diffusion.eval_num_t,
                             t_min=self.config.diffusion.t_min)
    return dict(nll_sum=jnp.sum(per_seq), token_count=jnp.sum(maskable.astype(jnp.float32)))
