"""Method registry: `config.method` -> a Method class. The only place that looks at the name."""

from __future__ import annotations

import importlib

_REGISTRY = {
    "mdlm": ("dlm_jax.methods.mdlm", "MDLM"),
    "did": ("dlm_jax.methods.did", "DID"),
    "ar": ("dlm_jax.methods.ar", "AutoRegressive"),
}


def get_method_class(name: str):
  if name not in _REGISTRY:
    raise ValueError(f"config.method={name!r}; choose one of {sorted(_REGISTRY)}.")
  module, cls = _REGISTRY[name]
  return getattr(importlib.import_module(module), cls)


def make_method(config, tokenizer):
  """Builds the method object for `config.method` with the tokenizer's special ids."""
  from dlm_jax.methods.base import SpecialIds  # pylint: disable=g-import-not-at-top
  return get_method_class(config.method)(config, SpecialIds.from_tokenizer(tokenizer))
