"""DID (Deletion-Insertion Diffusion, arXiv 2603.23507) as a method: deletion noise, packed survivors,
DP targets, DISE/DICE losses, NELBO, tau-leaping insertion sampling.

What the denoiser sees. Each document (segment) of a data row becomes [BOS] + x_t, where x_t is what
survives of its tokens after deletion (special ids BOS/PAD/MASK are never part of x0). A continuation
segment (a document cut by the packer, so without its own BOS) gets a BOS too: every segment the model
sees starts with BOS at position 0, exactly like a sample being generated. Output row r of a segment is
the gap right after its input token r; its scores are token logits (V columns, special ids -inf) plus one
aux scalar per row (`Transformer(aux_outputs=1)`):
  - `did_variant='variable'` (DISE): count-softmax head, time input (one t per token, since a packed row
    holds documents noised at different times);
  - `did_variant='fixed'` (DICE): seqnorm head (row softmax within each segment, total mass n - m), no
    time input; sampling then fills `capacity` tokens and reuses scores while a sample's length is unchanged.

Why training is cheap (`did_pack=True`). The survivors of input rows 2k and 2k+1 are compacted into ONE
model row of `did_pack_len` slots (auto: seq_len + max(seq_len/8, 3 sqrt(seq_len/2) + 4), rounded up to 8),
with segment ids, so the model runs on B/2 rows of ~1.1-1.25 L tokens instead of B rows of L. To make the
pair fit, the two rows get antithetic times: t_a = t_min + (1 - t_min) s_k and t_b = t_min + (1 - t_min)
(1 - s_k) with s_k stratified over the B/2 pairs, so alpha(t_a) + alpha(t_b) = 1 - t_min and a pair's
expected survivors are about one row. Each row's t is still marginally U[t_min, 1] (unbiased loss).
Overflow fallback (a pair whose survivors + BOS slots exceed the row): the pair's stream is cut at the first
event that does not fit, and the cut applies to x0 too (the tail of the last document leaves this step's
loss for both the clean and the noised sequence), so x_t stays a subsequence of the x0 it is scored
against. Metrics `overflow_tokens` / `overflow_rows` count it. With `did_pack=False` each row is one model
row of seq_len + 1 slots (the cost of MDLM plus one BOS).

Targets. The subsequence DP (`diffusion.did.log_insertion_weights`) runs once per MODEL row over
x0' = [S_1, x0_1, S_2, x0_2, ...] and x_t' = [S_1, xt_1, S_2, xt_2, ...] where S_j = -j are sentinel
ids that occur once in each: every embedding must map S_j to S_j, so the count factorises over
documents and the DP's posterior weights equal the per-document ones; gap g' of x_t' is model row g' - 1.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dlm_jax import config_lib
from dlm_jax.diffusion import did as did_lib
from dlm_jax.diffusion import mdlm as mdlm_lib
from dlm_jax.methods.base import Method, example_keys
from dlm_jax.models.transformer import TransformerConfig

Array = jax.Array


def auto_pack_len(seq_len: int) -> int:
  """Model row length for the survivors of 2 rows of `seq_len` (about 3 standard deviations of slack)."""
  extra = max(seq_len // 8, int(math.ceil(3.0 * math.sqrt(seq_len / 2.0))) + 4)
  return -(-(seq_len + extra) // 8) * 8


@dataclasses.dataclass(frozen=True)
class Layout:
  """Static shapes of the model rows built from data rows of length `seq_len`."""
  rows_per_model_row: int  # K: data rows whose survivors share one model row (1 or 2)
  model_len: int           # slots per model row (BOS slots included)
  dp_len: int              # slots of the DP's clean sequence x0' per model row (sentinels included)

  @classmethod
  def make(cls, seq_len: int, pack: bool, pack_len: int = 0) -> "Layout":
    if not pack:
      return cls(1, seq_len + 1, seq_len + 1)
    return cls(2, pack_len or auto_pack_len(seq_len), 2 * (seq_len + 1))


def pack_survivors(tokens: Array, segment_ids: Array, keep: Array, t: Array, special: Array,
                   layout: Layout, bos_id: int, pad_id: int) -> dict[str, Array]:
  """Builds model rows from the survivors of K data rows each, plus the matching DP inputs.

  Every data row contributes, in order, one event pair per position: a BOS slot where a segment starts
  (a sentinel in the DP sequences) and its token if it is content (x0) and kept (x_t). Events are
  cumulatively counted; everything from the first event that overflows `dp_len` (x0') or `model_len` (x_t')
  on is dropped from both, so the kept prefix is consistent.

  Args:
    tokens, segment_ids: int32 [B, L] data rows (segment id 0 = padding); B divisible by K.
    keep: bool [B, L] deletion draw (True = survives); only read on content tokens.
    t: float32 [B] diffusion time of each data row.
    special: bool [B, L] tokens that are never part of x0 (BOS, PAD, MASK ids).
    layout: static shapes; bos_id, pad_id: ids written into the model rows.

  Returns:
    dict with, for G = B / K model rows:
      tokens, segment_ids, positions: int32 [G, Lm] model input ([BOS] + x_t per segment, PAD elsewhere);
      t: float32 [G, Lm] time of each slot's document (1 on padding);
      t_rows: float32 [G, K] time of each source row; t_index: int32 [G, Lm] its source row (0 on
        padding), so the network's time conditioning runs K times per model row, not Lm times;
      n_missing: float32 [G, Lm] n - m of each slot's document;
      x0 [G, N'], x0_len [G], xt [G, Lm], xt_len [G]: DP inputs with sentinels -j for segment j;
      n_tokens [G] content tokens scored, kept [G] survivors placed, overflow_tokens [G] survivors cut,
      overflow_content [G] clean tokens cut.
  """
  k, lm, nd = layout.rows_per_model_row, layout.model_len, layout.dp_len
  b, length = tokens.shape
  g, w = b // k, k * length
  i32 = jnp.int32
  tok = tokens.reshape(g, w).astype(i32)
  seg = segment_ids.reshape(g, w)
  valid = seg > 0
  content = valid & ~special.reshape(g, w)
  kept = content & keep.reshape(g, w)
  tt = jnp.repeat(t.astype(jnp.float32), length).reshape(g, w)
  prev = jnp.concatenate([jnp.zeros((g, 1), seg.dtype), seg[:, :-1]], axis=1)
  row_start = (jnp.arange(w) % length == 0)[None, :]
  start = valid & (row_start | (seg != prev))
  mseg = jnp.cumsum(start.astype(i32), axis=1)  # 1-based segment index within the model row
  c0 = jnp.cumsum(start.astype(i32) + content.astype(i32), axis=1)
  ct = jnp.cumsum(start.astype(i32) + kept.astype(i32), axis=1)
  inc = (c0 <= nd) & (ct <= lm)  # a prefix of the event stream (both counts are non-decreasing)

  rows = jnp.broadcast_to(jnp.arange(g)[:, None], (g, w))
  x0_bos = jnp.where(inc & start, c0 - content - 1, nd)
  x0_tok = jnp.where(inc & content, c0 - 1, nd)
  xt_bos = jnp.where(inc & start, ct - kept - 1, lm)
  xt_tok = jnp.where(inc & kept, ct - 1, lm)
  sentinel = -mseg

  def put(shape, fill, dtype, writes):
    out = jnp.full(shape, fill, dtype)
    for pos, val in writes:
      out = out.at[rows, pos].set(jnp.asarray(val, dtype), mode="drop")
    return out

  x0 = put((g, nd), 0, i32, [(x0_bos, sentinel), (x0_tok, tok)])
  xt = put((g, lm), 0, i32, [(xt_bos, sentinel), (xt_tok, tok)])
  m_tok = put((g, lm), pad_id, i32, [(xt_bos, jnp.full_like(tok, bos_id)), (xt_tok, tok)])
  m_seg = put((g, lm), 0, i32, [(xt_bos, mseg), (xt_tok, mseg)])
  m_t = put((g, lm), 1.0, jnp.float32, [(xt_bos, tt), (xt_tok, tt)])
  src = jnp.broadcast_to((jnp.arange(w, dtype=i32) // length)[None, :], (g, w))
  m_src = put((g, lm), 0, i32, [(xt_bos, src), (xt_tok, src)])  # which of the k source rows
  is_bos = put((g, lm), False, bool, [(xt_bos, jnp.ones_like(start))])
  idx = jnp.arange(lm, dtype=i32)[None, :]
  first = jax.lax.cummax(jnp.where(is_bos, idx, 0), axis=1)
  m_pos = jnp.where(m_seg > 0, idx - first, 0)

  # n - m per (model row, segment), read back at each slot.
  nseg = w + 1
  gid = (rows * nseg + mseg).reshape(-1)
  n_seg = jax.ops.segment_sum((inc & content).reshape(-1).astype(jnp.float32), gid, num_segments=g * nseg)
  m_seg_count = jax.ops.segment_sum((inc & kept).reshape(-1).astype(jnp.float32), gid,
                                    num_segments=g * nseg)
  slot_gid = jnp.arange(g)[:, None] * nseg + m_seg
  n_missing = jnp.where(m_seg > 0, (n_seg - m_seg_count)[slot_gid], 0.0)

  count = lambda x: jnp.sum(x, axis=1).astype(i32)  # noqa: E731
  n_bos = count(inc & start)
  return dict(tokens=m_tok, segment_ids=m_seg, positions=m_pos, t=m_t, n_missing=n_missing,
              t_rows=t.astype(jnp.float32).reshape(g, k), t_index=m_src,
              x0=x0, x0_len=n_bos + count(inc & content), xt=xt, xt_len=n_bos + count(inc & kept),
              n_tokens=count(inc & content), kept=count(inc & kept),
              overflow_tokens=count(kept & ~inc), overflow_content=count(content & ~inc))


def antithetic_times(key: Array, num_pairs: int, t_min: float) -> Array:
  """t [2 P]: rows 2k, 2k+1 get t_min + (1 - t_min) s_k and t_min + (1 - t_min)(1 - s_k), s_k stratified."""
  s = mdlm_lib.sample_times(key, num_pairs, 0.0, "stratified")
  ta = t_min + (1.0 - t_min) * s
  tb = t_min + (1.0 - t_min) * (1.0 - s)
  return jnp.stack([ta, tb], axis=1).reshape(-1)


class DID(Method):
  """Deletion-insertion diffusion LM: the denoiser sees [BOS] + survivors and scores insertions per gap."""

  name = "did"
  extra_positions = 1  # the model input is [BOS] + x_t

  def __init__(self, config: ml_collections.ConfigDict, ids):
    d = config.diffusion
    self.variant = d.did_variant
    want_time = self.variant == "variable"
    if bool(config.model.time_conditioning) != want_time:
      raise config_lib.ConfigError(
          f"config.model.time_conditioning={config.model.time_conditioning} but "
          f"config.diffusion.did_variant={self.variant!r} needs {want_time} (the variable-length model "
          "takes t, the fixed-length seqnorm model does not); set both together.")
    super().__init__(config, ids)
    self.disallowed = tuple(sorted({ids.bos, ids.pad, ids.mask}))
    self.train_layout = Layout.make(config.data.seq_len, bool(d.did_pack), int(d.did_pack_len))
    self.eval_layout = Layout.make(config.data.seq_len, False)

  def model_config(self) -> TransformerConfig:
    cfg = TransformerConfig.from_config(self.config.model, self.ids.vocab_size)
    return dataclasses.replace(cfg, aux_outputs=1, causal=False,
                               time_conditioning=self.variant == "variable")

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
      return did_lib.count_softmax_head(logits, row, float(self.config.diffusion.did_max_log_count),
                                        self.disallowed)
    return did_lib.segment_seqnorm_head(logits, row, model["segment_ids"], model["n_missing"],
                                        self.disallowed)

  def _gap_losses(self, params, model, dropout_key=None) -> tuple[Array, Array]:
    """(DISE, DICE) per model slot [G, Lm], time weight applied, 0 on padding."""
    out = self.scores(params, model, dropout_key)
    _, logw = did_lib.log_insertion_weights(model["x0"], model["x0_len"], model["xt"], model["xt_len"])
    row_valid = model["segment_ids"] > 0
    s, cross, ent, rho = did_lib.gap_loss_terms(out, model["x0"], model["x0_len"], logw[:, :, 1:],
                                                row_valid)
    wt = jnp.where(row_valid, did_lib.loss_weight(jnp.maximum(model["t"], 1e-6)), 0.0)
    return wt * (s - cross + ent - rho), wt * (ent - cross)

  def corrupt(self, batch: dict[str, Array], key: Array, layout: Layout, t: Array | None = None
              ) -> dict[str, Array]:
    """Draws t (unless given) and deletions, packs the survivors into model rows (see module doc)."""
    d = self.config.diffusion
    tokens, seg = batch["tokens"], batch["segment_ids"]
    b, length = tokens.shape
    if t is None:
      if layout.rows_per_model_row == 2:
        t = antithetic_times(jax.random.fold_in(key, 0), b // 2, d.t_min)
      else:
        t = mdlm_lib.sample_times(jax.random.fold_in(key, 0), b, d.t_min, "stratified")
    ex_id = batch.get("example_id", jnp.arange(b, dtype=jnp.int32))
    keys = example_keys(jax.random.fold_in(key, 1), ex_id)
    u = jax.vmap(lambda k: jax.random.uniform(k, (length,), jnp.float32))(keys)
    keep = u < did_lib.survival(t, d.eps)[:, None]
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
    if d.normalize == "token":
      loss = total / jnp.maximum(n_tok, 1.0)
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
        overflow_rows=jnp.sum((model["overflow_content"] > 0).astype(jnp.float32)))
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
        return did_lib.count_softmax_head(logits, aux[..., 0],
                                          float(self.config.diffusion.did_max_log_count), self.disallowed)
      return did_lib.segment_seqnorm_head(logits, aux[..., 0], open_row.astype(jnp.int32), n_missing,
                                          self.disallowed)

    return fn

  def sample(self, params, key, sample_cfg, prompt=None) -> dict[str, Any]:
    """Tau-leaping insertions from [BOS] (+ prompt) in sample.num_steps steps, up to sample.capacity tokens.

    Returns tokens [B, capacity] (prompt + generated, pad_id past the length), lengths [B] (generated
    tokens), total_lengths [B] (prompt included), nfe [B], dropped [B] (insertions past capacity).
    """
    s = sample_cfg
    b = s.batch_size
    p_ids = np.zeros((b, 0), np.int32)
    if prompt is not None:
      p_ids = np.asarray(prompt, np.int32)
      if p_ids.ndim == 1:
        p_ids = np.tile(p_ids[None], (b, 1))
      if p_ids.shape[1] and np.all(p_ids[:, 0] == self.ids.bos):
        p_ids = p_ids[:, 1:]  # the sampler adds BOS itself
      if np.isin(p_ids, self.disallowed).any():
        raise ValueError("The prompt contains special ids (BOS/PAD/MASK) after its first token.")
    plen = p_ids.shape[1]
    cap = self._capacity(s, plen)
    run = self._compiled_sampler(int(s.num_steps), cap, plen)
    tokens, n_out, nfe, dropped = run(params, key, jnp.asarray(p_ids))
    return dict(tokens=tokens, lengths=n_out - plen, total_lengths=n_out, nfe=nfe, dropped=dropped,
                prompt_len=plen, gen_len=cap - plen)

  def _compiled_sampler(self, num_steps: int, capacity: int, prompt_len: int):
    from dlm_jax.sampling import did as did_sampling  # pylint: disable=g-import-not-at-top
    cache = self.__dict__.setdefault("_sampler_cache", {})
    ck = (num_steps, capacity, prompt_len)
    if ck not in cache:
      use_cache = self.variant == "fixed"  # no time input: scores change only with the length

      def run(params, key, prompt):
        fn = self.score_fn(params, capacity, prompt_len)
        return did_sampling.did_sample(fn, key, prompt.shape[0], num_steps, capacity, self.ids.bos,
                                       prompt=prompt if prompt_len else None, use_cache=use_cache,
                                       pad_id=self.ids.pad)

      cache[ck] = jax.jit(run)
    return cache[ck]

  def decode_samples(self, out: dict[str, Any], tokenizer: Any) -> list[str]:
    """Texts of variable-length samples: each row up to its length (special ids dropped by decode)."""
    toks = np.asarray(out["tokens"])
    lens = np.asarray(out["total_lengths"])
    return [tokenizer.decode([int(x) for x in row[:n]]) for row, n in zip(toks, lens)]
