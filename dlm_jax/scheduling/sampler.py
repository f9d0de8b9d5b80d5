"""Heavy/light model scheduling for two trained MDLM runs (arXiv 2604.02340).

`scheduled_ancestral_sample` is the pure sampler (the ancestral loop of `dlm_jax.sampling`
with a per-step model choice; `fast_scheduled_ancestral_sample` the same on the fast loop, which
draws from the same distribution at the cost of the trunks); `schedule.py` holds the schedules
and `flops.py` their cost.
This module joins them to restored runs (`dlm_jax.load`):

- `check_pair_configs` / `check_pair_tokenizers`: the two runs must share the method (MDLM) and
  the tokenizer; a mismatch raises `ScheduleError` before any sampling.
- `resolve_schedule`: parses "L8,H16,L8" and checks it against the number of steps.
- `ScheduledSampler`: one jitted sampler per (gen_len, settings); the schedule is a traced
  [T] array, so every schedule of the same length reuses one compilation.
- `flops.flops_model_config` / `flops.flops_report` (in flops.py): FLOPs per sample from the two model configs in both
  conventions ("blocks", "full"), over nominal steps and over the passes actually run (NFE).

No flags or files here: `dlm_jax/sample.py` is the command-line front end.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dlm_jax.sampling import ancestral
from dlm_jax.sampling import common
from dlm_jax.sampling import sparse
from dlm_jax.scheduling import schedule as ms


class ScheduleError(ValueError):
  """Two runs cannot be scheduled together, or the schedule does not fit the sampler."""


def tokenizer_signature(config: ml_collections.ConfigDict) -> tuple:
  """What determines a run's tokenizer from its config alone (a cheap check before loading).

  The authoritative check compares the built tokenizers' fingerprints (`check_pair_tokenizers`).
  """
  d = config.data
  sig = (d.source, d.tokenizer)
  if d.tokenizer == "bpe":
    sig += (int(d.vocab_size), d.path, d.tfds_name)
  return sig


def check_pair_configs(heavy: ml_collections.ConfigDict, light: ml_collections.ConfigDict
                       ) -> None:
  """Checks from the saved configs that two runs can share a schedule (cheap, no parameters).

  Args:
    heavy: config of the heavy run.
    light: config of the light run.

  Raises:
    ScheduleError: naming the field when the methods or the tokenizers differ, or when the
      method is not MDLM.
  """
  if heavy.method != light.method:
    raise ScheduleError(f"the heavy run has method={heavy.method!r} but the light run has "
                        f"method={light.method!r}; model scheduling needs two runs of the same "
                        "method.")
  if heavy.method != "mdlm":
    raise ScheduleError(f"model scheduling needs two MDLM runs (ancestral sampling), got "
                        f"method={heavy.method!r}.")
  hs, ls = tokenizer_signature(heavy), tokenizer_signature(light)
  if hs != ls:
    raise ScheduleError(f"the runs use different tokenizers: heavy data/tokenizer {hs} vs light "
                        f"{ls}; train the light model on the same data and tokenizer.")


def check_pair_tokenizers(heavy_tok: Any, light_tok: Any) -> None:
  """Checks two built tokenizers are identical (fingerprint, else name and vocabulary size).

  Raises:
    ScheduleError: when they differ.
  """
  fh = heavy_tok.fingerprint() if hasattr(heavy_tok, "fingerprint") else None
  fl = light_tok.fingerprint() if hasattr(light_tok, "fingerprint") else None
  same = (fh == fl) if (fh is not None and fl is not None) else (
      getattr(heavy_tok, "name", None) == getattr(light_tok, "name", None))
  same = same and int(heavy_tok.vocab_size) == int(light_tok.vocab_size)
  if not same:
    raise ScheduleError(f"the runs use different tokenizers (heavy vocab {heavy_tok.vocab_size}, "
                        f"light vocab {light_tok.vocab_size}, fingerprints {fh} / {fl}).")
  for attr in ("bos_id", "eos_id", "mask_id", "pad_id"):
    if getattr(heavy_tok, attr, None) != getattr(light_tok, attr, None):
      raise ScheduleError(f"the runs' tokenizers disagree on {attr}.")


def resolve_schedule(spec: Union[str, ms.ModelSchedule], num_steps: Optional[int] = None
                     ) -> ms.ModelSchedule:
  """Parses a schedule and checks it covers exactly steps 0..num_steps-1.

  Args:
    spec: "L8,H16,L8" or a `ModelSchedule`.
    num_steps: the sampler's T, or None to take T from the schedule.

  Returns:
    The schedule.

  Raises:
    ScheduleError: on a malformed segment, or when the schedule names steps outside
      [0, num_steps) (its segments sum to more than T) or leaves steps unassigned (less).
  """
  try:
    sched = spec if isinstance(spec, ms.ModelSchedule) else ms.parse_schedule(spec)
  except ValueError as e:
    raise ScheduleError(f"bad schedule: {e}") from None
  if num_steps is not None and sched.num_steps != int(num_steps):
    if sched.num_steps > int(num_steps):
      raise ScheduleError(
          f"schedule {sched} names steps up to {sched.num_steps - 1}, outside the sampler's "
          f"range 0..{int(num_steps) - 1} (sample.num_steps={num_steps}); make the segments "
          f"sum to {num_steps} or set num_steps={sched.num_steps}.")
    raise ScheduleError(
        f"schedule {sched} covers only steps 0..{sched.num_steps - 1} of the sampler's "
        f"0..{int(num_steps) - 1} (sample.num_steps={num_steps}); make the segments sum to "
        f"{num_steps} or set num_steps={sched.num_steps}.")
  return sched


def _checked_inputs(is_light, x_init, maskable, num_steps: int, t_final: float, uniforms):
  """(x_init, maskable, model_id [T] int32: 1 where the light model runs), checked."""
  if hasattr(is_light, "expand"):
    is_light = is_light.expand()
  x_init = jnp.asarray(x_init)
  maskable = jnp.asarray(maskable)
  ancestral.check_inputs(x_init, maskable, num_steps, t_final, uniforms)
  if tuple(np.shape(is_light)) != (int(num_steps),):
    raise ValueError(f"is_light must have shape [num_steps] = ({num_steps},), "
                     f"got {tuple(np.shape(is_light))}")
  return x_init, maskable, jnp.asarray(is_light).astype(jnp.int32)


def scheduled_ancestral_sample(heavy_fn: ancestral.LogitsFn, light_fn: ancestral.LogitsFn, key: jax.Array,
                               is_light, x_init: jax.Array, maskable: jax.Array, mask_id: int,
                               num_steps: int, schedule: ancestral.Schedule = "loglinear",
                               t_final: float = 0.0, use_cache: bool = True,
                               final_argmax: bool = False,
                               uniforms: Optional[jax.Array] = None
                               ) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """Ancestral sampling where step i runs the light model if is_light[i], else the heavy one.

  Same draws as `ancestral_sample` for the same key: an all-heavy schedule reproduces it bit
  for bit. A model switch invalidates the cache.

  Args:
    heavy_fn: heavy closure tokens [B, L] -> logits [B, L, V].
    light_fn: light closure with the same interface.
    key: PRNG key.
    is_light: [T] bool (or a `ModelSchedule`, expanded).
    x_init, maskable, mask_id, num_steps, schedule, t_final, use_cache, final_argmax, uniforms:
      as in `ancestral_sample`.

  Returns:
    (tokens [B, L] int32, nfe_heavy [B] int32, nfe_light [B] int32).
  """
  x_init, maskable, model_id = _checked_inputs(is_light, x_init, maskable, num_steps, t_final,
                                               uniforms)
  tokens, nfe = ancestral.sample_loop((heavy_fn, light_fn), key, model_id, x_init, maskable, mask_id,
                        num_steps, schedule, t_final, use_cache, final_argmax, uniforms)
  return tokens, nfe[0], nfe[1]


def fast_scheduled_ancestral_sample(heavy: sparse.Denoiser, light: sparse.Denoiser,
                                    key: jax.Array, is_light, x_init: jax.Array,
                                    maskable: jax.Array, mask_id: int, num_steps: int,
                                    schedule: ancestral.Schedule = "loglinear",
                                    t_final: float = 0.0, use_cache: bool = True,
                                    final_argmax: bool = False,
                                    uniforms: Optional[jax.Array] = None
                                    ) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """`scheduled_ancestral_sample` on the fast loop (`ancestral.fast_sample_loop`): the same
  distribution of tokens; a model runs only at steps that reveal a token (a model switch alone
  costs no pass). With `uniforms` the reveal pattern is the reference's exactly.

  Returns:
    (tokens [B, L] int32, nfe_heavy [B] int32, nfe_light [B] int32).
  """
  x_init, maskable, model_id = _checked_inputs(is_light, x_init, maskable, num_steps, t_final,
                                               uniforms)
  tokens, nfe = ancestral.fast_sample_loop((heavy, light), key, model_id, x_init, maskable,
                                           mask_id, num_steps, schedule, t_final, use_cache,
                                           final_argmax, uniforms)
  return tokens, nfe[0], nfe[1]


class ScheduledSampler:
  """Scheduled ancestral sampling with a heavy and a light MDLM method object.

  Attributes:
    heavy: heavy `MDLM` method (its config sets the noise schedule and default lengths).
    light: light `MDLM` method.
  """

  def __init__(self, heavy_method: Any, light_method: Any, suppress_ids: tuple[int, ...] = ()):
    """Stores the two methods.

    Args:
      heavy_method: heavy `MDLM` method object.
      light_method: light `MDLM` method object.
      suppress_ids: token ids never drawn by either model (their logits get -inf, like the
        mask column), e.g. BOS/PAD of a synthetic task whose samples must be plain symbols.
    """
    self.heavy = heavy_method
    self.light = light_method
    self.suppress_ids = tuple(int(i) for i in suppress_ids)
    self._cache: dict[tuple, Any] = {}

  def _denoiser(self, method: Any, params: Any) -> sparse.Denoiser:
    return sparse.with_suppressed(method.denoiser(params), self.suppress_ids)

  def _fn(self, method: Any, params: Any):
    fn = method.logits_fn(params)
    if not self.suppress_ids:
      return fn
    ids = jnp.asarray(self.suppress_ids, jnp.int32)
    return lambda tokens: fn(tokens).at[..., ids].set(-jnp.inf)

  def gen_len(self, sample_cfg: ml_collections.ConfigDict, prompt_len: int) -> int:
    """Generated slots: sample.gen_len, or fill the heavy run's training length."""
    g = int(sample_cfg.gen_len) or self.heavy.config.data.seq_len - prompt_len
    total = prompt_len + g
    for name, m in (("heavy", self.heavy), ("light", self.light)):
      if total > m.model_cfg.max_len:
        raise ScheduleError(f"prompt ({prompt_len}) + gen_len ({g}) = {total} is longer than the "
                            f"{name} model's max_len={m.model_cfg.max_len}.")
    return g

  def _compiled(self, num_steps: int, gen_len: int, t_final: float, use_cache: bool,
                crn: bool, reference: bool = False):
    key = (num_steps, gen_len, float(t_final), bool(use_cache), crn, bool(reference))
    if key in self._cache:
      return self._cache[key]
    mask_id = self.heavy.ids.mask
    noise = self.heavy.schedule

    def run(heavy_params, light_params, rng, prompt, is_light, uniforms):
      b, p = prompt.shape
      x_init = jnp.concatenate([prompt, jnp.full((b, gen_len), mask_id, jnp.int32)], 1)
      maskable = jnp.broadcast_to(jnp.arange(p + gen_len)[None, :] >= p, (b, p + gen_len))
      if reference:
        tokens, nfe_h, nfe_l = scheduled_ancestral_sample(
            self._fn(self.heavy, heavy_params), self._fn(self.light, light_params), rng,
            is_light, x_init, maskable, mask_id, num_steps, schedule=noise, t_final=t_final,
            use_cache=use_cache, final_argmax=t_final > 0, uniforms=uniforms)
      else:
        tokens, nfe_h, nfe_l = fast_scheduled_ancestral_sample(
            self._denoiser(self.heavy, heavy_params), self._denoiser(self.light, light_params),
            rng, is_light, x_init, maskable, mask_id, num_steps, schedule=noise,
            t_final=t_final, use_cache=use_cache, final_argmax=t_final > 0, uniforms=uniforms)
      return dict(tokens=tokens, nfe=nfe_h + nfe_l, nfe_heavy=nfe_h, nfe_light=nfe_l)

    fn = jax.jit(run)
    self._cache[key] = fn
    return fn

  def sample(self, heavy_params: Any, light_params: Any, key: jax.Array,
             sample_cfg: ml_collections.ConfigDict, schedule: ms.ModelSchedule,
             prompt: Optional[jax.Array] = None, uniforms: Optional[jax.Array] = None
             ) -> dict[str, Any]:
    """Draws one batch.

    Args:
      heavy_params: heavy parameters.
      light_params: light parameters.
      key: PRNG key (with an all-heavy schedule the draws equal `MDLM.sample`'s for this key).
      sample_cfg: config.sample (batch_size, gen_len, t_final, use_cache, reference: the
        original loop instead of the fast one).
      schedule: the schedule; its length is the number of steps T.
      prompt: optional [B, P] int32 prompt (default: BOS only).
      uniforms: optional [T, B, P+G] uniforms for common random numbers across schedules.

    Returns:
      dict(tokens [B, P+G], nfe [B], nfe_heavy [B], nfe_light [B], prompt_len, gen_len).
    """
    b = int(sample_cfg.batch_size)
    if prompt is None:
      prompt = jnp.full((b, 1), self.heavy.ids.bos, jnp.int32)
    prompt = jnp.asarray(prompt, jnp.int32)
    g = self.gen_len(sample_cfg, prompt.shape[1])
    t = schedule.num_steps
    fn = self._compiled(t, g, sample_cfg.t_final, sample_cfg.use_cache, uniforms is not None,
                        bool(sample_cfg.get("reference", False)))
    is_light = jnp.asarray(schedule.expand())
    out = fn(heavy_params, light_params, key, prompt, is_light, uniforms)
    return dict(out, prompt_len=prompt.shape[1], gen_len=g)


