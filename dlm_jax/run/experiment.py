"""Builds what every entry point shares from a config: tokenizer, method, optimizer, state.

train, evaluate, sample and `dlm_jax.load` all go through here, so a checkpoint written by one is
read back identically by the others. `validate_config` is the one start-up check: the schema and
values (`dlm_jax.config.validate`), then each plug-in field against its registry (method, data
source, attention backend, decoder) with the plug-in's own checks.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

from dlm_jax import config as config_lib
from dlm_jax import methods
from dlm_jax import parallel
from dlm_jax import paths
from dlm_jax.data import sources
from dlm_jax.data import tokenizer_store
from dlm_jax.models import attention
from dlm_jax.models import flops as flops_lib
from dlm_jax.run.checkpoint import CheckpointError
from dlm_jax.sampling import decoders


# config.model fields a checkpoint must agree with (saved in its metadata): the first five fix
# the parameter shapes, the others the function the parameters compute.
SHAPE_FIELDS = ("num_layers", "d_model", "num_heads", "mlp_ratio", "time_conditioning")
NETWORK_FIELDS = SHAPE_FIELDS + ("adaln_always", "ln_scale_with_adaln", "ln_eps",
                                 "ln_fast_variance", "rope_freqs")


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any


def learning_rate_schedule(optim: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
  """Linear warm-up to optim.lr, then constant, cosine or linear decay to min_lr_ratio * lr."""
  warm = max(int(optim.warmup_steps), 0)
  peak = float(optim.lr)
  end = peak * float(optim.min_lr_ratio)
  decay_steps = max(num_steps - warm, 1)
  if optim.decay == "constant":
    after = optax.constant_schedule(peak)
  elif optim.decay == "cosine":
    after = optax.cosine_decay_schedule(peak, decay_steps, alpha=optim.min_lr_ratio)
  else:
    after = optax.linear_schedule(peak, end, decay_steps)
  if warm == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warm), after], [warm])


def make_optimizer(optim: ml_collections.ConfigDict, num_steps: int):
  """AdamW (decay on matrices only) with global-norm clipping; returns (tx, lr_schedule)."""
  lr = learning_rate_schedule(optim, num_steps)
  decay_mask = lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)  # noqa: E731
  parts = []
  if optim.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(optim.grad_clip))
  parts.append(optax.adamw(lr, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                           weight_decay=optim.weight_decay, mask=decay_mask))
  return optax.chain(*parts), lr


def validate_config(config: ml_collections.ConfigDict, *, num_data_parallel: int | None = None,
                    process_count: int = 1, check_data: bool = True) -> None:
  """The start-up check; raises ConfigError naming the field to fix.

  Fills config.sample.decoder with the method's default decoder when it is empty.
  `check_data=False` skips the data source's own check (a saved run opened for sampling or
  scoring needs neither its corpus nor its data files).
  """
  config_lib.validate(config, num_data_parallel=num_data_parallel, process_count=process_count,
                      check_files=check_data)
  method_cls = methods.get_method_class(config.method)
  source = sources.get(config.data.source)
  attention.check_config(config.model, config)
  method_cls.check_config(config)
  if check_data:
    source.check(config)
  decoders.check_options(config.sample, method_cls.family, method_cls.default_decoder,
                         method_cls.name)
  if not config.sample.decoder:
    config.sample.decoder = method_cls.default_decoder


def make_tokenizer(config: ml_collections.ConfigDict):
  """The tokenizer of the run's data source (a 'bpe' is trained once on the corpus, cached)."""
  return sources.get(config.data.source).make_tokenizer(config)


TOKENIZER_DIR = "tokenizer"


def tokenizer_dir(workdir: str) -> str:
  """<workdir>/tokenizer: the run's tokenizer files (see `save_run_tokenizer`)."""
  return paths.join(workdir, TOKENIZER_DIR)


def save_run_tokenizer(workdir: str, tokenizer: Any) -> dict[str, Any]:
  """Saves `tokenizer` into <workdir>/tokenizer/ (local or gs://) and returns what it recorded.

  The trainer calls it when a run starts; a tool that writes a workdir by other means (e.g. an
  import of foreign weights) calls it too, with the run's tokenizer object (e.g.
  `dlm_jax.data.tokenizers.get_tokenizer("gpt2")`). Files: `tokenizer_info.json` (kind, name,
  vocabulary size, special ids, fingerprint) plus `tokenizer.json` (HF format) for a trained BPE or
  a user's tokenizer file; fixed tokenizers (gpt2, bytes) are recorded by name. `dlm_jax.load`,
  sample, evaluate and score_difficulty then read these files and never the corpus.
  """
  return tokenizer_store.save(tokenizer, tokenizer_dir(workdir))


def run_tokenizer(workdir: str, config: ml_collections.ConfigDict | None = None) -> Any:
  """The tokenizer saved with the run in `workdir`.

  A workdir written before runs saved their tokenizer has no such files: then the tokenizer is
  built from `config` as at training time (which may read the corpus).
  """
  folder = tokenizer_dir(workdir)
  if tokenizer_store.exists(folder):
    try:
      return tokenizer_store.load(folder)
    except tokenizer_store.TokenizerFilesError as e:
      raise CheckpointError(f"{e} Restore the folder {folder} from a copy of the run.") from e
  if config is None:
    raise CheckpointError(f"{workdir} has no saved tokenizer ({folder}).")
  return make_tokenizer(config)


