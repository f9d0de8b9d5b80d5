"""configs/mdlm_owt.py with the published PyTorch MDLM network (its `DIT`, cond_dim 128) and noise
process: the recipe for fine-tuning or evaluating weights imported with
`python -m dlm_jax.import_mdlm` (kuleshov-group/mdlm-owt, or a Lightning checkpoint of that code):

  python -m dlm_jax.train --config=configs/mdlm_owt_dit.py --workdir=gs://bucket/ft \
      --config.train.init_from=workdirs/mdlm_owt --config.data.tfds_data_dir=/data/tfds
"""

from configs import mdlm_owt


def get_config():
  c = mdlm_owt.get_config()
  c.model.cond_dim = 128
  c.model.adaln_always = True          # their network is adaLN-modulated at sigma = 0
  c.model.ln_scale_with_adaln = True   # weight-only LayerNorms, then adaLN
  c.model.ln_eps = 1e-5
  c.model.ln_fast_variance = False
  c.model.rope_freqs = "reciprocal"
  c.diffusion.eps = 1e-3               # their LogLinearNoise: move chance (1 - 1e-3) t
  return c
