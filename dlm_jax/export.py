r"""Export a run's parameters as safetensors with its config as JSON.

  python -m dlm_jax.export --workdir=workdirs/run1 --out=exported/run1 [--no_ema] [--step=N]

Writes OUT/model.safetensors (parameter names as in the Flax tree, '/'-joined; EMA parameters
unless --no_ema) and OUT/config.json (the run's config). For a run of the published PyTorch MDLM
network (an imported one, or one trained with its model options) it also writes OUT/pytorch/:
model.safetensors in the PyTorch key layout (`backbone.*`) and a Hugging Face config.json, the
layout `python -m dlm_jax.import_mdlm` reads (export after import gives back the same tensors).
"""

from __future__ import annotations

from absl import app
from absl import flags

from dlm_jax import config as config_lib
from dlm_jax.run import checkpoint as ckpt_lib
from dlm_jax.run import cli
from dlm_jax.run import interop

_WORKDIR = flags.DEFINE_string("workdir", None, "The run's workdir.")
_OUT = flags.DEFINE_string("out", None, "Folder to write the export into.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: newest).")
_NO_EMA = flags.DEFINE_bool("no_ema", False, "Export the raw parameters instead of the EMA.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an earlier export in --out.")


def main(argv):
  if len(argv) > 1:
    cli.fail(f"Unexpected arguments: {argv[1:]} (flags need '--name=value').")
  if not _WORKDIR.value or not _OUT.value:
    cli.fail("--workdir and --out are required, e.g. --workdir=workdirs/run1 --out=exported/run1.")
  try:
    interop.export(_WORKDIR.value, _OUT.value, use_ema=not _NO_EMA.value, step=_STEP.value,
                   overwrite=_OVERWRITE.value)
  except (interop.InteropError, config_lib.ConfigError, ckpt_lib.CheckpointError,
          FileNotFoundError) as e:
    cli.fail(str(e))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
