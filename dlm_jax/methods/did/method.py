"""DID (Deletion-Insertion Diffusion, arXiv 2603.23507) as a method: deletion noise, packed survivors,
DP targets, DISE/DICE losses, NELBO; its decoder ("did": tau-leaping insertions) is `sampler.py`.

What the denoiser sees. Each document (segment) of a data row becomes [BOS] + x_t, where x_t is what
survives of its tokens after deletion (special ids BOS/PAD/MASK are never part of x0). A continuation
segment (a document cut by the packer, so without its own BOS) gets a BOS too: every segment the model
sees starts with BOS at position 0, exactly like a sample being generated. Output row r of a segment is
the gap right after its input token r; its scores are token logits (V columns, special ids -inf) plus one
aux scalar per row (`Transformer(aux_outputs=1)`):
  - `did.variant='variable'` (DISE): count-softmax head, time input (one t per token, since a packed row
    holds documents noised at different times);
  - `did.variant='fixed'` (DICE): seqnorm head (row softmax within each segment, total mass n - m), no
    time input; sampling then fills `capacity` tokens and reuses scores while a sample's length is unchanged.
How rows are packed and how the targets are computed: `packing.py`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dlm_jax.config import ConfigError
from dlm_jax.diffusion import masked
from dlm_jax.diffusion.keys import example_keys, step_rows
from dlm_jax.methods.base import Method
import dlm_jax.methods.did.dp as dp
import dlm_jax.methods.did.heads as heads
import dlm_jax.methods.did.head_loss as heads_loss
import dlm_jax.methods.did.loss as loss
import dlm_jax.methods.did.noise as noise
from dlm_jax.methods.did.packing import Layout, antithetic_times, pack_survivors
from dlm_jax.models.transformer import TransformerConfig

Array = jax.Array


class DID(Method):
  """Deletion-insertion diffusion LM: the denoiser sees [BOS] + survivors and scores insertions per gap."""

  name = "did"
  extra_positions = 1  # the model input is [BOS] + x_t

  family = "insertion"
  default_decoder = "did"
  summed_metrics = ("model_tokens", "model_real_tokens", "overflow_tokens", "overflow_rows")

  @classmethod
  def check_config(cls, config: ml_collections.ConfigDict) -> None:
    super().check_config(config)
    if config.did.pack:
      if not (config.did.pack_len == 0 or config.did.pack_len > config.data.seq_len):
        raise ConfigError(f"config.did.pack_len: must be 0 (auto) or longer than data.seq_len="
                          f"{config.data.seq_len}.")
      if config.train.global_batch_size % 2:
        raise ConfigError(
            f"config.train.global_batch_size: {config.train.global_batch_size} is odd: DID packing "
            "(did.pack) puts 2 rows in each model row; use an even batch or did.pack=False.")
      k = config.optim.grad_accum_steps
      if k > 1 and config.train.global_batch_size % (2 * k):
        raise ConfigError(
            f"config.optim.grad_accum_steps: the micro-batch of {config.train.global_batch_size}"
            f" / {k} rows is odd: DID packing (did.pack) puts 2 rows in each model row; use an "
            "even micro-batch or did.pack=False.")

  def __init__(self, config: ml_collections.ConfigDict, ids):
    d = config.did
    self.variant = d.variant
    want_time = self.variant == "variable"
    if bool(config.model.time_conditioning) != want_time:
      raise ConfigError(
          f"config.model.time_conditioning={config.model.time_conditioning} but "
          f"config.did.variant={self.variant!r} needs {want_time} (the variable-length model "
          "takes t, the fixed-length seqnorm model does not); set both together.")
    super().__init__(config, ids)
    self.disallowed = tuple(sorted({ids.bos, ids.pad, ids.mask}))
    self.train_layout = Layout.make(config.data.seq_len, bool(d.pack), int(d.pack_len))
    self.row_group = self.train_layout.rows_per_model_row  # a packed pair stays in one micro-batch
    self.eval_layout = Layout.make(config.data.seq_len, False)

  def model_config(self) -> TransformerConfig:
    cfg = TransformerConfig.from_config(self.config.model, self.ids.vocab_size)
    return dataclasses.replace(cfg, aux_outputs=1, causal=False,
                               time_conditioning=self.variant == "variable")

  def train_model_shape(self, batch_size: int) -> tuple[int, int]:
    """Packed: the survivors of K data rows share one model row of `train_layout.model_len` slots."""
    lay = self.train_layout
    return batch_size // lay.rows_per_model_row, lay.model_len

  # -- pieces ----------------------------------------------------------------------------------
  def _special(self, tokens: Array) -> Array:
    return jnp.isin(tokens, jnp.asarray(self.disallowed, jnp.int32))

  def _check_batch(self, batch: dict[str, Array]) -> None:
    for k in ("tokens", "segment_ids"):
      if k not in batch:
        raise ValueError(f"DID needs batch[{k!r}] ([B, L] int32); got keys {sorted(batch)}.")
    if "maskable" in batch:
      raise ValueError("DID trains unconditional models: batches with 'maskable' (SFT prompt/response "
                       "rows) are not supported; use method 'mdlm' for SFT data.")
    shape = batch["tokens"].shape
    if len(shape) != 2 or batch["segment_ids"].shape != shape:
      raise ValueError(f"tokens and segment_ids must be [B, L] of one shape; got {shape} and "
                       f"{batch['segment_ids'].shape}.")
    if shape[1] != self.config.data.seq_len:
      raise ValueError(f"batch length {shape[1]} != config.data.seq_len={self.config.data.seq_len}.")

  def scores(self, params: Any, model: dict[str, Array], dropout_key: Array | None = None) -> Array:
    """Insertion log-scores [G, Lm, V] of model rows (row r = gap after input token r)."""
    # One time per source row, indexed per slot: the adaLN projections run k times per model row.
    logits, aux = self.apply(params, model["tokens"], model["positions"], model["segment_ids"],
                             model["t_rows"], dropout_key, t_index=model["t_index"])
    row = aux[..., 0]
    if self.variant == "variable":
      return heads.count_softmax_head(logits, row, float(self.config.did.max_log_count),
                                        self.disallowed)
    return heads.segment_seqnorm_head(logits, row, model["segment_ids"], model["n_missing"],
                                        self.disallowed)

  def _gap_losses(self, params, model, dropout_key=None) -> tuple[Array, Array]:
    """(DISE, DICE) per model slot [G, Lm], time weight applied, 0 on padding.

    The V-wide part (head, heads.py, loss terms) runs on chunks of model rows of each device's
    own rows (`_chunked_gap_losses`), so no [rows, Lm, V] float32 tensor exists at once.
    """
    h, _ = self.apply(params, model["tokens"], model["positions"], model["segment_ids"],
                      model["t_rows"], dropout_key, features_only=True, t_index=model["t_index"])
    _, logw = dp.log_insertion_weights(model["x0"], model["x0_len"], model["xt"], model["xt_len"])
    logw = jax.lax.stop_gradient(logw[:, :, 1:])
    row_valid = model["segment_ids"] > 0
    wt = jnp.where(row_valid, noise.loss_weight(jnp.maximum(model["t"], 1e-6)), 0.0)
    return heads_loss.chunked_gap_losses(
        self._head_params(params), h, dict(model, logw=logw, wt=wt), self._head_loss_one)

  def _head_params(self, params) -> dict[str, Any]:
    """The head's parameters: token projection (untied or the scaled embedding) and the row head."""
    cfg = self.model_cfg
    if cfg.tie_embeddings:
      kernel, bias = params["embed"]["embedding"].T / np.sqrt(cfg.d_model), None
    else:
      kernel, bias = params["head"]["kernel"], params["head"]["bias"]
    return dict(kernel=kernel, bias=bias, aux_kernel=params["aux_head"]["kernel"],
                aux_bias=params["aux_head"]["bias"])

  def _head_loss_one(self, hp, h, m) -> tuple[Array, Array]:
    """(DISE, DICE) [c, Lm] of a chunk of model rows from their hidden states h [c, Lm, d]."""
    dtype = h.dtype
    logits = jnp.einsum("cld,dv->clv", h, hp["kernel"].astype(dtype),
                        preferred_element_type=jnp.float32)
    if hp["bias"] is not None:
      logits = logits + hp["bias"].astype(jnp.float32)
    row = (jnp.einsum("cld,da->cla", h.astype(jnp.float32), hp["aux_kernel"]) + hp["aux_bias"])[..., 0]
    if self.variant == "variable":
      out = heads.count_softmax_head(logits, row, float(self.config.did.max_log_count),
                                     self.disallowed)
    else:
      out = heads.segment_seqnorm_head(logits, row, m["segment_ids"], m["n_missing"],
                                       self.disallowed)
    row_valid = m["segment_ids"] > 0
    s, cross, ent, rho = loss.gap_loss_terms(out, m["x0"], m["x0_len"], m["logw"], row_valid)
    return m["wt"] * (s - cross + ent - rho), m["wt"] * (ent - cross)

  def corrupt(self, batch: dict[str, Array], key: Array, layout: Layout, t: Array | None = None
              ) -> dict[str, Array]:
    """Draws t (unless given) and deletions, packs the survivors into model rows (see module doc)."""
    d = self.config.diffusion
    tokens, seg = batch["tokens"], batch["segment_ids"]
    b, length = tokens.shape
    if t is None:
      # Strata over the update's global batch (a micro-batch draws its rows' strata of it).
      index, n = step_rows(batch, self.config.train.global_batch_size)
      if layout.rows_per_model_row == 2:
        t = antithetic_times(jax.random.fold_in(key, 0), b // 2, d.t_min,
                             pair_index=index[0::2] // 2, num_pairs_total=n // 2)
      else:
        t = masked.sample_times(jax.random.fold_in(key, 0), b, d.t_min, "stratified",
                                global_batch=n, index=index)
    ex_id = batch.get("example_id", jnp.arange(b, dtype=jnp.int32))
    keys = example_keys(jax.random.fold_in(key, 1), ex_id)
    u = jax.vmap(lambda k: jax.random.uniform(k, (length,), jnp.float32))(keys)
    keep = u < noise.survival(t, d.eps)[:, None]
    return pack_survivors(tokens, seg, keep, t, self._special(tokens), layout, self.ids.bos, self.ids.pad)

  # -- interface -------------------------------------------------------------------------------
  def train_loss(self, params, batch, key, train=True):
    self._check_batch(batch)
    d = self.config.diffusion
    model = self.corrupt(batch, key, self.train_layout)
    dropout_key = jax.random.fold_in(key, 2) if train else None
    dise, dice = self._gap_losses(params, model, dropout_key)
    total = jnp.sum(dise if self.variant == "variable" else dice)
    n_tok = jnp.sum(model["n_tokens"]).astype(jnp.float32)
    b = batch["tokens"].shape[0]
    extra = {}
    if d.normalize == "token":
      loss = total / jnp.maximum(n_tok, 1.0)
      extra["loss_weight"] = n_tok  # gradient accumulation weighs micro-batches by it
    elif d.normalize == "sequence":
      loss = total / b
    else:
      loss = total
    nelbo = jnp.sum(dise) / jnp.maximum(n_tok, 1.0)
    lay = self.train_layout
    g = b // lay.rows_per_model_row
    real = jnp.sum((model["segment_ids"] > 0).astype(jnp.float32))
    metrics = dict(
        loss=loss, nelbo=nelbo, bits_per_token=nelbo / jnp.log(2.0),
        kept_frac=jnp.sum(model["kept"]) / jnp.maximum(n_tok, 1.0),
        model_tokens=jnp.float32(g * lay.model_len),            # what the network processed (static)
        model_real_tokens=real,                                 # non-padding model slots
        model_tokens_ratio=jnp.float32(g * lay.model_len / (b * batch["tokens"].shape[1])),
        overflow_tokens=jnp.sum(model["overflow_tokens"]).astype(jnp.float32),
        overflow_rows=jnp.sum((model["overflow_content"] > 0).astype(jnp.float32)), **extra)
    return loss, metrics

  def eval_sums(self, params, batch, key):
    """NELBO sums: eval_num_t stratified t-draws per row (unpacked), nats; token_count excludes BOS."""
    self._check_batch(batch)
    d = self.config.diffusion
    b = batch["tokens"].shape[0]
    num_t = int(d.eval_num_t)

    def one_draw(j):
      kj = jax.random.fold_in(key, j)
      u = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(kj, i)))(jnp.arange(b))
      t = d.t_min + (1.0 - d.t_min) * (j + u) / num_t
      model = self.corrupt(batch, kj, self.eval_layout, t=t)
      dise, _ = self._gap_losses(params, model)
      return jnp.sum(dise), jnp.sum(model["n_tokens"]).astype(jnp.float32)

    nll, cnt = jax.lax.map(one_draw, jnp.arange(num_t))
    return dict(nll_sum=jnp.sum(nll) / num_t, token_count=cnt[0])

  def insertion_mass(self, params, batch, key, t: Array) -> dict[str, Array]:
    """The count head's calibration data: predicted total insertion mass against the true n - m.

    Each row of `batch` (one document per row, as in evaluation) is noised at its own time t [B]; the
    prediction is sum_{r <= m, v} exp(out[r, v]) of the model's scores on [BOS] + x_t. A calibrated head
    matches E[n - m | x_t, t] on average (the seqnorm head matches n - m by construction).

    Returns:
      pred [B] predicted mass, missing [B] true n - m, n [B] clean length, m [B] survivors (float32).
    """
    self._check_batch(batch)
    model = self.corrupt(batch, key, self.eval_layout, t=jnp.asarray(t, jnp.float32))
    out = self.scores(params, model)
    row_valid = (model["segment_ids"] > 0)[:, :, None]
    pred = jnp.sum(jnp.where(row_valid & jnp.isfinite(out), jnp.exp(out), 0.0), axis=(1, 2))
    n = model["n_tokens"].astype(jnp.float32)
    m = model["kept"].astype(jnp.float32)
    return dict(pred=pred, missing=n - m, n=n, m=m)

  # -- sampling --------------------------------------------------------------------------------
  def _capacity(self, s: ml_collections.ConfigDict, prompt_len: int) -> int:
    cap = int(s.capacity) or (prompt_len + int(s.gen_len) if s.gen_len else self.config.data.seq_len)
    if cap + 1 > self.model_cfg.max_len:
      raise ValueError(f"sample.capacity={cap} (+1 for BOS) is longer than model.max_len="
                       f"{self.model_cfg.max_len}.")
    if prompt_len >= cap:
      raise ValueError(f"The prompt has {prompt_len} tokens but sample.capacity={cap}; raise "
                       "sample.capacity (the maximum length, prompt included).")
    return cap

  def score_fn(self, params: Any, capacity: int, prompt_len: int = 0):
    """(tokens [B, C+1], lengths [B] incl. BOS, t [B]) -> insertion log-scores [B, C+1, V]."""

    def fn(tokens, lengths, t):
      b, r = tokens.shape
      idx = jnp.arange(r, dtype=jnp.int32)[None, :]
      live = idx < lengths[:, None]
      seg = live.astype(jnp.int32)
      pos = jnp.broadcast_to(idx, (b, r))
      open_row = live & (idx >= prompt_len)  # gaps inside [BOS] + prompt take no insertions
      n_missing = jnp.broadcast_to((capacity - (lengths - 1)).astype(jnp.float32)[:, None], (b, r))
      logits, aux = self.apply(params, tokens, pos, seg, t)
      if self.variant == "variable":
        return heads.count_softmax_head(logits, aux[..., 0],
                                          float(self.config.did.max_log_count), self.disallowed)
      return heads.segment_seqnorm_head(logits, aux[..., 0], open_row.astype(jnp.int32), n_missing,
                                          self.disallowed)

    return fn

  def split_score_fn(self, params: Any, capacity: int, prompt_len: int = 0):
    """`score_fn` split for the fast decoder: (features, token_log_probs).

    features(tokens [B, C+1], lengths [B] incl. BOS, t [B], open_rows [B, C+1] bool or None)
      -> (h [B, C+1, d], log_mass [B, C+1] float32), log_mass[r] = log sum_v exp(score[r, v]),
      the row's insertion mass (computed by the method's head on a one-column vocabulary, so it
      follows the head's formula); open_rows (default: rows after the prompt) are the gaps that
      may receive insertions.
    token_log_probs(h [K, d]) -> [K, V] float32, score[r, v] - log_mass[r]: the head's token
      distribution (special ids -inf).
    So score[r, v] = log_mass[r] + token_log_probs(h[r])[v], what `score_fn` gives on open rows.
    """
    head = self.head_fn(params)
    aux_kernel, aux_bias = params["aux_head"]["kernel"], params["aux_head"]["bias"]
    max_log = float(self.config.did.max_log_count)
    disallowed = self.disallowed

    def features(tokens, lengths, t, open_rows=None):
      b, r = tokens.shape
      idx = jnp.arange(r, dtype=jnp.int32)[None, :]
      live = idx < lengths[:, None]
      seg = live.astype(jnp.int32)
      pos = jnp.broadcast_to(idx, (b, r))
      opened = (idx >= prompt_len) if open_rows is None else open_rows
      open_row = live & opened
      h, _ = self.apply(params, tokens, pos, seg, t, features_only=True)
      row = (jax.lax.dot_general(h.astype(jnp.float32), aux_kernel.astype(jnp.float32),
                                 (((2,), (0,)), ((), ())))
             + aux_bias.astype(jnp.float32)).astype(jnp.float32)[..., 0]
      one_column = jnp.zeros((b, r, 1), jnp.float32)
      if self.variant == "variable":
        log_mass = heads.count_softmax_head(one_column, row, max_log, ())[..., 0]
      else:
        n_missing = jnp.broadcast_to((capacity - (lengths - 1)).astype(jnp.float32)[:, None],
                                     (b, r))
        log_mass = heads.segment_seqnorm_head(one_column, row, open_row.astype(jnp.int32),
                                              n_missing, ())[..., 0]
      return h, log_mass

    def token_log_probs(h_rows):
      logits = head(h_rows)
      return heads._token_log_softmax(logits[None], disallowed)[0]  # pylint: disable=protected-access

    return features, token_log_probs

  def decode_samples(self, out: dict[str, Any], tokenizer: Any) -> list[str]:
    """Texts of variable-length samples: each row up to its length (special ids dropped by decode)."""
    toks = np.asarray(out["tokens"])
    lens = np.asarray(out["total_lengths"])
    return [tokenizer.decode([int(x) for x in row[:n]]) for row, n in zip(toks, lens)]
