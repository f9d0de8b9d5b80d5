"""ARITH-CHAIN SFT, arm T-hard (default TRIMS): hard-first buckets, k ~ U{0..K-1}, p = 0.05/0.95.

Uniform token-mean CE over masked slots (no 1/t), K = 8.
"""

from configs import arith_sft_standard


def get_config():
  c = arith_sft_standard.get_config()
  c.trims.masking = "trims"
  c.trims.weighting = "uniform"
  c.diffusion.normalize = "token"
  c.trims.num_buckets = 8
  c.trims.p_context = 0.05
  c.trims.p_future = 0.95
  c.trims.k_law = "uniform"
  return c
