"""Notebook API: open a training run's checkpoint on whatever devices are at hand.

    import dlm_jax
    run = dlm_jax.load("/path/to/workdir")          # newest checkpoint, EMA params
    texts = run.sample_text(num_samples=4)           # decoded samples
    run.loss(["In the beginning ..."])              # NELBO per token (nats) per text
    run.logits(tokens, sigma)                       # raw network output [B, L, V] (before SUBS)

No training mesh is needed: parameters are restored onto a mesh over the local devices (one
device in a plain notebook), whatever topology the run was trained on.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dlm_jax import config as config_lib
from dlm_jax import parallel
from dlm_jax import paths
from dlm_jax.run import checkpoint as ckpt_lib
from dlm_jax.run import experiment as exp_lib
from dlm_jax.sampling import common
from dlm_jax.sampling import decoders


def _mesh_over(devices: Sequence[jax.Device]) -> jax.sharding.Mesh:
  cfg = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  return parallel.make_mesh(cfg, devices)


def read_run_config(workdir: str, step: int | None = None) -> tuple[ml_collections.ConfigDict, int]:
  """The config saved with a checkpoint (newest by default), on the schema's types, and its step.

  Fields that moved since the run was saved are read under their new names.
  """
  ckpt = ckpt_lib.Checkpointer(workdir, read_only=True)
  try:
    steps = ckpt.all_steps()
    if not steps:
      raise ckpt_lib.CheckpointError(f"No checkpoint found in {ckpt.directory}; train first "
                                     f"(python -m dlm_jax.train --workdir={workdir} ...).")
    chosen = step if step is not None else steps[-1]
    errors = []
    for s in ([chosen] if step is not None else list(reversed(steps))):
      try:
        return config_lib.from_saved(ckpt.read_config(s)), s
      except Exception as e:  # pylint: disable=broad-except
        errors.append(f"step {s}: {type(e).__name__}")
    raise ckpt_lib.CheckpointError(f"Could not read any config in {ckpt.directory}: {errors}")
  finally:
    ckpt.close()


@dataclasses.dataclass
class LoadedRun:
  """A restored run: config, tokenizer, method, parameters (EMA when present)."""
  workdir: str
  step: int
  config: ml_collections.ConfigDict
  tokenizer: Any
  method: Any
  params: Any
  experiment: exp_lib.Experiment

  @property
  def mesh(self) -> jax.sharding.Mesh:
    return self.experiment.mesh

  def sample(self, num_samples: int | None = None, seed: int | None = None,
             prompt: str | None = None, **overrides: Any) -> dict[str, Any]:
    """Draws samples; overrides are config.sample fields (decoder, num_steps, tau, ...).

    `seed` None uses config.sample.seed.

    Returns the method's output dict (tokens, nfe, ...) as numpy plus 'texts'.
    """
    s = ml_collections.ConfigDict(self.config.sample.to_dict())
    for k, v in overrides.items():
      if k not in s:
        raise KeyError(f"Unknown sample option {k!r}; known: {sorted(s.keys())}.")
      s[k] = v
    if num_samples is not None:
      s.num_samples = num_samples
      s.batch_size = min(s.batch_size, num_samples) if s.batch_size else num_samples
    return sample_batches(self, s, seed=seed, prompt_text=prompt)

  def sample_text(self, num_samples: int = 4, seed: int | None = None,
                  **overrides: Any) -> list[str]:
    return self.sample(num_samples=num_samples, seed=seed, **overrides)["texts"]

  def logits(self, tokens: Any, sigma: Any = None) -> np.ndarray:
    """The raw network output [B, L, V] (float32) for token ids [B, L] (or [L]), before SUBS.

    Every position attends to every other (one unpadded row per example), positions 0..L-1.
    `sigma` ([B] or a scalar) is the noise level the network is conditioned on: the published
    MDLM's sigma for an imported model (`model.adaln_always`), the method's time t for a
    time-conditioned one. None feeds what the method feeds: 0 when time conditioning is off (the
    published MDLM's default); a time-conditioned network needs it. A network without a time
    input refuses a sigma.
    """
    x = np.asarray(tokens)
    if x.ndim == 1:
      x = x[None]
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.integer):
      raise ValueError(f"tokens must be integer ids [B, L] or [L], got {x.dtype} {x.shape}.")
    vocab = self.method.model_cfg.vocab_size
    if x.size and (x.min() < 0 or x.max() >= vocab):
      raise ValueError(f"token ids must lie in [0, {vocab}); got {x.min()}..{x.max()}.")
    cfg = self.method.model_cfg
    t = None
    if sigma is not None:
      if not cfg.conditioned:
        raise ValueError("This network has no time input (model.time_conditioning and "
                         "model.adaln_always are off): call run.logits(tokens) without sigma.")
      t = np.broadcast_to(np.asarray(sigma, np.float32).reshape(-1), (x.shape[0],))
    elif cfg.time_conditioning:
      raise ValueError("This network is time-conditioned: give sigma (the method's time t).")
    if not hasattr(self, "_logits_fn"):
      model = self.method.model
      fn = jax.jit(lambda p, tok, tt: model.apply({"params": p}, tok, t=tt)[0])
      self._logits_fn = parallel.in_sharding_context(fn, self.mesh)  # pylint: disable=attribute-defined-outside-init
    out = self._logits_fn(self.params, jnp.asarray(x, jnp.int32),
                          None if t is None else jnp.asarray(t))
    return np.asarray(jax.device_get(out))

  def loss(self, texts: Sequence[str], seed: int = 0) -> np.ndarray:
    """Likelihood bound of each text in nats per token (method's NELBO, eval_num_t draws)."""
    tok = self.tokenizer
    seq_len = self.config.data.seq_len
    rows = []
    for text in texts:
      ids = [tok.bos_id] + list(tok.encode(text)) + [tok.eos_id]
      if len(ids) > seq_len:
        raise ValueError(f"Text of {len(ids)} tokens is longer than data.seq_len={seq_len}.")
      rows.append(ids)
    b = len(rows)
    tokens = np.full((b, seq_len), tok.pad_id, np.int32)
    seg = np.zeros((b, seq_len), np.int32)
    pos = np.zeros((b, seq_len), np.int32)
    for i, ids in enumerate(rows):
      tokens[i, :len(ids)] = ids
      seg[i, :len(ids)] = 1
      pos[i, :len(ids)] = np.arange(len(ids))
    out = []
    for i in range(b):
      batch = dict(tokens=jnp.asarray(tokens[i:i + 1]), segment_ids=jnp.asarray(seg[i:i + 1]),
                   positions=jnp.asarray(pos[i:i + 1]))
      sums = _eval_sums_jit(self)(self.params, batch, jax.random.key(seed))
      out.append(float(sums["nll_sum"]) / max(float(sums["token_count"]), 1.0))
    return np.asarray(out)


def _eval_sums_jit(run: LoadedRun):
  if not hasattr(run, "_eval_fn"):
    run._eval_fn = parallel.in_sharding_context(jax.jit(run.method.eval_sums), run.mesh)  # pylint: disable=protected-access
  return run._eval_fn  # pylint: disable=protected-access


def sample_batches(run: LoadedRun, s: ml_collections.ConfigDict, seed: int | None = None,
                   prompt_text: str | None = None) -> dict[str, Any]:
  """Runs the method's decoder over ceil(num_samples / batch_size) batches (seed None: s.seed).

  The decoder and its options are checked first (ConfigError naming the sample.* field), as the
  `sample` command does.
  """
  decoders.check_options(s, run.method.family, run.method.default_decoder, run.method.name)
  tok = run.tokenizer
  prompt = None
  if prompt_text or s.prompt:
    ids = [tok.bos_id] + list(tok.encode(prompt_text or s.prompt))
    prompt = np.tile(np.asarray(ids, np.int32)[None], (s.batch_size, 1))
  merged = common.sample_in_batches(
      lambda key: run.method.sample(run.params, key, s, prompt=prompt), s.num_samples,
      s.batch_size, s.seed if seed is None else seed, run.mesh)
  merged["texts"] = run.method.decode_samples(merged, tok) if hasattr(
      run.method, "decode_samples") else [tok.decode(list(r)) for r in merged["tokens"]]
  return merged


def load(workdir: str, step: int | None = None, use_ema: bool = True,
         devices: Sequence[jax.Device] | None = None) -> LoadedRun:
  """Restores a run's config, tokenizer and parameters from `workdir` (newest step by default).

  Args:
    workdir: the --workdir the run was trained in.
    step: a checkpoint step; None picks the newest readable one.
    use_ema: return the EMA parameters when the run kept them.
    devices: where to put the parameters (default: all local devices, replicated).
  """
  if not paths.is_remote(workdir) and not paths.exists(ckpt_lib.checkpoint_dir(workdir)):
    raise ckpt_lib.CheckpointError(f"{workdir} has no checkpoints/ folder; is it a training "
                                   "--workdir?")
  config, config_step = read_run_config(workdir, step)
  # The tokenizer files saved with the run: the corpus is never read again.
  tokenizer = exp_lib.run_tokenizer(workdir, config)
  mesh = _mesh_over(list(devices or jax.local_devices()))
  config.unlock()
  # The batch only needs to divide over the notebook's devices for evaluation helpers.
  n = parallel.data_parallel_size(mesh)
  config.train.global_batch_size = max(n, (config.train.global_batch_size // n) * n)
  config.optim.grad_accum_steps = 1  # a training setting; the micro-batch need not fit here
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = -1, 1, 1
  exp = exp_lib.Experiment.create(config, mesh=mesh, tokenizer=tokenizer, check_data=False)
  ckpt = ckpt_lib.Checkpointer(workdir, read_only=True)
  try:
    # With step=None this walks back past a corrupt newest checkpoint.
    got, state, _ = ckpt.restore(exp.abstract_state(), step=step, check_meta=exp.check_meta)
    del config_step
  finally:
    ckpt.close()
  params = state.ema_params if (use_ema and state.ema_params is not None) else state.params
  return LoadedRun(workdir=workdir, step=got, config=config, tokenizer=exp.tokenizer,
                   method=exp.method, params=params, experiment=exp)


def write_jsonl(path: str, records: Sequence[dict[str, Any]]) -> None:
  """One JSON object per line, to a local path or gs:// (written whole, atomically)."""
  paths.write_text(path, "".join(json.dumps(r) + "\n" for r in records))
