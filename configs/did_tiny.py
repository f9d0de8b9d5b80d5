"""Embedded default for DID: the King James Bible, 4k BPE, the same model and budget as mdlm_tiny.

Variable-length DID (DISE + count-softmax head + time input) with packing: the survivors of two
128-token rows share one model row of 160 slots, so at batch 32 a step processes 16 x 160 = 2,560 tokens where
MDLM processes 32 x 128 = 4,096 at batch 32. Compare with configs/mdlm_tiny.py (same width, depth, batch, steps,
optimiser) and judge samples with configs/ar_tiny.py.
"""

from configs import mdlm_tiny


def get_config():
  c = mdlm_tiny.get_config()
  c.method = "did"
  c.model.max_len = 256                 # >= seq_len + 1 (BOS)
  c.model.time_conditioning = True      # variable-length DID takes t
  c.did.variant = "variable"  # DISE + count-softmax head
  c.did.max_log_count = 4.852030263919617  # log(128): at most seq_len tokens per gap
  c.did.pack = True
  c.did.pack_len = 0          # auto: 160 for seq_len 128
  c.diffusion.eval_num_t = 8
  c.sample.decoder = "did"
  c.sample.num_steps = 128
  c.sample.capacity = 0                 # = data.seq_len
  return c
