"""ARITH-CHAIN SFT, arm T-easy: the TRIMS law on reversed buckets (K + 1 - b, easy slots first)."""

from configs import arith_sft_trims


def get_config():
  c = arith_sft_trims.get_config()
  c.trims.masking = "trims_easy_first"
  return c
