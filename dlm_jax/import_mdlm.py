r"""Import the published PyTorch MDLM weights (github kuleshov-group/mdlm) into a dlm-jax workdir.

  python -m dlm_jax.import_mdlm --checkpoint=mdlm-owt/ --workdir=workdirs/mdlm_owt
  python -m dlm_jax.import_mdlm --checkpoint=last.ckpt --ema --n_heads=12 --workdir=workdirs/mine
  python -m dlm_jax.import_mdlm --checkpoint=model.safetensors --n_heads=12 --workdir=OUT \
      --config=configs/mdlm_owt.py --config.data.tfds_data_dir=/data/tfds

--checkpoint is a .safetensors file or a Hugging Face model folder (model.safetensors +
config.json, as kuleshov-group/mdlm-owt) with `backbone.*` keys, a Lightning .ckpt of the published
code (its state_dict; with --ema also its EMA weights, which `dlm_jax.load` then uses), or a
torch.save'd state dict. Torch is not needed. --n_heads is not in any weight shape: give it unless
the folder's config.json, the .ckpt's hyper-parameters or the rotary buffer say it.

The workdir is a run like any other (`dlm_jax.load`, sample, evaluate, train
--config.train.init_from): the recipe is --config (default: GPT-2 tokenizer, vocab 50258 with mask
50257, seq_len = the model's length, the published noise process; the embedded corpus as data),
and the model fields come from the checkpoint. A checkpoint whose keys or shapes do not fit is
refused with the first key that fails and what was expected (exit status 2).
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from dlm_jax import config as config_lib
from dlm_jax.run import checkpoint as ckpt_lib
from dlm_jax.run import cli
from dlm_jax.run import interop

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A .safetensors file, a Lightning .ckpt, a "
                                  "torch.save'd state dict or a Hugging Face model folder.")
_WORKDIR = flags.DEFINE_string("workdir", None, "The new workdir to write (must hold no "
                               "checkpoint).")
_HEADS = flags.DEFINE_integer("n_heads", None, "Attention heads (not in the weight shapes; 12 for "
                              "mdlm-owt).")
_EMA = flags.DEFINE_bool("ema", False, "Lightning .ckpt: use its EMA weights (kept as the run's "
                         "EMA parameters; the raw state_dict as its parameters).")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Optional recipe for the run (data, training, sampling), e.g. "
    "configs/mdlm_owt.py; its model fields are replaced by the checkpoint's.", lock_config=False)


def main(argv):
  if len(argv) > 1:
    cli.fail(f"Unexpected arguments: {argv[1:]} (flags need '--name=value').")
  if not _CHECKPOINT.value or not _WORKDIR.value:
    cli.fail("--checkpoint and --workdir are required, e.g. --checkpoint=mdlm-owt/ "
             "--workdir=workdirs/mdlm_owt.")
  try:
    config = _CONFIG.value
    if config is not None:
      config.keys()  # a config file that failed to load raises here
  except Exception as e:  # pylint: disable=broad-except
    cli.fail(cli.config_load_error(sys.argv, e))
  try:
    interop.import_mdlm(_CHECKPOINT.value, _WORKDIR.value, num_heads=_HEADS.value,
                        use_ema=_EMA.value, config=config)
  except (interop.InteropError, interop.StateDictError, config_lib.ConfigError,
          ckpt_lib.CheckpointError, FileNotFoundError) as e:
    cli.fail(str(e))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
