"""MDLM ancestral sampler ("ddpm_cache") with caching and float64 draws.

Grid t_i = 1 - i (1 - t_final) / T, i = 0..T; step i goes from t = t_i to s = t_{i+1}. Each
masked, maskable slot draws from the unnormalised weights
  token v (v != mask): p_theta(v | x_t) (alpha_s - alpha_t),   stay masked: 1 - alpha_s;
other slots are copied. SUBS: the mask column of the logits gets -inf before the softmax.

Caching: the denoiser has no time input, so when a step changed no token of sample b (and the
model did not switch), the next step reuses b's previous logits. The batch forward runs (under
`lax.cond`) only when some sample needs it; NFE is counted per sample.

`logits_fn(tokens [B, L] int32) -> logits [B, L, V] float32` is a closure made by the caller
(model and parameters); it is called inside the loop. The samplers are jittable (keep the
Python arguments static). Run them under `jax.enable_x64(True)` for float64 draws.

Two implementations draw from the same distribution:
- the reference (`ancestral_sample`, `sample_loop`): every step builds [B, L, V] log weights and
  draws a float64 categorical over V + 1 outcomes (tokens and "stay masked") at every position;
  its cache keeps [B, L, V] logits. Kept as the oracle the fast path is tested against
  (`sample.reference=True`).
- the fast path (`fast_ancestral_sample`, `fast_sample_loop`; the default): since the "stay"
  probability (1 - alpha_s) / (1 - alpha_t) does not depend on the model, each masked slot
  first decides whether it is revealed at this step (Bernoulli((alpha_s - alpha_t) /
  (1 - alpha_t)), float64), and only the revealed slots get the output head and a float64
  categorical over the non-mask ids (gathered up to a static budget, in further chunks when
  more are revealed: exact). That categorical is a two-stage float64 inverse CDF
  (`common.categorical_inverse_cdf`): two uniforms per slot instead of V Gumbel variates. The trunk runs only for samples with a reveal at this step and an
  outdated cache (its rows gathered into a sub-batch), and the cache holds the trunk's hidden
  states [B, L, d]. A sample's network calls (NFE) are the same function of its reveal steps as
  in the reference, so NFE has the same distribution too (oracle O8).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from dlm_jax.diffusion import schedules
from dlm_jax.diffusion.masked import subs_log_probs
from dlm_jax.config import ConfigError
from dlm_jax.sampling import sparse
from dlm_jax.sampling.common import categorical_f64, categorical_inverse_cdf, sampling_dtype
from dlm_jax.sampling.decoders import masked_decoder, register

LogitsFn = Callable[[jax.Array], jax.Array]
Schedule = Union[str, object]  # a name or a `dlm_jax.diffusion.schedules` object (alpha(t))


def ancestral_step_log_weights(log_probs: jax.Array, t, s, mask_id: int,
                               schedule: Schedule = "loglinear") -> jax.Array:
  """Normalised log weights of one step t -> s for a masked slot.

  Entry v != mask_id is log[p_theta(v) (alpha_s - alpha_t) / (1 - alpha_t)], the mask_id
  entry is the stay probability log[(1 - alpha_s) / (1 - alpha_t)].

  Args:
    log_probs: [..., V] SUBS log probabilities (-inf at mask_id).
    t: current time (scalar), t > s.
    s: next time (scalar).
    mask_id: id of [MASK].
    schedule: a schedule name or object (`dlm_jax.diffusion.schedules`).

  Returns:
    [..., V] log weights summing (in probability) to 1.
  """
  alpha = schedules.as_schedule(schedule).alpha
  dtype = log_probs.dtype
  t = jnp.asarray(t, dtype)
  s = jnp.asarray(s, dtype)
  a_t, a_s = alpha(t), alpha(s)
  log_norm = jnp.log1p(-a_t)
  log_reveal = jnp.log(a_s - a_t) - log_norm
  log_stay = jnp.log1p(-a_s) - log_norm
  w = log_probs + log_reveal
  return w.at[..., mask_id].set(jnp.broadcast_to(log_stay, w.shape[:-1]))


def _inverse_cdf_draw(log_w: jax.Array, u: jax.Array, mask_id: int) -> jax.Array:
  """Inverse-CDF draw with the stay outcome first, then tokens in id order.

  Putting "stay" first makes the reveal decision depend only on u and the time grid, not on
  the model, so schedules sharing uniforms reveal the same slots at the same steps.

  Args:
    log_w: [B, L, V] normalised step log weights (stay at mask_id).
    u: [B, L] uniforms in [0, 1).
    mask_id: id of [MASK].

  Returns:
    [B, L] int32 (mask_id = stay).
  """
  v = log_w.shape[-1]
  p_stay = jnp.exp(log_w[..., mask_id])
  p_tok = jnp.exp(log_w).at[..., mask_id].set(0.0)
  cdf = jnp.cumsum(p_tok, axis=-1)
  cdf = cdf / cdf[..., -1:]
  u2 = (u - p_stay) / (1.0 - p_stay)
  idx = jnp.sum(cdf <= u2[..., None], axis=-1)
  positive = p_tok > 0
  last_pos = v - 1 - jnp.argmax(positive[..., ::-1], axis=-1)
  idx = jnp.minimum(idx, last_pos)
  return jnp.where(u < p_stay, mask_id, idx).astype(jnp.int32)


def check_inputs(x_init, maskable, num_steps, t_final, uniforms):
  if x_init.ndim != 2:
    raise ValueError(f"x_init must be [B, L] int32, got shape {x_init.shape}")
  if maskable.shape != x_init.shape:
    raise ValueError(f"maskable shape {maskable.shape} must equal x_init shape {x_init.shape}")
  if int(num_steps) < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")
  if not 0.0 <= float(t_final) < 1.0:
    raise ValueError(f"t_final must lie in [0, 1), got {t_final}")
  if uniforms is not None and tuple(uniforms.shape) != (int(num_steps),) + tuple(x_init.shape):
    raise ValueError(f"uniforms must have shape [T, B, L] = {(num_steps,) + tuple(x_init.shape)},"
                     f" got {tuple(uniforms.shape)}")


def sample_loop(logits_fns: Sequence[LogitsFn], key: jax.Array, model_id: jax.Array,
                x_init: jax.Array, maskable: jax.Array, mask_id: int, num_steps: int,
                schedule: Schedule, t_final: float, use_cache: bool, final_argmax: bool,
                uniforms: Optional[jax.Array]) -> Tuple[jax.Array, jax.Array]:
  """Core loop over one or several models (step i runs model_id[i]; a switch invalidates the
  cache); returns (tokens [B, L], nfe [M, B]) with M = len(logits_fns)."""
  n_models = len(logits_fns)
  dtype = sampling_dtype()
  schedule = schedules.as_schedule(schedule)
  x_init = jnp.asarray(x_init, jnp.int32)
  maskable = jnp.asarray(maskable, jnp.bool_)
  b, l = x_init.shape
  t_steps = int(num_steps)
  dt = (1.0 - float(t_final)) / t_steps
  model_id = jnp.asarray(model_id, jnp.int32)
  if uniforms is not None:
    uniforms = jnp.asarray(uniforms, dtype)

  def forward(m, tokens):
    if n_models == 1:
      return logits_fns[0](tokens).astype(jnp.float32)
    branches = [lambda tok, f=f: f(tok).astype(jnp.float32) for f in logits_fns]
    return jax.lax.switch(m, branches, tokens)

  # Shape of the logits, traced once (no FLOPs are spent: eval_shape).
  v = jax.eval_shape(logits_fns[0], x_init).shape[-1]

  def refresh(st, m):
    """Recomputes the logits of samples that need them; returns logits, need."""
    tokens = st["tokens"]
    has_mask = jnp.any((tokens == mask_id) & maskable, axis=-1)
    if use_cache:
      current = st["cache_ok"] & (st["cache_model"] == m)
      need = has_mask & ~current
    else:
      need = has_mask
    logits = jax.lax.cond(jnp.any(need), lambda: forward(m, tokens), lambda: st["logits"])
    logits = jnp.where(need[:, None, None], logits, st["logits"])
    nfe = st["nfe"].at[m].add(need.astype(jnp.int32))
    return logits, need, nfe

  def body(i, st):
    m = model_id[i]
    tokens = st["tokens"]
    masked = (tokens == mask_id) & maskable
    logits, need, nfe = refresh(st, m)
    t = 1.0 - i.astype(dtype) * dt
    s = 1.0 - (i + 1).astype(dtype) * dt
    log_w = ancestral_step_log_weights(subs_log_probs(logits, mask_id, dtype=dtype), t, s,
                                       mask_id, schedule)
    if uniforms is None:
      draw = categorical_f64(jax.random.fold_in(key, i), log_w)
    else:
      draw = _inverse_cdf_draw(log_w, uniforms[i], mask_id)
    new_tokens = jnp.where(masked, draw, tokens)
    changed = jnp.any(new_tokens != tokens, axis=-1)
    current = need | (st["cache_ok"] & (st["cache_model"] == m))
    return dict(tokens=new_tokens, logits=logits, nfe=nfe,
                cache_ok=current & ~changed,
                cache_model=jnp.where(need, m, st["cache_model"]))

  state = dict(
      tokens=x_init,
      logits=jnp.zeros((b, l, v), jnp.float32),
      nfe=jnp.zeros((n_models, b), jnp.int32),
      cache_ok=jnp.zeros((b,), jnp.bool_),
      cache_model=jnp.full((b,), -1, jnp.int32),
  )
  state = jax.lax.fori_loop(0, t_steps, body, state)
  if final_argmax:
    m = model_id[t_steps - 1]
    logits, _, nfe = refresh(state, m)
    logp = subs_log_probs(logits, mask_id)
    best = jnp.argmax(logp, axis=-1).astype(jnp.int32)
    masked = (state["tokens"] == mask_id) & maskable
    state = dict(state, tokens=jnp.where(masked, best, state["tokens"]), nfe=nfe)
  return state["tokens"], state["nfe"]


def _model_ids(model_id: Optional[jax.Array], num_steps: int) -> jax.Array:
  """[num_steps] int32 index of the model each step runs (all 0 when not given), checked."""
  if model_id is None:
    return jnp.zeros((int(num_steps),), jnp.int32)
  if tuple(np.shape(model_id)) != (int(num_steps),):
    raise ValueError(f"model_id must have shape [num_steps] = ({num_steps},), "
                     f"got {tuple(np.shape(model_id))}")
  return model_id


def ancestral_sample(logits_fn: Union[LogitsFn, Sequence[LogitsFn]], key: jax.Array,
                     x_init: jax.Array, maskable: jax.Array, mask_id: int, num_steps: int,
                     schedule: Schedule = "loglinear", t_final: float = 0.0,
                     use_cache: bool = True, final_argmax: bool = False,
                     model_id: Optional[jax.Array] = None,
                     uniforms: Optional[jax.Array] = None) -> Tuple[jax.Array, jax.Array]:
  """MDLM ancestral sampling with caching.

  Args:
    logits_fn: closure tokens [B, L] int32 -> logits [B, L, V]; or a sequence of such closures
      selected per step by `model_id`.
    key: PRNG key; step i draws with fold_in(key, i).
    x_init: [B, L] int32 start (prompt tokens, mask_id at slots to generate).
    maskable: [B, L] bool, slots the sampler may fill (a maskable slot holding mask_id is
      generated; any other slot is copied).
    mask_id: id of [MASK].
    num_steps: T.
    schedule: "loglinear" (default), "cosine" or a `dlm_jax.diffusion.schedules` object.
    t_final: end of the time grid, in [0, 1). With 0 no mask survives the last step.
    use_cache: reuse a sample's logits when its tokens (and the model) did not change.
    final_argmax: after the loop fill leftover masks with the argmax (one more pass for the
      samples that need it; used with t_final > 0).
    model_id: [T] int32 index into `logits_fn` per step (None: all 0). A switch invalidates
      the cache.
    uniforms: optional [T, B, L] uniforms in [0, 1) for common random numbers: step i draws by
      inverse CDF from uniforms[i] (stay first, then token ids in order) instead of Gumbel.

  Returns:
    (tokens [B, L] int32, nfe [B] int32 forward passes that updated each sample, all models).
  """
  fns = tuple(logits_fn) if isinstance(logits_fn, (list, tuple)) else (logits_fn,)
  x_init = jnp.asarray(x_init)
  maskable = jnp.asarray(maskable)
  check_inputs(x_init, maskable, num_steps, t_final, uniforms)
  model_id = _model_ids(model_id, num_steps)
  tokens, nfe = sample_loop(fns, key, model_id, x_init, maskable, mask_id, num_steps, schedule,
                        t_final, use_cache, final_argmax, uniforms)
  return tokens, jnp.sum(nfe, axis=0)


# -- the fast path: reveal first, then the head only where revealed -----------------------------
def reveal_probabilities(schedule: Schedule, num_steps: int, t_final: float = 0.0) -> np.ndarray:
  """P(a slot masked at t = 1 is revealed at step i) = alpha(s_i) - alpha(t_i), [T] float64."""
  schedule = schedules.as_schedule(schedule)
  grid = 1.0 - np.arange(int(num_steps) + 1, dtype=np.float64) * (1.0 - float(t_final)) / num_steps
  with jax.ensure_compile_time_eval():  # a constant even while a sampler is being traced
    alpha = np.asarray(schedule.alpha(grid), np.float64)
  return alpha[1:] - alpha[:-1]


def reveal_probability(schedule: Schedule, t, s):
  """P(a masked slot is revealed at the step t -> s) = (alpha_s - alpha_t) / (1 - alpha_t): the
  same for every slot and every model (the stay weight 1 - alpha_s does not involve p_theta)."""
  alpha = schedules.as_schedule(schedule).alpha
  a_t, a_s = alpha(t), alpha(s)
  return (a_s - a_t) / (1.0 - a_t)


def default_reveal_budget(batch: int, length: int, schedule: Schedule, num_steps: int,
                          t_final: float = 0.0) -> int:
  """Head rows per chunk for `fast_sample_loop`: mean + 2 sd of the busiest step's reveals."""
  p = float(np.max(reveal_probabilities(schedule, num_steps, t_final)))
  return sparse.reveal_budget(int(batch) * int(length), p)


