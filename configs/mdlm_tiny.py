"""Embedded default: MDLM on the King James Bible with a 4k byte-level BPE; ~5 minutes on 2 CPU cores."""

from configs import base


def get_config():
  c = base.get_config()
  c.method = "mdlm"
  c.data.source = "bible"
  c.data.tokenizer = "bpe"
  c.data.vocab_size = 4096
  c.data.seq_len = 128
  c.model.num_layers = 4
  c.model.d_model = 128
  c.model.num_heads = 4
  c.model.max_len = 256
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 50
  c.optim.decay = "cosine"
  c.optim.ema_decay = 0.99     # half-life ~70 steps: the EMA has caught up within a 600-step run
  c.train.global_batch_size = 16
  c.train.num_steps = 600
  c.train.log_every = 25
  c.train.eval_every = 300
  c.train.eval_batches = 8
  c.train.ckpt_every = 300
  c.sample.num_steps = 128
  c.sample.block_len = 32
  return c
