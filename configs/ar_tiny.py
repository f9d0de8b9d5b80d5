"""Small causal LM on the embedded corpus: the judge for generative perplexity of tiny runs."""

from configs import mdlm_tiny


def get_config():
  c = mdlm_tiny.get_config()
  c.method = "ar"
  c.sample.decoder = "autoregressive"  # left to right (the causal family's decoder)
  return c
