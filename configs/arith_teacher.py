"""ARITH-CHAIN causal teacher (spec/trims.md): d = 64, 3 blocks, early-stopped at 400 steps."""

from configs import arith_pretrain


def get_config():
  c = arith_pretrain.get_config()
  c.method = "ar"
  c.sample.decoder = "autoregressive"
  c.model.num_layers = 3
  c.train.num_steps = 400
  c.optim.warmup_steps = 50
  c.train.eval_every = 200
  c.train.ckpt_every = 200
  return c
