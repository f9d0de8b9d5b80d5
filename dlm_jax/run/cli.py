"""What the commands share: one-line user errors, config-flag parsing and errors, quiet logs.

Commands (`python -m dlm_jax.train`, `sample`, `evaluate`, ...) print a user error as one line
starting with 'ERROR:' on stderr and exit with status 2; nothing already saved is lost. Every
command takes config overrides as `--config.<section>.<field>=value` (train: any field; sample
and evaluate: `config.sample.*`, applied over the config saved with the checkpoint), parsed by
ml_collections with the schema's types (booleans strictly: true/false, 1/0).
"""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Any, Sequence

from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

from dlm_jax import config as config_lib
from dlm_jax.config import ConfigError

_OVERRIDE = re.compile(r"^-{1,2}(?:no)?config\.([^=]+)")


def fail(message: str) -> None:
  """A user error: one line (or a few) starting with 'ERROR:', exit status 2, no traceback."""
  print(f"ERROR: {message}", file=sys.stderr, flush=True)
  sys.exit(2)


def override_names(argv: Sequence[str]) -> list[str]:
  """The dotted field names of the --config.<name>[=v] (and --noconfig.<name>) flags of argv."""
  return [m.group(1) for m in map(_OVERRIDE.match, argv) if m]


def unknown_overrides(argv: Sequence[str]) -> list[str]:
  """The --config.<section>.<field>[=v] flags of argv that name no field of the schema."""
  known = config_lib.field_names()
  prefixes = {k.rsplit(".", i)[0] for k in known for i in range(k.count(".") + 1)}
  return [name for name in override_names(argv) if name not in known and name not in prefixes]


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


_TRUE, _FALSE = ("true", "t", "1", "yes"), ("false", "f", "0", "no")


def parse_sample_overrides(items: Sequence[str]) -> dict:
  """Parses ["key=value", ...] into typed config.sample overrides (errors name the key).

  The deprecated `--set key=value` form; booleans are strict as on the command line.
  """
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
    if typ is bool:
      if v.lower() not in _TRUE + _FALSE:
        raise ConfigError(f"--set {k}={v!r}: expected a boolean (true or false).")
      out[k] = v.lower() in _TRUE
      continue
    try:
      out[k] = typ(v)
    except ValueError as e:
      raise ConfigError(f"--set {k}={v!r}: expected {typ.__name__}.") from e
  if items:
    logging.warning("--set is deprecated and will be removed in the next release; write "
                    "%s instead.", " ".join(f"--config.sample.{i}" for i in items))
  return out


def sample_flags_parser(command: str):
  """The flags parser of a command that reads a saved run (sample, evaluate).

  It defines `--config` as the schema (so `--config.sample.tau=0.9` is typed as in train), after
  refusing what cannot apply to a saved run: an unknown field, a field outside config.sample,
  or a --config=<file>.
  """
  def parser(argv: list[str]) -> list[str]:
    if any(re.match(r"^-{1,2}config(=|$)", a) for a in argv):
      fail(f"{command} reads the config saved with the checkpoint in --workdir; pass overrides "
           "as --config.sample.<field>=value (no --config=<file>).")
    unknown = unknown_overrides(argv)
    if unknown:
      fail(f"Unknown config field(s): {', '.join('config.' + u for u in unknown)}. {command} "
           "takes config.sample.* overrides; every field is in dlm_jax/config/schema.py (check "
           "the spelling).")
    foreign = [n for n in override_names(argv) if not n.startswith("sample.")]
    if foreign:
      fail(f"{command} takes config.sample.* overrides only; {', '.join('config.' + n for n in foreign)}"
           " is the run's own setting, saved with its checkpoint.")
    if "config" not in flags.FLAGS:
      config_flags.DEFINE_config_dict(
          "config", config_lib.get_schema(), "Overrides of config.sample fields, e.g. "
          "--config.sample.decoder=threshold --config.sample.tau=0.9.", lock_config=True,
          sys_argv=argv)
    return parse_flags(argv)

  return parser


def sample_overrides(set_items: Sequence[str] = ()) -> dict[str, Any]:
  """The config.sample overrides given: deprecated --set items, then --config.sample.* flags."""
  out = parse_sample_overrides(set_items)
  if "config" in flags.FLAGS:
    for name, value in config_flags.get_override_values(flags.FLAGS["config"]).items():
      out[name.removeprefix("sample.")] = value
  return out


class _LibraryInfoFilter(logging.Filter):
  """Drops records below WARNING that do not come from dlm_jax (Orbax, JAX, absl internals)."""

  _ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.WARNING:
      return not record.getMessage().startswith("Given directory is read only")
    return os.path.abspath(record.pathname).startswith(self._ROOT + os.sep)


def quiet_library_logs() -> None:
  """Unless --verbosity is given, other libraries' info lines are not shown (dlm_jax's are).

  `--verbosity=0` (absl's flag) shows every library's log as before, Orbax's included.
  """
  if "verbosity" in flags.FLAGS and flags.FLAGS["verbosity"].present:
    return
  filt = _LibraryInfoFilter()
  handlers = list(logging.getLogger().handlers)
  absl_handler = absl_logging.get_absl_handler()
  if absl_handler not in handlers:
    handlers.append(absl_handler)
  for h in handlers:
    if not any(isinstance(f, _LibraryInfoFilter) for f in h.filters):
      h.addFilter(filt)


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
