"""What the commands share: one-line user errors, config-flag error messages, sample overrides.

Commands (`python -m dlm_jax.train`, `sample`, `evaluate`, ...) print a user error as one line
starting with 'ERROR:' on stderr and exit with status 2; nothing already saved is lost.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

from absl import flags

from dlm_jax import config as config_lib
from dlm_jax.config import ConfigError


def fail(message: str) -> None:
  """A user error: one line (or a few) starting with 'ERROR:', exit status 2, no traceback."""
  print(f"ERROR: {message}", file=sys.stderr, flush=True)
  sys.exit(2)


def unknown_overrides(argv: Sequence[str]) -> list[str]:
  """The --config.a.b[=v] flags of argv that name no field of the schema."""
  known = config_lib.field_names()
  prefixes = {k.rsplit(".", i)[0] for k in known for i in range(k.count(".") + 1)}
  out = []
  for arg in argv:
    if arg.startswith("--config."):
      name = arg[len("--config."):].split("=", 1)[0]
      if name not in known and name not in prefixes:
        out.append(name)
  return out


def config_load_error(argv: Sequence[str], error: Exception) -> str:
  """Names what is wrong when the --config file or a --config.* override cannot be applied."""
  unknown = unknown_overrides(argv)
  if unknown:
    return (f"Unknown config field(s): {', '.join('config.' + u for u in unknown)}. Every field "
            "must exist in the schema, dlm_jax/config/schema.py (check the spelling).")
  config_args = [a for a in argv if a.startswith("--config=")]
  path = config_args[-1].split("=", 1)[1] if config_args else ""
  if path and not os.path.exists(path.split(":", 1)[0]):
    return f"--config file {path!r} does not exist (paths are relative to {os.getcwd()})."
  first = str(error).strip().splitlines()[0] if str(error).strip() else ""
  return f"Could not load --config={path} with its overrides ({type(error).__name__}: {first})."


def parse_sample_overrides(items: Sequence[str]) -> dict:
  """Parses ["key=value", ...] into typed config.sample overrides (errors name the key)."""
  ref = config_lib.get_schema().sample
  out = {}
  for item in items:
    if "=" not in item:
      raise ConfigError(f"--set {item!r}: expected key=value.")
    k, v = item.split("=", 1)
    k = k.removeprefix("config.sample.").removeprefix("sample.")
    if k not in ref:
      raise ConfigError(f"--set {k}: unknown sample option; known: {sorted(ref)}.")
    typ = type(ref[k])
    try:
      out[k] = (v.lower() in ("1", "true", "yes")) if typ is bool else typ(v)
    except ValueError as e:
      raise ConfigError(f"--set {k}={v!r}: expected {typ.__name__}.") from e
  return out


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing whose failures (bad flag, value or config file) read as one clear line."""
  config_args = [a for a in argv if a.startswith("--config=")]
  path = config_args[-1].split("=", 1)[1] if config_args else ""
  if path and not os.path.exists(path.split(":", 1)[0]):  # before ml_collections prints a traceback
    fail(f"--config file {path!r} does not exist (paths are relative to {os.getcwd()}).")
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(f"{e} (pass --helpshort for the flags).")
  except Exception as e:  # pylint: disable=broad-except  # raised while applying --config.*
    fail(config_load_error(argv, e))
  return []  # unreachable
