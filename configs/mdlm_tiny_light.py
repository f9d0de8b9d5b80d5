"""Light twin of `configs/mdlm_tiny.py` for model scheduling: 1 block instead of 4.

Same corpus, tokenizer, width, method and recipe, so the two checkpoints share the interface
x_t -> p(x0 | x_t) and can be mixed step by step:
`python -m dlm_jax.sample --workdir=HEAVY --light_workdir=LIGHT --schedule=L32,H64,L32`.
"""

from configs import mdlm_tiny


def get_config():
  c = mdlm_tiny.get_config()
  c.model.num_layers = 1
  return c
