r"""Training entry point: config -> mesh -> data -> state -> loop. One loop for every method.

  python -m dlm_jax.train --config=configs/mdlm_tiny.py --workdir=/tmp/run \
      --config.optim.lr=1e-4

Resumes automatically from the newest good checkpoint in --workdir; saves on SIGTERM. Takes the
workdir's lease first: a second trainer on the same workdir stops at once (see --takeover).
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from dlm_jax import config as config_lib
from dlm_jax import parallel
from dlm_jax import paths
from dlm_jax.run import checkpoint as ckpt_lib
from dlm_jax.run import cli
from dlm_jax.run import lease as lease_lib
from dlm_jax.run import trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and samples go.")
_COORD = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
_NPROC = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
_PID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
_STOP_AFTER = flags.DEFINE_integer("stop_after_steps", None,
                                   "Stop (with a checkpoint) after this many steps of this run; "
                                   "for tests and time-sliced jobs.")
_TAKEOVER = flags.DEFINE_bool("takeover", False,
                              "Take the workdir's lease even if another trainer holds it and "
                              "renews it (that trainer then stops without saving again).")


def main(argv):
  cli.quiet_library_logs()
  if len(argv) > 1:
    cli.fail(f"Unexpected arguments: {argv[1:]} (flags need '--name=value').")
  try:
    config = _CONFIG.value
    if config is not None:
      config.keys()  # a config file that failed to load raises here
  except Exception as e:  # pylint: disable=broad-except
    cli.fail(cli.config_load_error(sys.argv, e))
  if _CONFIG.value is None or _WORKDIR.value is None:
    cli.fail("--config and --workdir are required, e.g. --config=configs/mdlm_tiny.py "
             "--workdir=/tmp/run.")
  if _STOP_AFTER.value is not None and _STOP_AFTER.value < 1:
    cli.fail("--stop_after_steps must be >= 1.")
  try:
    parallel.maybe_initialize_distributed(_COORD.value, _NPROC.value, _PID.value)
  except ValueError as e:
    cli.fail(str(e))
  try:
    trainer.train(_CONFIG.value, _WORKDIR.value, _STOP_AFTER.value, takeover=_TAKEOVER.value)
  except (config_lib.ConfigError, parallel.MeshError, ckpt_lib.CheckpointError,
          trainer.NonFiniteLossError, trainer.DataError, FileNotFoundError,
          lease_lib.LeaseError, paths.StorageError) as e:
    # Errors a user can cause and fix: one clear message (the first line says what to change),
    # exit status 2, nothing already saved is lost.
    cli.fail(str(e))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