def sample_batches(heavy_run: Any, light_run: Any, sample_cfg: ml_collections.ConfigDict,
                   schedule: ms.ModelSchedule, seed: int = 0,
                   prompt_ids: Optional[np.ndarray] = None,
                   sampler: Optional[ScheduledSampler] = None) -> dict[str, Any]:
  """Scheduled sampling over ceil(num_samples / batch_size) batches of two loaded runs.

  Batch i uses key fold_in(key(seed), i), as `api.sample_batches` does, so an all-heavy
  schedule reproduces the single-model sampler.

  Args:
    heavy_run: a `LoadedRun` (method, params, mesh).
    light_run: a `LoadedRun`.
    sample_cfg: config.sample with num_samples, batch_size, gen_len, t_final, use_cache.
    schedule: the schedule (its length is T).
    seed: sampling seed.
    prompt_ids: optional [B, P] int32 prompt (already tokenized, BOS included).
    sampler: optional `ScheduledSampler` to reuse compilations.

  Returns:
    dict(tokens [N, P+G], nfe, nfe_heavy, nfe_light [N], prompt_len, gen_len, wall_sec).
  """
  sampler = sampler or ScheduledSampler(heavy_run.method, light_run.method)
  return common.sample_in_batches(
      lambda key: sampler.sample(heavy_run.params, light_run.params, key, sample_cfg, schedule,
                                 prompt=prompt_ids),
      sample_cfg.num_samples, sample_cfg.batch_size, seed, heavy_run.mesh)
