"""What a method is: pure functions of (params, batch, key) behind one small interface.

The train loop only ever calls `train_loss`, `eval_sums` and `sample`; it never branches on the
method's name. Everything static (the Flax module, special token ids, the config) lives on the
method object, so its functions close over nothing that changes between steps.

A method also says which decoders fit it: `family` names the decoder family its model serves
("masked": logits over a partly masked sequence; "insertion": insertion scores per gap;
"causal": next-token logits), and `default_decoder` the one used when `config.sample.decoder`
is empty. `check_config` raises `ConfigError` for settings the method cannot run.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from dlm_jax.config import ConfigError
from dlm_jax.models.transformer import DTYPES, Transformer, TransformerConfig
from dlm_jax.sampling import decoders
from dlm_jax.sampling import sparse


@dataclasses.dataclass(frozen=True)
class SpecialIds:
  bos: int
  eos: int
  mask: int
  pad: int
  vocab_size: int

  @classmethod
  def from_tokenizer(cls, tok: Any) -> "SpecialIds":
    return cls(bos=tok.bos_id, eos=tok.eos_id, mask=tok.mask_id, pad=tok.pad_id,
               vocab_size=tok.vocab_size)


class Method:
  """Base class: subclasses define `name`, `family`, `default_decoder`, `model_config`,
  `train_loss`, `eval_sums` and their sampling pieces."""

  name = "base"
  family = ""            # decoder family (see the module docstring)
  default_decoder = ""   # decoder used when config.sample.decoder is ""

  @classmethod
  def check_config(cls, config: ml_collections.ConfigDict) -> None:
    """Settings this method cannot run (ConfigError naming the field); called at start-up."""
    extra = cls.extra_positions
    if config.data.seq_len + extra > config.model.max_len:
      raise ConfigError(
          f"config.data.seq_len: {config.data.seq_len}{' (+1 for BOS)' if extra else ''} is longer "
          f"than model.max_len={config.model.max_len}; raise model.max_len or shorten "
          "data.seq_len.")

  @classmethod
  def decoder_name(cls, sample_cfg: Any) -> str:
    """The decoder `sample_cfg.decoder` names, or the method's default when it is empty."""
    return sample_cfg.decoder or cls.default_decoder

  def __init__(self, config: ml_collections.ConfigDict, ids: SpecialIds):
    self.config = config
    self.ids = ids
    self.model_cfg = self.model_config()
    self.model = Transformer(self.model_cfg)

  # -- model -------------------------------------------------------------------------------
  def model_config(self) -> TransformerConfig:
    return TransformerConfig.from_config(self.config.model, self.ids.vocab_size)

  def init_params(self, key: jax.Array, batch_size: int = 1) -> Any:
    length = self.config.data.seq_len + self.extra_positions
    tokens = jnp.zeros((batch_size, length), jnp.int32)
    t = jnp.ones((batch_size,), jnp.float32) if self.model_cfg.time_conditioning else None
    return self.model.init(key, tokens, t=t)["params"]

  extra_positions = 0  # DID prepends BOS to x_t
  # Gradient accumulation (optim.grad_accum_steps) splits a batch into micro-batches of whole
  # groups of this many consecutive rows (DID's packing puts a pair of rows in one model row).
  row_group = 1
  # Metrics that are counts over the batch (summed over micro-batches; the others are averaged).
  summed_metrics: tuple[str, ...] = ()

  def train_model_shape(self, batch_size: int) -> tuple[int, int]:
    """(rows, length) of the network input of one training step on `batch_size` data rows."""
    return batch_size, self.config.data.seq_len + self.extra_positions

  def apply(self, params: Any, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array,
            t: jax.Array | None, dropout_key: jax.Array | None = None,
            features_only: bool = False, t_index: jax.Array | None = None):
    """Runs the network; returns (logits [B, L, V] float32, aux or None).

    With `features_only`, the first output is the hidden state [B, L, d] before the head; with
    `t_index` [B, L], `t` is [B, S] and token l is conditioned on t[b, t_index[b, l]].
    """
    deterministic = dropout_key is None or self.model_cfg.dropout == 0.0
    rngs = None if deterministic else {"dropout": dropout_key}
    if not self.model_cfg.time_conditioning:
      t = None
    return self.model.apply({"params": params}, tokens, positions, segment_ids, t,
                            deterministic, features_only, t_index,
                            rngs=rngs)

  def logits_fn(self, params: Any):
    """Closure tokens [B, L] -> logits [B, L, V]: one unsegmented row per sample (samplers)."""

    def fn(tokens):
      b, length = tokens.shape
      pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
      return self.apply(params, tokens, pos, jnp.ones((b, length), jnp.int32), None)[0]

    return fn

  def features_fn(self, params: Any):
    """Closure (tokens [B, L], valid [B, L] bool or None) -> final hidden states h [B, L, d].

    `valid` False marks padding (segment id 0): real positions never attend to it, so a row
    padded on the right gives the same h on its real positions as the unpadded row.
    """

    def fn(tokens, valid=None):
      b, length = tokens.shape
      pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
      seg = jnp.ones((b, length), jnp.int32) if valid is None else valid.astype(jnp.int32)
      return self.apply(params, tokens, pos, seg, None, features_only=True)[0]

    return fn

  def head_fn(self, params: Any):
    """Closure h [..., d] -> logits [..., V] float32: the model's output layer on any rows.

    The same operations as the head inside `Transformer` (tied: the embedding table divided by
    sqrt(d); untied: `params['head']`), so head_fn(features_fn(x)) equals logits_fn(x).
    """
    cfg = self.model_cfg
    dtype = DTYPES[cfg.dtype]
    if cfg.tie_embeddings:
      table = params["embed"]["embedding"]
      scale = math.sqrt(cfg.d_model)

      def tied(h):
        return (jnp.dot(h.astype(dtype), table.astype(dtype).T) / scale).astype(jnp.float32)

      return tied
    kernel, bias = params["head"]["kernel"], params["head"]["bias"]

    def untied(h):
      y = jax.lax.dot_general(h.astype(dtype), kernel.astype(dtype),
                              (((h.ndim - 1,), (0,)), ((), ())))
      return (y + bias.astype(dtype)).astype(jnp.float32)

    return untied

  def denoiser(self, params: Any) -> sparse.Denoiser:
    """The network split at its final hidden state, for the fast decoders (`sampling.sparse`)."""
    return sparse.Denoiser(features=self.features_fn(params), head=self.head_fn(params))

  # -- interface ---------------------------------------------------------------------------
  def train_loss(self, params: Any, batch: dict[str, jax.Array], key: jax.Array,
                 train: bool = True) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss, metrics) of a batch; the trainer logs every metric.

    A loss normalised by a count of the batch (tokens, masked slots) returns that count as
    metrics['loss_weight']: gradient accumulation weighs micro-batches by it, so k micro-batches
    give the loss and gradient of the undivided batch (without it they are weighed equally).
    Random draws stratified over the batch use `diffusion.keys.step_rows(batch, ...)`.
    """
    raise NotImplementedError

  def eval_sums(self, params: Any, batch: dict[str, jax.Array], key: jax.Array) -> dict[str, jax.Array]:
    """Sums over the batch for a likelihood report: {'nll_sum', 'token_count'} (nats)."""
    raise NotImplementedError

  def sample(self, params: Any, key: jax.Array, sample_cfg: ml_collections.ConfigDict,
             prompt: jax.Array | None = None, layout: Any = None) -> dict[str, Any]:
    """Generates sample_cfg.batch_size rows with the configured decoder of the method's family.

    The decoder and its options are checked first (`decoders.check_options`), so a notebook
    call refuses what the command line refuses. `layout` (instead of `prompt`) conditions each
    row separately: a `sampling.common.MaskedLayout` for masked decoders, a
    `methods.did.sampler.GapLayout` for the insertion decoder (prompts of different lengths,
    infilling). Returns the decoder's output dict (tokens, nfe, ...) plus prompt_len and gen_len.
    """
    decoder = decoders.check_options(sample_cfg, self.family, self.default_decoder)
    if layout is None:
      return decoder.sample(self, params, key, sample_cfg, prompt)
    return decoder.sample(self, params, key, sample_cfg, prompt, layout=layout)
