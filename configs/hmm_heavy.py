"""HMM-16 heavy denoiser of the model-scheduling toy S (spec/decoding.md): d = 64, 4 blocks.

Rows are BOS + 32 symbols (seq_len 33); vocabulary 16 symbols + BOS, MASK, PAD. Train it next
to `configs/hmm_light.py` (same data stream, same recipe) and sample both with
`python -m dlm_jax.sample --workdir=HEAVY --light_workdir=LIGHT --schedule=L8,H16,L8`.
"""

from configs import toy_base


def get_config():
  c = toy_base.get_config()
  c.data.source = "hmm"
  c.data.seq_len = 33          # BOS + 32 symbols (vocabulary: 16 symbols + BOS, MASK, PAD)
  c.train.global_batch_size = 64
  c.sample.decoder = "ancestral"
  c.sample.num_steps = 32
  c.sample.gen_len = 32
  c.sample.batch_size = 64
  return c
