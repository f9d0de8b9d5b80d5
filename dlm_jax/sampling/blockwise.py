"""Blockwise semi-autoregressive decoding (LLaDA fixed-k, Fast-dLLM threshold, R²-dLLM).

State: tokens = [prompt, G masks]. The G generated slots form G / block_len blocks decoded
left to right. Every forward pass sees the whole sequence, but only masked slots of a sample's
active block (its first block that still has a mask) may be committed. Per pass and candidate
slot: yhat = argmax over non-mask ids (temperature 0) and c = softmax probability of yhat with
the mask column removed.

The whole decode is one `lax.while_loop`; samples progress independently (each has its own
active block), a pass counts as one NFE only for samples it updates, a sample with no mask left
stops counting, an already full block never costs a pass, and committed tokens never change.

`logits_fn(tokens [B, L] int32) -> logits [B, L, V]` is a closure made by the caller (model
and parameters). The decoders are jittable: wrap them as
`jax.jit(lambda p: decode_threshold(fn, p, gen_len=..., ...))` with Python settings fixed.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from dlm_jax.config import ConfigError
import dlm_jax.sampling.r2 as r2_lib
from dlm_jax.sampling import sparse
from dlm_jax.sampling.common import DecodeResult, MaskedLayout, categorical_f64, categorical_inverse_cdf
from dlm_jax.sampling.decoders import masked_decoder, register

LogitsFn = Callable[[jax.Array], jax.Array]


def num_transfer_tokens(n_masked: jax.Array, steps: int) -> jax.Array:
  """LLaDA fixed-k schedule: n_j = floor(m / S) + 1[j < m mod S] for j < S.

  Args:
    n_masked: [B] int masked slots m at block start.
    steps: passes S for the block.

  Returns:
    [B, steps] int32, each row summing to m.
  """
  if steps < 1:
    raise ValueError(f"num_transfer_tokens: steps must be >= 1, got {steps}")
  m = jnp.asarray(n_masked, jnp.int32)
  j = jnp.arange(steps, dtype=jnp.int32)
  return (m[..., None] // steps + (j < (m[..., None] % steps)).astype(jnp.int32)).astype(jnp.int32)


def _check_lengths(prompt_tokens, gen_len: int, block_len: int) -> None:
  if prompt_tokens.ndim != 2:
    raise ValueError(f"prompt_tokens must be [B, P], got shape {prompt_tokens.shape}")
  if block_len < 1:
    raise ValueError(f"block_len must be >= 1, got {block_len}")
  if gen_len < 1 or gen_len % block_len:
    raise ValueError(f"gen_len ({gen_len}) must be a positive multiple of block_len ({block_len})")


def _block_slice(x: jax.Array, start: jax.Array, size: int) -> jax.Array:
  """Per-row dynamic slice: x [B, N, ...], start [B] -> [B, size, ...]."""
  def one(row, s):
    starts = (s,) + (jnp.zeros((), s.dtype),) * (row.ndim - 1)  # one index dtype under x64
    return jax.lax.dynamic_slice(row, starts, (size,) + row.shape[1:])
  return jax.vmap(one)(x, start)


def _block_update(x: jax.Array, upd: jax.Array, start: jax.Array) -> jax.Array:
  """Per-row dynamic update: x [B, N, ...] with upd [B, size, ...] at start [B]."""
  def one(row, u, s):
    starts = (s,) + (jnp.zeros((), s.dtype),) * (row.ndim - 1)  # one index dtype under x64
    return jax.lax.dynamic_update_slice(row, u, starts)
  return jax.vmap(one)(x, upd, start)


def _rows_take(x: jax.Array, pos: jax.Array) -> jax.Array:
  """x [B, L, ...] at per-row positions pos [B, K] (clamped) -> [B, K, ...]."""
  pos = jnp.minimum(pos, x.shape[1] - 1)
  return jax.vmap(lambda row, p: jnp.take(row, p, axis=0))(x, pos)


def _rows_set(x: jax.Array, pos: jax.Array, values: jax.Array) -> jax.Array:
  """x [B, L] with x[b, pos[b, k]] = values[b, k]; positions >= L are dropped."""
  return jax.vmap(lambda row, p, v: row.at[p].set(v, mode="drop"))(x, pos, values)


# (tokens [B, L], active [B], pos [B, Lb], m0 [B, Lb], pass index) -> (yhat, conf) [B, Lb]
PredictFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array],
                     tuple[jax.Array, jax.Array]]


def _reference_predict(logits_fn: LogitsFn, mask_id: int, temperature: float,
                       key: jax.Array) -> PredictFn:
  """yhat and c of the active block from the full [B, L, V] logits (the reference path)."""

  def predict(tokens, active, pos, m0, it):
    del active, m0
    logits = logits_fn(tokens)  # [B, L, V]
    blogits = _rows_take(logits, pos).astype(jnp.float32)  # [B, Lb, V]
    blogits = blogits.at[..., mask_id].set(-jnp.inf)
    logp = jax.nn.log_softmax(blogits, axis=-1)
    if temperature > 0.0:
      yhat = categorical_f64(jax.random.fold_in(key, it), blogits / temperature)
    else:
      yhat = jnp.argmax(logp, axis=-1).astype(jnp.int32)
    conf = jnp.exp(jnp.take_along_axis(logp, yhat[..., None], axis=-1)[..., 0])  # [B, Lb]
    return yhat, conf

  return predict


def _fast_predict(denoiser: sparse.Denoiser, valid: jax.Array, mask_id: int, temperature: float,
                  key: jax.Array, budget: int) -> PredictFn:
  """yhat and c of the active block with the head only at its masked slots (the fast path).

  The trunk runs for the samples still decoding (gathered into a sub-batch); the head, its
  softmax and argmax run on the masked slots of each sample's active block, `budget` rows at a
  time.
  """

  def predict(tokens, active, pos, m0, it):
    b, length = tokens.shape
    lb = pos.shape[1]
    h0 = jax.eval_shape(denoiser.features, tokens, valid)
    h = sparse.refresh_rows(lambda inp: denoiser.features(*inp).astype(h0.dtype),
                            (tokens, valid), active, jnp.zeros(h0.shape, h0.dtype))
    h_flat = h.reshape(b * length, -1)
    rows_pos = (jnp.arange(b, dtype=jnp.int32)[:, None] * length
                + jnp.minimum(pos, length - 1)).reshape(-1)  # [B * Lb] flat positions
    n = b * lb

    def body(c, idx, ok, carry):
      yhat, conf = carry
      src = jnp.take(rows_pos, jnp.minimum(idx, n - 1))
      logits = denoiser.head(jnp.take(h_flat, src, axis=0)).astype(jnp.float32)  # [K, V]
      logits = logits.at[:, mask_id].set(-jnp.inf)
      logp = jax.nn.log_softmax(logits, axis=-1)
      if temperature > 0.0:
        y = categorical_inverse_cdf(jax.random.fold_in(jax.random.fold_in(key, it), c),
                                    logits / temperature)
      else:
        y = jnp.argmax(logp, axis=-1).astype(jnp.int32)
      cf = jnp.exp(jnp.take_along_axis(logp, y[:, None], axis=-1)[:, 0])
      dst = jnp.where(ok, idx, n)
      return (yhat.at[dst].set(y, mode="drop"), conf.at[dst].set(cf, mode="drop"))

    init = (jnp.zeros((n,), jnp.int32), jnp.zeros((n,), jnp.float32))
    yhat, conf = sparse.for_selected_rows(m0.reshape(-1), budget, body, init)
    return yhat.reshape(b, lb), conf.reshape(b, lb)

  return predict


def _decode_slots(predict: PredictFn, tokens0: jax.Array, gen_pos: jax.Array, gen_ok: jax.Array,
                  block_len: int, mask_id: int, policy: str, *, steps_per_block: int = 0,
                  tau: float = 0.9, key: Optional[jax.Array] = None,
                  r2: Optional[r2_lib.R2Config] = None, max_passes: Optional[int] = None
                  ) -> DecodeResult:
  """Shared decode loop over generated slots; `policy` is "fixed_k" or "threshold".

  Args:
    predict: gives yhat and c for the slots of each sample's active block.
    tokens0: [B, L] int32 start (mask_id at the slots to generate).
    gen_pos: [B, G] int32 positions of the generated slots in decoding order (blocks of
      `block_len` consecutive entries); entries with gen_ok False are ignored.
    gen_ok: [B, G] bool.
  """
  b, g = gen_pos.shape
  lb = block_len
  n_blocks = g // lb
  # Every pass commits >= 1 slot, so G passes always finish a sample.
  cap = g if max_passes is None else min(int(max_passes), g)
  if key is None:
    key = jax.random.PRNGKey(0)

  state = dict(
      tokens=tokens0,
      nfe=jnp.zeros((b,), jnp.int32),
      commit_step=jnp.full((b, g), -1, jnp.int32),
      commit_conf=jnp.zeros((b, g), jnp.float32),
      commit_rule=jnp.full((b, g), -1, jnp.int8),
      tracker=r2_lib.Tracker.empty((b, g)),
      cur_block=jnp.full((b,), -1, jnp.int32),
      block_m=jnp.zeros((b,), jnp.int32),
      j=jnp.zeros((b,), jnp.int32),
      it=jnp.zeros((), jnp.int32),
  )

  def gen_mask(tokens):
    return (_rows_take(tokens, gen_pos) == mask_id) & gen_ok  # [B, G]

  def active_of(st):
    return jnp.any(gen_mask(st["tokens"]), axis=-1) & (st["nfe"] < cap)

  def cond(st):
    return jnp.any(active_of(st)) & (st["it"] < cap)

  def body(st):
    tokens = st["tokens"]
    gmask = gen_mask(tokens)  # [B, G]
    active = jnp.any(gmask, axis=-1) & (st["nfe"] < cap)
    blk = jnp.argmax(jnp.any(gmask.reshape(b, n_blocks, lb), axis=-1), axis=-1).astype(jnp.int32)
    gstart = blk * lb  # [B] offset inside the generated slots
    pos = _block_slice(gen_pos, gstart, lb)  # [B, Lb] sequence positions of the block
    m0 = _block_slice(gmask, gstart, lb) & active[:, None]
    yhat, conf = predict(tokens, active, pos, m0, st["it"])

    tracker = st["tracker"]
    new_block = blk != st["cur_block"]
    block_m = jnp.where(new_block, jnp.sum(m0, axis=-1), st["block_m"]).astype(jnp.int32)
    j = jnp.where(new_block, 0, st["j"])
    if policy == "fixed_k":
      n_j = block_m // steps_per_block + (j < block_m % steps_per_block).astype(jnp.int32)
      n_j = jnp.maximum(n_j, 1)
      scored = jnp.where(m0, conf, -1.0)
      order = jnp.argsort(-scored, axis=-1, stable=True)
      rank = jnp.argsort(order, axis=-1, stable=True)
      c1 = m0 & (rank < n_j[:, None])
      zeros = jnp.zeros_like(c1)
      commits = jnp.stack([c1, zeros, zeros, zeros], axis=1)  # [B, 4, Lb]
    elif r2 is None:
      c1 = r2_lib.threshold_commit(m0, conf, tau)
      zeros = jnp.zeros_like(c1)
      commits = jnp.stack([c1, zeros, zeros, zeros], axis=1)
    else:
      btrack = jax.tree.map(lambda a: _block_slice(a, gstart, lb), tracker)
      rkeys = jax.random.split(jax.random.fold_in(jax.random.fold_in(key, 1), st["it"]), b)
      commits, btrack_new = jax.vmap(
          lambda m, c, y, t, k: r2_lib.r2_commit(m, c, y, t, r2, key=k))(m0, conf, yhat, btrack,
                                                                          rkeys)
      btrack_new = jax.tree.map(lambda n, o: jnp.where(active[:, None], n, o), btrack_new,
                                btrack)
      tracker = jax.tree.map(lambda a, u: _block_update(a, u, gstart), tracker, btrack_new)

    commits = commits & active[:, None, None]
    any_c = jnp.any(commits, axis=1)  # [B, Lb]
    rule = jnp.where(any_c, jnp.argmax(commits, axis=1), -1).astype(jnp.int8)

    length = tokens.shape[1]
    tokens = _rows_set(tokens, jnp.where(any_c, pos, length), yhat)
    step_now = jnp.broadcast_to(st["nfe"][:, None], any_c.shape)
    cs = _block_update(st["commit_step"], jnp.where(
        any_c, step_now, _block_slice(st["commit_step"], gstart, lb)), gstart)
    cc = _block_update(st["commit_conf"], jnp.where(
        any_c, conf, _block_slice(st["commit_conf"], gstart, lb)), gstart)
    cr = _block_update(st["commit_rule"], jnp.where(
        any_c, rule, _block_slice(st["commit_rule"], gstart, lb)), gstart)
    return dict(
        tokens=tokens,
        nfe=st["nfe"] + active.astype(jnp.int32),
        commit_step=cs, commit_conf=cc, commit_rule=cr, tracker=tracker,
        cur_block=jnp.where(active, blk, st["cur_block"]),
        block_m=jnp.where(active, block_m, st["block_m"]),
        j=jnp.where(active, j + 1, st["j"]),
        it=st["it"] + 1,
    )

  out = jax.lax.while_loop(cond, body, state)
  return DecodeResult(tokens=out["tokens"], nfe=out["nfe"], commit_step=out["commit_step"],
                      commit_conf=out["commit_conf"], commit_rule=out["commit_rule"])


def _decode(logits_fn: LogitsFn, prompt_tokens: jax.Array, gen_len: int, block_len: int,
            mask_id: int, policy: str, *, steps_per_block: int = 0, tau: float = 0.9,
            temperature: float = 0.0, key: Optional[jax.Array] = None,
            r2: Optional[r2_lib.R2Config] = None, max_passes: Optional[int] = None
            ) -> DecodeResult:
  """The reference decode of a prefix prompt: full logits every pass."""
  prompt_tokens = jnp.asarray(prompt_tokens, jnp.int32)
  b, p = prompt_tokens.shape
  tokens0 = jnp.concatenate([prompt_tokens, jnp.full((b, gen_len), mask_id, jnp.int32)], axis=1)
  gen_pos = jnp.broadcast_to(p + jnp.arange(gen_len, dtype=jnp.int32), (b, gen_len))
  gen_ok = jnp.ones((b, gen_len), jnp.bool_)
  if key is None:
    key = jax.random.PRNGKey(0)
  predict = _reference_predict(logits_fn, mask_id, temperature, key)
  return _decode_slots(predict, tokens0, gen_pos, gen_ok, block_len, mask_id, policy,
                       steps_per_block=steps_per_block, tau=tau, key=key, r2=r2,
                       max_passes=max_passes)


def decode_fixed_k(logits_fn: LogitsFn, prompt_tokens: jax.Array, gen_len: int, block_len: int,
                   steps: int, mask_id: int) -> DecodeResult:
  """LLaDA low-confidence remasking: a fixed number of commits per pass.

  `steps` is split evenly over the blocks (S_b = steps / n_blocks, must divide); at block start
  with m masked slots, pass j commits the n_j most confident candidates (ties: lowest
  position), n_j from `num_transfer_tokens`. NFE = steps when S_b <= block_len (a pass that
  would commit nothing because the block is already full is never run).

  Args:
    logits_fn: closure tokens [B, L] int32 -> logits [B, L, V].
    prompt_tokens: [B, P] int32.
    gen_len: G, a multiple of block_len.
    block_len: Lb.
    steps: total passes over all blocks, a multiple of G / Lb.
    mask_id: id of [MASK].

  Returns:
    `DecodeResult` (commit_rule 0 for every committed slot).
  """
  prompt_tokens = jnp.asarray(prompt_tokens)
  _check_lengths(prompt_tokens, gen_len, block_len)
  n_blocks = gen_len // block_len
  if steps < n_blocks or steps % n_blocks:
    raise ValueError(f"steps ({steps}) must be a positive multiple of the number of blocks "
                     f"gen_len / block_len = {n_blocks}")
  return _decode(logits_fn, prompt_tokens, gen_len, block_len, mask_id, "fixed_k",
                 steps_per_block=steps // n_blocks)


def _check_threshold_options(tau: float, temperature: float, key: Optional[jax.Array],
                             max_passes: Optional[int], r2: Optional[r2_lib.R2Config]) -> None:
  """The option checks shared by the reference and the fast threshold decoders."""
  if not 0.0 < float(tau) <= 1.0:
    raise ValueError(f"tau must lie in (0, 1], got tau={tau}")
  if temperature < 0.0:
    raise ValueError(f"temperature must be >= 0, got {temperature}")
  if temperature > 0.0 and key is None:
    raise ValueError("temperature > 0 needs a PRNG key")
  if max_passes is not None and max_passes < 1:
    raise ValueError(f"max_passes must be >= 1 or None, got {max_passes}")
  if r2 is not None:
    if float(r2.tau) != float(tau):
      raise ValueError(f"tau ({tau}) and r2.tau ({r2.tau}) disagree; set both to the same value")
    if r2.token_cluster == "random" and r2.token_cluster_on and key is None:
      raise ValueError("r2.token_cluster='random' needs a PRNG key")


def decode_threshold(logits_fn: LogitsFn, prompt_tokens: jax.Array, gen_len: int,
                     block_len: int, tau: float = 0.9, *, mask_id: int,
                     temperature: float = 0.0, key: Optional[jax.Array] = None,
                     r2: Optional[r2_lib.R2Config] = None,
                     max_passes: Optional[int] = None) -> DecodeResult:
  """Fast-dLLM threshold decoding, optionally with the R²-dLLM rules.

  Each pass commits the most confident candidate of the active block (ties: lowest position)
  plus every candidate with c >= tau, then (with `r2`) the extra R² rules on the same logits.

  Args:
    logits_fn: closure tokens [B, L] int32 -> logits [B, L, V].
    prompt_tokens: [B, P] int32.
    gen_len: G, a multiple of block_len.
    block_len: Lb.
    tau: threshold in (0, 1].
    mask_id: id of [MASK] (keyword-only).
    temperature: 0 for greedy yhat; > 0 draws yhat = argmax(logits / T + Gumbel) in float64
      (under x64); c stays the untempered probability.
    key: PRNG key for temperature > 0 or token_cluster="random".
    r2: `R2Config` of the extra rules, or None. Its `tau` must equal `tau`.
    max_passes: optional cap on passes per sample (slots left masked then keep `mask_id`).

  Returns:
    `DecodeResult`.
  """
  prompt_tokens = jnp.asarray(prompt_tokens)
  _check_lengths(prompt_tokens, gen_len, block_len)
  _check_threshold_options(tau, temperature, key, max_passes, r2)
  return _decode(logits_fn, prompt_tokens, gen_len, block_len, mask_id, "threshold", tau=tau,
                 temperature=temperature, key=key, r2=r2, max_passes=max_passes)


# -- the fast path: the head only at the active block's masked slots ---------------------------
def default_block_budget(batch: int, block_len: int) -> int:
  """Head rows per chunk of the fast blockwise decoders: half the batch's active-block slots
  (a block being decoded one slot per pass holds about half its slots masked on average)."""
  return max(8, -(-(int(batch) * int(block_len)) // 16) * 8)


def _check_layout(layout: MaskedLayout, block_len: int) -> None:
  if block_len < 1:
    raise ValueError(f"block_len must be >= 1, got {block_len}")
  if layout.gen_pos.ndim != 2 or layout.gen_pos.shape[1] % block_len:
    raise ValueError(f"layout.gen_pos must be [B, G] with G a multiple of block_len "
                     f"({block_len}); got {layout.gen_pos.shape}")


def fast_decode(denoiser: sparse.Denoiser, layout: MaskedLayout, block_len: int, mask_id: int,
                policy: str, *, steps_per_block: int = 0, tau: float = 0.9,
                temperature: float = 0.0, key: Optional[jax.Array] = None,
                r2: Optional[r2_lib.R2Config] = None, max_passes: Optional[int] = None,
                budget: Optional[int] = None) -> DecodeResult:
  """Blockwise decoding of any `MaskedLayout` with the head only where it is read.

  The commit rules, NFE accounting and results are those of `decode_threshold` /
  `decode_fixed_k` (given the same model outputs the commits are the same); only the cost
  differs: the trunk runs for the samples still decoding, and the head, its softmax and argmax
  only at the masked slots of each sample's active block (`budget` rows per chunk; default
  `default_block_budget`). Blocks are consecutive runs of `block_len` entries of
  `layout.gen_pos`; for a prefix prompt that is the usual left-to-right blocks.

  Returns:
    `DecodeResult` (tokens [B, L]; commit_* indexed by the entries of layout.gen_pos).
  """
  _check_layout(layout, block_len)
  if policy not in ("threshold", "fixed_k"):
    raise ValueError(f"policy must be 'threshold' or 'fixed_k', got {policy!r}")
  b = layout.tokens.shape[0]
  if key is None:
    key = jax.random.PRNGKey(0)
  if budget is None:
    budget = default_block_budget(b, block_len)
  valid = jnp.asarray(layout.valid, jnp.bool_)
  tokens0 = jnp.where(jnp.asarray(layout.fill), mask_id, jnp.asarray(layout.tokens, jnp.int32))
  predict = _fast_predict(denoiser, valid, mask_id, temperature, key, budget)
  return _decode_slots(predict, tokens0, jnp.asarray(layout.gen_pos, jnp.int32),
                       jnp.asarray(layout.gen_ok, jnp.bool_), block_len, mask_id, policy,
                       steps_per_block=steps_per_block, tau=tau, key=key, r2=r2,
                       max_passes=max_passes)


def fast_decode_threshold(denoiser: sparse.Denoiser, layout: MaskedLayout, block_len: int,
                          tau: float = 0.9, *, mask_id: int, temperature: float = 0.0,
                          key: Optional[jax.Array] = None, r2: Optional[r2_lib.R2Config] = None,
                          max_passes: Optional[int] = None,
                          budget: Optional[int] = None) -> DecodeResult:
  """`decode_threshold` on a `MaskedLayout`, at the cost of the trunk (see `fast_decode`)."""
  _check_threshold_options(tau, temperature, key, max_passes, r2)
  return fast_decode(denoiser, layout, block_len, mask_id, "threshold", tau=tau,
                     temperature=temperature, key=key, r2=r2, max_passes=max_passes,
                     budget=budget)


def fast_decode_fixed_k(denoiser: sparse.Denoiser, layout: MaskedLayout, block_len: int,
                        steps: int, mask_id: int, budget: Optional[int] = None) -> DecodeResult:
  """`decode_fixed_k` on a `MaskedLayout`, at the cost of the trunk (see `fast_decode`);
  `steps` must be a multiple of the number of blocks G / block_len."""
  _check_layout(layout, block_len)
  n_blocks = layout.gen_pos.shape[1] // block_len
  if steps < n_blocks or steps % n_blocks:
    raise ValueError(f"steps ({steps}) must be a positive multiple of the number of blocks "
                     f"({n_blocks} blocks of {block_len} generated slots)")
  return fast_decode(denoiser, layout, block_len, mask_id, "fixed_k",
                     steps_per_block=steps // n_blocks, budget=budget)


# -- the "threshold" and "fixed_k" decoders of masked methods ------------------------------------
def _check_block(sample_cfg) -> None:
  s = sample_cfg
  if s.block_len < 1:
    raise ConfigError(f"sample.block_len={s.block_len} must be >= 1.")
  if s.gen_len and s.gen_len % s.block_len:
    raise ConfigError(f"sample.gen_len={s.gen_len} must be a multiple of sample.block_len="
                      f"{s.block_len}.")


def _check_threshold(sample_cfg) -> None:
  _check_block(sample_cfg)
  if sample_cfg.r2:
    try:
      r2_lib.R2Config.from_flags(sample_cfg.r2, tau=sample_cfg.tau)
    except ValueError as e:
      raise ConfigError(f"sample.r2: {e}") from None


def _run_threshold(method, params, key, prompt, gen_len, opts):
  del key
  r2_cfg = r2_lib.R2Config.from_flags(opts["r2"], tau=opts["tau"]) if opts["r2"] else None
  res = decode_threshold(method.logits_fn(params), prompt, gen_len, opts["block_len"],
                         tau=opts["tau"], mask_id=method.ids.mask, r2=r2_cfg)
  return dict(tokens=res.tokens, nfe=res.nfe, commit_step=res.commit_step,
              commit_rule=res.commit_rule)


def _run_threshold_fast(method, params, key, layout, opts):
  del key  # greedy, as the reference decoder
  r2_cfg = r2_lib.R2Config.from_flags(opts["r2"], tau=opts["tau"]) if opts["r2"] else None
  res = fast_decode_threshold(method.denoiser(params), layout, opts["block_len"],
                              tau=opts["tau"], mask_id=method.ids.mask, r2=r2_cfg)
  return dict(tokens=res.tokens, nfe=res.nfe, commit_step=res.commit_step,
              commit_rule=res.commit_rule)


def _run_fixed_k(method, params, key, prompt, gen_len, opts):
  del key
  res = decode_fixed_k(method.logits_fn(params), prompt, gen_len, opts["block_len"],
                       opts["num_steps"], mask_id=method.ids.mask)
  return dict(tokens=res.tokens, nfe=res.nfe, commit_step=res.commit_step,
              commit_rule=res.commit_rule)


def _run_fixed_k_fast(method, params, key, layout, opts):
  del key
  res = fast_decode_fixed_k(method.denoiser(params), layout, opts["block_len"],
                            opts["num_steps"], mask_id=method.ids.mask)
  return dict(tokens=res.tokens, nfe=res.nfe, commit_step=res.commit_step,
              commit_rule=res.commit_rule)


register(masked_decoder("threshold", _run_threshold, ("block_len", "tau", "r2", "reference"),
                        blockwise=True, check=_check_threshold, run_fast=_run_threshold_fast))
register(masked_decoder("fixed_k", _run_fixed_k, ("block_len", "num_steps", "reference"),
                        blockwise=True, check=_check_block, run_fast=_run_fixed_k_fast))
