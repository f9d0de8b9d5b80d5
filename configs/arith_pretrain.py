"""ARITH-CHAIN (spec/trims.md): base MDLM student, prompt never masked, fresh generator stream."""

from configs import toy_base


def get_config():
  c = toy_base.get_config()
  c.data.source = "arith"
  c.data.seq_len = 35          # prompt 10 + response 25
  c.sample.decoder = "threshold"
  c.sample.block_len = 8
  c.sample.gen_len = 24        # decoded slots (3 blocks of 8); slot 25 is always EOS fill
  return c
