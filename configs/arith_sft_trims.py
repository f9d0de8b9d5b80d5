"""ARITH-CHAIN SFT, arm T-hard (default TRIMS): hard-first buckets, k ~ U{0..K-1}, p = 0.05/0.95.

Uniform token-mean CE over masked slots (no 1/t), K = 8.
"""

from configs import arith_sft_standard


def get_config():
  c = arith_sft_standard.get_config()
  c.diffusion.masking = "trims"
  c.diffusion.sft_weighting = "uniform"
  c.diffusion.normalize = "token"
  c.diffusion.trims_buckets = 8
  c.diffusion.trims_p_context = 0.05
  c.diffusion.trims_p_future = 0.95
  c.diffusion.trims_k_law = "uniform"
  return c
