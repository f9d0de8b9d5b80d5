"""HMM-16 light denoiser of the model-scheduling toy S (spec/decoding.md): d = 32, 1 block.

Same data, tokenizer, method and recipe as `configs/hmm_heavy.py`; 1,000 steps (the spec's
precondition: all-light gen-NLL exceeds all-heavy by >= 0.05 nats/token, which the pilot's
d = 64 light model missed).
"""

from configs import hmm_heavy


def get_config():
  c = hmm_heavy.get_config()
  c.model.num_layers = 1
  c.model.d_model = 32
  c.model.num_heads = 2
  c.train.num_steps = 1000
  c.train.eval_every = 500
  c.train.ckpt_every = 500
  return c
