"""Synthetic tasks and SFT sets (registered data sources): arith, hmm, sft."""