def _inverse_cdf_tokens(log_w: jax.Array, u: jax.Array) -> jax.Array:
  """Inverse-CDF draw over token ids in id order: log_w [K, V] unnormalised, u [K] in [0, 1)."""
  v = log_w.shape[-1]
  p = jnp.exp(log_w - jnp.max(log_w, axis=-1, keepdims=True))
  cdf = jnp.cumsum(p, axis=-1)
  cdf = cdf / cdf[..., -1:]
  idx = jnp.sum(cdf <= u[..., None], axis=-1)
  last_pos = v - 1 - jnp.argmax((p > 0)[..., ::-1], axis=-1)
  return jnp.minimum(idx, last_pos).astype(jnp.int32)


def fast_sample_loop(denoisers: Sequence[sparse.Denoiser], key: jax.Array, model_id: jax.Array,
                     x_init: jax.Array, maskable: jax.Array, mask_id: int, num_steps: int,
                     schedule: Schedule, t_final: float, use_cache: bool, final_argmax: bool,
                     uniforms: Optional[jax.Array], valid: Optional[jax.Array] = None,
                     budget: Optional[int] = None) -> Tuple[jax.Array, jax.Array]:
  """The fast core loop (see the module docstring); same contract as `sample_loop`.

  Step i reveals slot l of sample b when u < (alpha_s - alpha_t) / (1 - alpha_t) with u a
  float64 uniform from fold_in(fold_in(key, i), 0); revealed slots draw their token from the
  SUBS softmax by a float64 inverse CDF (`categorical_inverse_cdf`; keys
  fold_in(fold_in(fold_in(key, i), 1), chunk)).
  With `uniforms` (common random numbers) slot l is revealed iff u >= P(stay), the reference's
  inverse-CDF rule, and draws its token from the rescaled u, so the reveal pattern is the
  reference's exactly.

  A sample runs the trunk at a step only when it reveals a slot there and its cached hidden
  states are outdated (`use_cache=False`: at every step where it still has a mask, as the
  reference does). `budget` is the number of head rows per chunk (default:
  `default_reveal_budget`).

  Returns:
    (tokens [B, L] int32, nfe [M, B] int32) with M = len(denoisers).
  """
  n_models = len(denoisers)
  dtype = sampling_dtype()
  schedule = schedules.as_schedule(schedule)
  x_init = jnp.asarray(x_init, jnp.int32)
  maskable = jnp.asarray(maskable, jnp.bool_)
  b, l = x_init.shape
  valid = jnp.ones((b, l), jnp.bool_) if valid is None else jnp.asarray(valid, jnp.bool_)
  t_steps = int(num_steps)
  dt = (1.0 - float(t_final)) / t_steps
  model_id = jnp.asarray(model_id, jnp.int32)
  if uniforms is not None:
    uniforms = jnp.asarray(uniforms, dtype)
  if budget is None:
    budget = default_reveal_budget(b, l, schedule, t_steps, t_final)

  h_shape = jax.eval_shape(denoisers[0].features, x_init, valid)
  h_dtype = h_shape.dtype

  def features(m, inputs):
    tok, val = inputs
    if n_models == 1:
      return denoisers[0].features(tok, val).astype(h_dtype)
    return jax.lax.switch(m, [lambda a, f=f: f.features(*a).astype(h_dtype) for f in denoisers],
                          (tok, val))

  def head(m, h):
    if n_models == 1:
      return denoisers[0].head(h).astype(jnp.float32)
    return jax.lax.switch(m, [lambda x, f=f: f.head(x).astype(jnp.float32) for f in denoisers], h)

  def refresh(st, m, want):
    """Hidden states with the rows in `want` recomputed unless their cache is current."""
    current = st["cache_ok"] & (st["cache_model"] == m)
    need = want & ~current if use_cache else want
    h = sparse.refresh_rows(lambda inp: features(m, inp), (st["tokens"], valid), need, st["h"])
    nfe = st["nfe"].at[m].add(need.astype(jnp.int32))
    return h, need, current, nfe

  def body(i, st):
    m = model_id[i]
    tokens = st["tokens"]
    masked = (tokens == mask_id) & maskable
    key_i = jax.random.fold_in(key, i)
    t = 1.0 - i.astype(dtype) * dt
    s = 1.0 - (i + 1).astype(dtype) * dt
    a_t, a_s = schedule.alpha(t), schedule.alpha(s)
    if uniforms is None:
      p_reveal = reveal_probability(schedule, t, s)
      u = jax.random.uniform(jax.random.fold_in(key_i, 0), (b, l), dtype)
      reveal = masked & (u < p_reveal)
      u_tok = None
    else:  # the reference's inverse-CDF rule: stay first, then the tokens in id order
      log_norm = jnp.log1p(-a_t)
      p_stay = jnp.exp(jnp.log1p(-a_s) - log_norm)
      u = uniforms[i]
      reveal = masked & (u >= p_stay)
      u_tok = ((u - p_stay) / (1.0 - p_stay)).reshape(-1)
    if use_cache:
      want = jnp.any(reveal, axis=-1)
    else:
      want = jnp.any(masked, axis=-1)
    h, need, current, nfe = refresh(st, m, want)
    h_flat = h.reshape(b * l, -1)
    tok_key = jax.random.fold_in(key_i, 1)

    def draw(c, idx, ok, tok):
      logits = head(m, jnp.take(h_flat, jnp.minimum(idx, b * l - 1), axis=0))
      lw = logits.astype(dtype).at[:, mask_id].set(-jnp.inf)
      if u_tok is None:
        new = categorical_inverse_cdf(jax.random.fold_in(tok_key, c), lw)
      else:
        new = _inverse_cdf_tokens(lw, jnp.take(u_tok, jnp.minimum(idx, b * l - 1)))
      return sparse.flat_set(tok, jnp.where(ok, idx, b * l), new)

    new_tokens = sparse.for_selected_rows(reveal.reshape(-1), budget, draw, tokens)
    changed = jnp.any(reveal, axis=-1)
    return dict(tokens=new_tokens, h=h, nfe=nfe,
                cache_ok=(need | current) & ~changed,
                cache_model=jnp.where(need, m, st["cache_model"]))

  state = dict(
      tokens=x_init,
      h=jnp.zeros(h_shape.shape, h_dtype),
      nfe=jnp.zeros((n_models, b), jnp.int32),
      cache_ok=jnp.zeros((b,), jnp.bool_),
      cache_model=jnp.full((b,), -1, jnp.int32),
  )
  state = jax.lax.fori_loop(0, t_steps, body, state)
  if final_argmax:
    m = model_id[t_steps - 1]
    masked = (state["tokens"] == mask_id) & maskable
    h, _, _, nfe = refresh(state, m, jnp.any(masked, axis=-1))
    h_flat = h.reshape(b * l, -1)

    def fill(c, idx, ok, tok):
      del c
      logits = head(m, jnp.take(h_flat, jnp.minimum(idx, b * l - 1), axis=0))
      best = jnp.argmax(logits.at[:, mask_id].set(-jnp.inf), axis=-1).astype(jnp.int32)
      return sparse.flat_set(tok, jnp.where(ok, idx, b * l), best)

    state = dict(state, tokens=sparse.for_selected_rows(masked.reshape(-1), budget, fill,
                                                        state["tokens"]), nfe=nfe)
  return state["tokens"], state["nfe"]