def make_train_iterator(config: ml_collections.ConfigDict, tokenizer: Any):
  """Per-process, checkpointable iterator of local batches {tokens, segment_ids, positions, ...}."""
  return sources.get(config.data.source).train_iterator(config, tokenizer)


def make_eval_iterator(config: ml_collections.ConfigDict, tokenizer: Any,
                       batch_size: int | None = None):
  """Finite, deterministic iterator over the evaluation split."""
  return sources.get(config.data.source).eval_iterator(
      config, tokenizer, batch_size or config.train.global_batch_size)


@dataclasses.dataclass
class Experiment:
  """Config + tokenizer + method + optimizer + mesh, and the sharded state they imply."""
  config: ml_collections.ConfigDict
  tokenizer: Any
  method: Any
  mesh: jax.sharding.Mesh
  tx: optax.GradientTransformation
  lr_schedule: optax.Schedule

  @classmethod
  def create(cls, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None,
             tokenizer: Any = None, process_count: int | None = None,
             check_data: bool = True) -> "Experiment":
    """`process_count`: hosts the run spans (default: this job's); ahead-of-time compilation
    passes the target topology's, since the batch must divide over its hosts.
    `check_data=False` (with the run's saved `tokenizer`): open a saved run without its data."""
    mesh = mesh or parallel.make_mesh(config.mesh)
    validate_config(config, num_data_parallel=parallel.data_parallel_size(mesh),
                    process_count=process_count or jax.process_count(), check_data=check_data)
    tokenizer = tokenizer or make_tokenizer(config)
    method = methods.make_method(config, tokenizer)
    tx, lr = make_optimizer(config.optim, config.train.num_steps)
    return cls(config, tokenizer, method, mesh, tx, lr)

  # -- state -----------------------------------------------------------------------------------
  def _init_state(self, key: jax.Array) -> TrainState:
    params = self.method.init_params(key)
    ema = params if self.config.optim.ema_decay > 0 else None
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=ema,
                      opt_state=self.tx.init(params))  # boxed: moments shard like params

  def state_shardings(self) -> Any:
    """NamedShardings of the train state, from the parameters' logical axis names."""
    abstract = jax.eval_shape(self._init_state, jax.random.key(0))
    logical = nn.get_partition_spec(abstract)
    return parallel.logical_to_sharding(logical, self.mesh)

  def abstract_state(self) -> TrainState:
    """ShapeDtypeStructs (with shardings) of the unboxed train state."""
    abstract = jax.eval_shape(lambda k: nn.meta.unbox(self._init_state(k)), jax.random.key(0))
    shardings = self.state_shardings()
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        abstract, shardings)

  def init_state(self, seed: int) -> TrainState:
    shardings = self.state_shardings()
    init = jax.jit(lambda k: nn.meta.unbox(self._init_state(k)), out_shardings=shardings)
    return parallel.in_sharding_context(init, self.mesh)(jax.random.key(seed))

  def num_params(self) -> int:
    abstract = jax.eval_shape(lambda k: nn.meta.unbox(self.method.init_params(k)),
                              jax.random.key(0))
    return int(sum(x.size for x in jax.tree.leaves(abstract)))

  def step_flops(self) -> float:
    """Analytic model FLOPs of one training step over the global batch (models/flops.py); the
    network's rows and length come from the method (DID: packed model rows)."""
    rows, length = self.method.train_model_shape(int(self.config.train.global_batch_size))
    return flops_lib.train_step_flops(self.method.model_cfg, rows, length)

  def checkpoint_meta(self) -> dict[str, Any]:
    tok = self.tokenizer
    return dict(method=self.config.method, tokenizer=getattr(tok, "name", "?"),
                tokenizer_fingerprint=tok.fingerprint() if hasattr(tok, "fingerprint") else "",
                vocab_size=int(tok.vocab_size),
                model={k: self.config.model[k] for k in NETWORK_FIELDS},
                seq_len=int(self.config.data.seq_len))

  def check_meta(self, meta: dict[str, Any]) -> None:
    """Raises CheckpointError when a checkpoint cannot belong to this config."""
    mine = self.checkpoint_meta()
    if meta.get("method") != mine["method"]:
      raise CheckpointError(
          f"The checkpoint was trained with method={meta.get('method')!r} but config.method="
          f"{mine['method']!r}; use another --workdir or set --config.method="
          f"{meta.get('method')}.")
    if meta.get("tokenizer_fingerprint") and meta["tokenizer_fingerprint"] != mine[
        "tokenizer_fingerprint"]:
      raise CheckpointError(
          f"The checkpoint's tokenizer ({meta.get('tokenizer')}, vocab {meta.get('vocab_size')}) "
          f"differs from config.data.tokenizer ({mine['tokenizer']}, vocab {mine['vocab_size']}); "
          "resume with the tokenizer the run started with.")
    for k, v in mine["model"].items():
      if meta.get("model", {}).get(k, v) != v:
        raise CheckpointError(
            f"config.model.{k}={v!r} but the checkpoint has {meta['model'][k]!r}: the "
            f"{'shapes' if k in SHAPE_FIELDS else 'networks'} differ; restore the original value "
            "or start a new --workdir.")


def log_config(config: ml_collections.ConfigDict) -> None:
  logging.info("Config:\n%s", config)
