r"""Training entry point: config -> mesh -> data -> state -> loop. One loop for every method.

  python -m dlm_jax.train --config=configs/mdlm_tiny.py --workdir=/tmp/run \
      --config.optim.lr=1e-4

Resumes automatically from the newest good checkpoint in --workdir; saves on SIGTERM.
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from dlm_jax import checkpoint as ckpt_lib
from dlm_jax import config_lib
from dlm_jax import parallel
from dlm_jax import trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and samples go.")
_COORD = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
_NPROC = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
_PID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
_STOP_AFTER = flags.DEFINE_integer("stop_after_steps", None,
                                   "Stop (with a checkpoint) after this many steps of this run; "
                                   "for tests and time-sliced jobs.")


def _fail(message: str) -> None:
  """A user error: one line (or a few) starting with 'ERROR:', exit status 2, no traceback."""
  print(f"ERROR: {message}", file=sys.stderr, flush=True)
  sys.exit(2)


def _unknown_overrides(argv: list[str]) -> list[str]:
  """The --config.a.b[=v] flags of argv that name no field of configs/base.py."""
  from configs import base  # pylint: disable=g-import-not-at-top

  def leaves(node, prefix=""):
    for k, v in node.items():
      if hasattr(v, "items"):
        yield from leaves(v, f"{prefix}{k}.")
      else:
        yield f"{prefix}{k}"

  known = set(leaves(base.get_config()))
  prefixes = {k.rsplit(".", i)[0] for k in known for i in range(k.count(".") + 1)}
  out = []
  for arg in argv:
    if arg.startswith("--config."):
      name = arg[len("--config."):].split("=", 1)[0]
      if name not in known and name not in prefixes:
        out.append(name)
  return out


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing whose failures (bad flag, value or config file) read as one clear line."""
  config_args = [a for a in argv if a.startswith("--config=")]
  path = config_args[-1].split("=", 1)[1] if config_args else ""
  if path and not os.path.exists(path.split(":", 1)[0]):  # before ml_collections prints a traceback
    _fail(f"--config file {path!r} does not exist (paths are relative to {os.getcwd()}).")
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(f"{e} (pass --helpshort for the flags).")
  except Exception as e:  # pylint: disable=broad-except  # raised while applying --config.*
    _fail(_config_load_error(argv, e))
  return []  # unreachable


def _config_load_error(argv: list[str], error: Exception) -> str:
  """Names what is wrong when the --config file or a --config.* override cannot be applied."""
  unknown = _unknown_overrides(argv)
  if unknown:
    return (f"Unknown config field(s): {', '.join('config.' + u for u in unknown)}. Every field "
            "must exist in configs/base.py (check the spelling).")
  config_args = [a for a in argv if a.startswith("--config=")]
  path = config_args[-1].split("=", 1)[1] if config_args else ""
  if path and not os.path.exists(path.split(":", 1)[0]):
    return f"--config file {path!r} does not exist (paths are relative to {os.getcwd()})."
  first = str(error).strip().splitlines()[0] if str(error).strip() else ""
  return f"Could not load --config={path} with its overrides ({type(error).__name__}: {first})."


def main(argv):
  if len(argv) > 1:
    _fail(f"Unexpected arguments: {argv[1:]} (flags need '--name=value').")
  try:
    config = _CONFIG.value
    if config is not None:
      config.keys()  # a config file that failed to load raises here
  except Exception as e:  # pylint: disable=broad-except
    _fail(_config_load_error(sys.argv, e))
  if _CONFIG.value is None or _WORKDIR.value is None:
    _fail("--config and --workdir are required, e.g. --config=configs/mdlm_tiny.py "
          "--workdir=/tmp/run.")
  if _STOP_AFTER.value is not None and _STOP_AFTER.value < 1:
    _fail("--stop_after_steps must be >= 1.")
  try:
    parallel.maybe_initialize_distributed(_COORD.value, _NPROC.value, _PID.value)
  except ValueError as e:
    _fail(str(e))
  try:
    trainer.train(_CONFIG.value, _WORKDIR.value, _STOP_AFTER.value)
  except (config_lib.ConfigError, parallel.MeshError, ckpt_lib.CheckpointError,
          trainer.NonFiniteLossError, trainer.DataError, FileNotFoundError) as e:
    # Errors a user can cause and fix: one clear message (the first line says what to change),
    # exit status 2, nothing already saved is lost.
    _fail(str(e))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
