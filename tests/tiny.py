"""Small configs shared by the tests (fast on a 2-core CPU)."""

from __future__ import annotations

import ml_collections

from configs import mdlm_tiny

# The same overrides as flags, for tests that run the real entry points in a subprocess.
TINY_FLAGS = [
    "--config.data.tokenizer=bytes", "--config.data.seq_len=32", "--config.model.num_layers=2",
    "--config.model.d_model=32", "--config.model.num_heads=2", "--config.model.max_len=64",
    "--config.train.global_batch_size=8", "--config.train.log_every=2",
    "--config.train.eval_every=1000", "--config.train.eval_batches=2",
    "--config.train.ckpt_every=2", "--config.optim.warmup_steps=2",
    "--config.sample.num_steps=8", "--config.sample.block_len=8", "--config.data.prefetch=0",
]


def tiny_config(**overrides) -> ml_collections.ConfigDict:
  """mdlm_tiny shrunk: bytes tokenizer, L = 32, 2 blocks of width 32, batch 8."""
  c = mdlm_tiny.get_config()
  c.data.tokenizer = "bytes"
  c.data.seq_len = 32
  c.data.prefetch = 0
  c.model.num_layers = 2
  c.model.d_model = 32
  c.model.num_heads = 2
  c.model.max_len = 64
  c.train.global_batch_size = 8
  c.train.num_steps = 6
  c.train.log_every = 2
  c.train.eval_every = 1000
  c.train.eval_batches = 2
  c.train.ckpt_every = 3
  c.train.print_batch = False
  c.optim.warmup_steps = 2
  c.sample.num_steps = 8
  c.sample.block_len = 8
  return apply_overrides(c, **overrides)


def apply_overrides(c: ml_collections.ConfigDict, **overrides) -> ml_collections.ConfigDict:
  """Sets fields named with `__` for dots (train__num_steps=4 -> c.train.num_steps = 4)."""
  for dotted, value in overrides.items():
    node = c
    parts = dotted.split("__")
    for p in parts[:-1]:
      node = node[p]
    node[parts[-1]] = value
  return c
