"""The method registry: `config.method` -> a Method class. The only place that reads the name.

A new method is one module (or package) with a `Method` subclass plus one line in `_METHODS`.
"""

from __future__ import annotations

from typing import Any

from dlm_jax.config import ConfigError
from dlm_jax.methods.ar import AutoRegressive
from dlm_jax.methods.base import Method, SpecialIds
from dlm_jax.methods.did import DID
from dlm_jax.methods.mdlm import MDLM

_METHODS: tuple[type[Method], ...] = (
    MDLM,
    DID,
    AutoRegressive,
)
REGISTRY: dict[str, type[Method]] = {m.name: m for m in _METHODS}


def names() -> tuple[str, ...]:
  return tuple(REGISTRY)


def get_method_class(name: str) -> type[Method]:
  if name not in REGISTRY:
    raise ConfigError(f"config.method={name!r} is not one of {names()}.")
  return REGISTRY[name]


def make_method(config: Any, tokenizer: Any) -> Method:
  """Builds the method object for `config.method` with the tokenizer's special ids."""
  return get_method_class(config.method)(config, SpecialIds.from_tokenizer(tokenizer))
