"""ARITH-CHAIN SFT, arm S-u: standard random masking with the uniform token-mean CE of TRIMS.

The control for the loss weight: it differs from T-hard only in the masking law.
"""

from configs import arith_sft_standard


def get_config():
  c = arith_sft_standard.get_config()
  c.trims.weighting = "uniform"  # mean CE over the masked slots of the global batch
  c.diffusion.normalize = "token"
  return c
