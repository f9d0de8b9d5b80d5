"""dlm-jax: diffusion language models (MDLM, DID, TRIMS, fast decoding) in JAX/Flax."""

__version__ = "0.1.0"


def load(workdir: str, step: int | None = None, **kwargs):
  """Opens a training run in a notebook; see `dlm_jax.api.load`."""
  from dlm_jax import api  # pylint: disable=g-import-not-at-top
  return api.load(workdir, step=step, **kwargs)
