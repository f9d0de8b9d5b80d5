"""The CPU toys of spec/trims.md and spec/decoding.md: one small recipe shared by their models.

d = 64, 4 blocks, 4 heads (max_len 64); AdamW 1e-3, warm-up 200, cosine to 1e-4; no EMA; batch
32; logs every 100 steps. Each toy config (`arith_pretrain.py`, `hmm_heavy.py`) sets its task,
sequence length, step budget and sampler on top.
"""

from configs import base


def get_config():
  c = base.get_config()
  c.method = "mdlm"
  c.data.tokenizer = "bytes"   # unused: each toy task has its own small vocabulary
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
  return c
