"""ARITH-CHAIN (spec/trims.md): base MDLM student, prompt never masked, fresh generator stream."""

from configs import base


def get_config():
  c = base.get_config()
  c.method = "mdlm"
  c.data.source = "arith"
  c.data.tokenizer = "bytes"   # unused: the task has its own 20-symbol vocabulary
  c.data.seq_len = 35          # prompt 10 + response 25
  c.model.num_layers = 4
  c.model.d_model = 64
  c.model.num_heads = 4
  c.model.max_len = 64
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 200
  c.optim.decay = "cosine"
  c.optim.min_lr_ratio = 0.1
  c.optim.ema_decay = 0.0
  c.train.global_batch_size = 32
  c.train.num_steps = 3000
  c.train.log_every = 100
  c.train.eval_every = 1000
  c.train.eval_batches = 8
  c.train.ckpt_every = 1000
  c.sample.decoder = "threshold"
  c.sample.block_len = 8
  c.sample.gen_len = 24        # decoded slots (3 blocks of 8); slot 25 is always EOS fill
  return c
