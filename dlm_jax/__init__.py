"""dlm-jax: diffusion language models (MDLM, DID, TRIMS, fast decoding) in JAX/Flax."""

import os as _os

__version__ = "0.1.0"


def _default_cpu_xla_flags() -> None:
  """Turns off XLA:CPU's YNNPACK dot fusions unless the user set that flag themselves.

  Measured on a 2-core AVX2 host with jaxlib 0.10.2 (benchmarks/train_throughput.py): the MDLM
  train step runs 20-25% faster with XLA's own matmul emitters than with the YNN fusions. Only
  the host CPU backend reads this flag (TPU/GPU computations are unaffected). It must be in
  XLA_FLAGS before the first JAX computation, so it is set when dlm_jax is imported; set
  DLM_JAX_KEEP_XLA_FLAGS=1 to leave XLA_FLAGS untouched. Older jaxlibs do not know the flag and
  would abort on it, hence the version check.
  """
  if _os.environ.get("DLM_JAX_KEEP_XLA_FLAGS"):
    return
  flags = _os.environ.get("XLA_FLAGS", "")
  if "xla_cpu_experimental_ynn_fusion_type" in flags:
    return
  try:
    from importlib import metadata  # pylint: disable=g-import-not-at-top
    major, minor = (int(x) for x in metadata.version("jaxlib").split(".")[:2])
  except Exception:  # pylint: disable=broad-except
    return
  if (major, minor) >= (0, 10):
    _os.environ["XLA_FLAGS"] = (flags + " --xla_cpu_experimental_ynn_fusion_type=").strip()


_default_cpu_xla_flags()


def load(workdir: str, step: int | None = None, **kwargs):
  """Opens a training run in a notebook; see `dlm_jax.run.api.load`."""
  from dlm_jax.run import api  # pylint: disable=g-import-not-at-top  (importing dlm_jax stays light)
  return api.load(workdir, step=step, **kwargs)
