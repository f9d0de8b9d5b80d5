"""The four arms of the DID HMM-16 toy (spec/did.md, "Toy reproduction on CPU"; benchmarks/did_hmm.py).

  python -m dlm_jax.train --config=configs/hmm_did.py:did_varlen --workdir=/tmp/did_varlen

Arms (d 64, 4 blocks, 4 heads; batch 32; AdamW 1e-3, warm-up 200, cosine; 3,000 steps):
  mdlm_fixed   MDLM on HMM-16 rows of [BOS] + 32 symbols (data.source='hmm').
  did_fixed    DID, DICE + seqnorm head, no time input, same data; survivors of 2 rows packed per model row.
  mdlm_padded  MDLM on variable-length HMM-16 (n ~ U{8..32}) padded to 32 with a PAD token that is masked and
               predicted like any symbol (RADD-style baseline; a sample's length = position of its first PAD).
  did_varlen   DID, DISE + count-softmax head (log L_max = log 32) + time input, same variable-length data
               (padding outside the document: never seen by the network).
"""

import math

from configs import toy_base

ARMS = ("mdlm_fixed", "did_fixed", "mdlm_padded", "did_varlen")


def get_config(arm: str = "did_varlen"):
  if arm not in ARMS:
    raise ValueError(f"configs/hmm_did.py: arm {arm!r} is not one of {ARMS}.")
  c = toy_base.get_config()
  c.data.seq_len = 33          # BOS + up to 32 symbols (vocabulary: 16 symbols + BOS, MASK, PAD)
  c.data.source = "hmm" if arm.endswith("fixed") else "hmm_varlen"
  c.data.min_len = 8
  c.data.pad_as_token = arm == "mdlm_padded"
  c.train.global_batch_size = 32
  c.train.num_steps = 3000
  c.train.eval_every = 1000
  c.train.ckpt_every = 1000
  c.train.keep_ckpts = 20       # the benchmark reads the 1,000 and 3,000 step checkpoints too
  c.train.print_batch = False
  c.diffusion.eval_num_t = 16
  c.sample.num_steps = 32
  c.sample.gen_len = 32
  if arm.startswith("mdlm"):
    c.method = "mdlm"
    c.sample.decoder = "ancestral"
  else:
    c.method = "did"
    c.sample.decoder = "did"
    c.sample.capacity = 32
    c.did.pack = True
    c.did.pack_len = 48           # survivors of 2 rows (+ 2 BOS) in 48 slots: overflow needs > 3.5 sd
    c.did.variant = "fixed" if arm == "did_fixed" else "variable"
    c.model.time_conditioning = arm == "did_varlen"
    c.did.max_log_count = math.log(32.0)
  return c
