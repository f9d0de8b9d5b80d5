"""Paper scale MDLM (arXiv 2406.07524): OpenWebText, GPT-2 BPE, L = 1024, DiT-small, batch 512.

Needs the OpenWebText ArrayRecord files prepared once with
  python -m dlm_jax.prepare --dataset=openwebtext --source_dir=/path/to/owt --data_dir=DIR
and `--config.data.tfds_data_dir=DIR`.
"""

from configs import base


def get_config():
  c = base.get_config()
  c.method = "mdlm"
  c.data.source = "tfds"
  c.data.tfds_name = "openwebtext_local"
  c.data.tokenizer = "gpt2"
  c.data.seq_len = 1024
  c.data.train_split = "train"
  c.data.eval_split = "validation"
  c.model.num_layers = 12
  c.model.d_model = 768
  c.model.num_heads = 12
  c.model.max_len = 1024
  c.model.dropout = 0.1
  c.model.dtype = "bfloat16"
  c.model.attention = "auto"
  c.optim.lr = 3e-4
  c.optim.warmup_steps = 2500
  c.optim.decay = "constant"
  c.optim.ema_decay = 0.9999
  c.optim.grad_clip = 1.0
  c.train.global_batch_size = 512
  c.train.num_steps = 1_000_000
  c.train.log_every = 100
  c.train.eval_every = 10_000
  c.train.ckpt_every = 5_000
  c.sample.num_steps = 1000
  c.sample.gen_len = 1024
  return c
