"""Paper-scale DID (arXiv 2603.23507), fixed-length setting: OpenWebText, GPT-2 BPE, L = 1024,
the same DiT-small trunk as configs/mdlm_owt.py (12 x 768, 12 heads), batch 512, AdamW 3e-4.

Fixed length = the paper's OWT setup: DICE loss + seqnorm head, no time input (the paper reports
plain DISE with time input does worse here). Each packed document scores its insertions with a row
softmax over its own gaps scaled by n - m; sampling fills `sample.capacity` (default 1024) tokens.
Packing: the survivors of two 1024-token rows share one 1152-slot model row (antithetic times), so a
step runs 256 x 1152 tokens instead of MDLM's 512 x 1024 (0.56x). For the variable-length setting
(DISE + count-softmax + time input, AdamW 1e-4, 60k steps in the paper) pass
  --config.did.variant=variable --config.model.time_conditioning=True --config.optim.lr=1e-4
with data.packing=pad on a short-document corpus.

Needs the OpenWebText ArrayRecord files prepared once with
  python -m dlm_jax.prepare --dataset=openwebtext --source_dir=/path/to/owt --data_dir=DIR
and `--config.data.tfds_data_dir=DIR`.

`--config=configs/did_owt.py:runlocal` is its small local twin (see configs/mdlm_owt.py).
"""

from configs import mdlm_owt


def get_config(arg=None):
  c = mdlm_owt.get_config()
  c.method = "did"
  c.model.max_len = 1025                 # [BOS] + up to 1024 tokens
  c.model.time_conditioning = False      # fixed length: no time input
  c.did.variant = "fixed"      # DICE + seqnorm head
  c.did.max_log_count = 6.931471805599453  # log(1024) (variable variant only)
  c.did.pack = True
  c.did.pack_len = 0           # auto: 1152
  c.diffusion.eval_num_t = 16
  c.sample.decoder = "did"
  c.sample.num_steps = 1024
  c.sample.capacity = 1024
  c.sample.gen_len = 0
  return mdlm_owt.shrink(c, arg or "")