def fast_ancestral_sample(denoiser: Union[sparse.Denoiser, Sequence[sparse.Denoiser]],
                          key: jax.Array, x_init: jax.Array, maskable: jax.Array, mask_id: int,
                          num_steps: int, schedule: Schedule = "loglinear", t_final: float = 0.0,
                          use_cache: bool = True, final_argmax: bool = False,
                          model_id: Optional[jax.Array] = None,
                          uniforms: Optional[jax.Array] = None,
                          valid: Optional[jax.Array] = None,
                          budget: Optional[int] = None) -> Tuple[jax.Array, jax.Array]:
  """MDLM ancestral sampling drawn at the cost of the trunk (the default path).

  Same arguments and the same distribution of (tokens, nfe) as `ancestral_sample`, with the
  model given as a `sparse.Denoiser` (features + head) instead of a logits closure; plus
  `valid` [B, L] bool (False: padding the model never attends to; never maskable) and `budget`
  (head rows per chunk).
  """
  dens = tuple(denoiser) if isinstance(denoiser, (list, tuple)) else (denoiser,)
  x_init = jnp.asarray(x_init)
  maskable = jnp.asarray(maskable)
  check_inputs(x_init, maskable, num_steps, t_final, uniforms)
  model_id = _model_ids(model_id, num_steps)
  if valid is not None:
    maskable = maskable & jnp.asarray(valid, jnp.bool_)
  tokens, nfe = fast_sample_loop(dens, key, model_id, x_init, maskable, mask_id, num_steps,
                                 schedule, t_final, use_cache, final_argmax, uniforms, valid,
                                 budget)
  return tokens, jnp.sum(nfe, axis=0)


