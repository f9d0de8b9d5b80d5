"""ARITH-CHAIN SFT, arm T-rand: the TRIMS law on hard-first labels permuted within each response.

The permutation is seeded by the example id and fixed for the whole run.
"""

from configs import arith_sft_trims


def get_config():
  c = arith_sft_trims.get_config()
  c.trims.masking = "random_buckets"
  return c
