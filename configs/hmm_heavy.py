"""HMM-16 heavy denoiser of the model-scheduling toy S (spec/decoding.md): d = 64, 4 blocks.

Rows are BOS + 32 symbols (seq_len 33); vocabulary 16 symbols + BOS, MASK, PAD. Train it next
to `configs/hmm_light.py` (same data stream, same recipe) and sample both with
`python -m dlm_jax.sample --workdir=HEAVY --light_workdir=LIGHT --schedule=L8,H16,L8`.
"""

from configs import base


def get_config():
  c = base.get_config()
  c.method = "mdlm"
  c.data.source = "hmm"
  c.data.tokenizer = "bytes"   # unused: the task has its own 19-symbol vocabulary
  c.data.seq_len = 33          # BOS + 32 symbols
  c.model.num_layers = 4
  c.model.d_model = 64
  c.model.num_heads = 4
  c.model.max_len = 64
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 200
  c.optim.decay = "cosine"
  c.optim.min_lr_ratio = 0.1
  c.optim.grad_clip = 1.0
  c.optim.ema_decay = 0.0
  c.train.global_batch_size = 64
  c.train.num_steps = 3000
  c.train.log_every = 100
  c.train.eval_every = 1000
  c.train.eval_batches = 8
  c.train.ckpt_every = 1000
  c.sample.decoder = "ancestral"
  c.sample.num_steps = 32
  c.sample.gen_len = 32
  c.sample.batch_size = 64
  return c
