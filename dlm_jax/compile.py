r"""Compile a config's train and sampling steps for a TPU slice or GPU node you do not have.

  python -m dlm_jax.compile --config=configs/did_owt.py --topology=v5e:4x4 [--mfu=0.4] \
      [--config.mesh.fsdp=4 ...] [--sample=false] [--eval] [--json=report.json]

Builds the exact sharded steps the trainer runs (same code: `run/step.py`) on the target's abstract
devices, compiles them with the target's compiler on this host (libtpu for TPU targets, the CUDA
plugin for `h100:N`), and prints per device: HBM for arguments, outputs, temporaries and code,
whether it fits the chip (or by how much it misses and which fields to change), FLOPs per step and
per token, and the step time and tokens/s at the given MFU. Exit status 0 when the train step fits
(or the chip's memory is unknown), 1 when it does not, 2 on bad input.

Targets: Cloud slice names (v4-8, v4-32, v5e-16, v5litepod-16, v5e-256, v5p-8, v6e-8, ...) or
libtpu topology names (v4:2x2x4, v5e:4x4, v5e:16x16, v5p:2x2x1, v6e:2x2, ...); v4 is compiled in
megacore mode (one device per chip, as real v4 slices run). GPU: h100:8 or h100:2x8.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile for the target; never initialise it here

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from dlm_jax import config as config_lib  # noqa: E402
from dlm_jax import hardware  # noqa: E402
from dlm_jax import parallel  # noqa: E402
from dlm_jax.run import aot  # noqa: E402
from dlm_jax.run import cli  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).",
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "Compile target: " + hardware.accepted_names())
_MFU = flags.DEFINE_float("mfu", 0.4, "Model FLOPs utilisation assumed for the step time.")
_SAMPLE = flags.DEFINE_bool("sample", True, "Also compile the sampling step (config.sample).")
_EVAL = flags.DEFINE_bool("eval", False, "Also compile the evaluation step (the likelihood bound "
                          "of one global batch, as the trainer runs it every train.eval_every).")
_JSON = flags.DEFINE_string("json", None, "Also write the report as JSON to this file.")


def main(argv):
  if len(argv) > 1:
    cli.fail(f"Unexpected arguments: {argv[1:]} (flags need '--name=value').")
  try:
    config = _CONFIG.value
    if config is not None:
      config.keys()
  except Exception as e:  # pylint: disable=broad-except
    cli.fail(cli.config_load_error(sys.argv, e))
  if _CONFIG.value is None or not _TOPOLOGY.value:
    cli.fail("--config and --topology are required, e.g. --config=configs/did_owt.py "
             "--topology=v5e:4x4.")
  if _MFU.value is not None and not 0 < _MFU.value <= 1:
    cli.fail(f"--mfu={_MFU.value} must be in (0, 1].")
  config = _CONFIG.value
  print(f"Compiling {config.method} for {_TOPOLOGY.value} (a full-size step takes minutes on a "
        "few CPU cores)...", flush=True)
  try:
    report = aot.compile_report(config, _TOPOLOGY.value, mfu=_MFU.value, sample=_SAMPLE.value,
                                evaluate=_EVAL.value)
  except (config_lib.ConfigError, parallel.MeshError, hardware.TopologyError) as e:
    cli.fail(str(e))
  print(aot.format_report(report), flush=True)
  if _JSON.value:
    import json  # pylint: disable=g-import-not-at-top
    with open(_JSON.value, "w", encoding="utf-8") as f:
      json.dump(report, f, indent=1, default=str)
  if report["train"]["fits"] is False:
    sys.exit(1)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
