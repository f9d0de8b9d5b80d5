"""Paper scale MDLM (arXiv 2406.07524): OpenWebText, GPT-2 BPE, L = 1024, DiT-small, batch 512.

Needs the OpenWebText ArrayRecord files prepared once with
  python -m dlm_jax.prepare --dataset=openwebtext --source_dir=/path/to/owt --data_dir=DIR
and `--config.data.tfds_data_dir=DIR`.

`--config=configs/mdlm_owt.py:runlocal` is its small local twin (2 blocks of width 128 with 2 heads,
so the paper's head dimension 64, length 256, batch 16; the same vocabulary, attention and settings
otherwise): a smoke run, and what the tests compile for a TPU instead of the full size.
"""

from configs import base


VARIANTS = ("", "runlocal")


def shrink(c, arg):
  """Applies the named variant (`VARIANTS`) to a paper-scale config."""
  if arg not in VARIANTS:
    raise ValueError(f"unknown config variant {arg!r}; choose one of {VARIANTS[1:]} (or none).")
  if arg == "runlocal":
    c.model.num_layers = 2
    c.model.d_model = 128
    c.model.num_heads = 2
    c.data.seq_len = 256
    c.model.max_len = 256 + (c.model.max_len - 1024)  # did_owt keeps its +1 for BOS
    c.train.global_batch_size = 16
    c.train.log_every = 10
    c.sample.gen_len = 0
    c.sample.num_steps = 16
    if c.sample.capacity:
      c.sample.capacity = 256
  return c


def get_config(arg=None):
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
  return shrink(c, arg or "")