# -- the "ancestral" decoder of masked methods ---------------------------------------------------
def _run(method, params, key, prompt, gen_len, opts):
  b, p = prompt.shape
  x_init = jnp.concatenate([prompt, jnp.full((b, gen_len), method.ids.mask, jnp.int32)], 1)
  maskable = jnp.broadcast_to(jnp.arange(p + gen_len)[None, :] >= p, (b, p + gen_len))
  tokens, nfe = ancestral_sample(
      method.logits_fn(params), key, x_init, maskable, method.ids.mask, opts["num_steps"],
      schedule=method.schedule, t_final=opts["t_final"], use_cache=opts["use_cache"],
      final_argmax=opts["t_final"] > 0)
  return dict(tokens=tokens, nfe=nfe)


def _run_fast(method, params, key, layout, opts):
  tokens, nfe = fast_ancestral_sample(
      method.denoiser(params), key, layout.tokens, layout.fill, method.ids.mask,
      opts["num_steps"], schedule=method.schedule, t_final=opts["t_final"],
      use_cache=opts["use_cache"], final_argmax=opts["t_final"] > 0, valid=layout.valid)
  return dict(tokens=tokens, nfe=nfe)


def _check(sample_cfg) -> None:
  if not 0.0 <= sample_cfg.t_final < 1.0:
    raise ConfigError(f"sample.t_final={sample_cfg.t_final} must lie in [0, 1).")


register(masked_decoder("ancestral", _run, ("num_steps", "t_final", "use_cache", "reference"),
                        check=_check, run_fast=_run_fast))
