"""The schema every recipe starts from; it lives in the package (`dlm_jax.config.schema`)."""

from dlm_jax.config.schema import get_config  # noqa: F401
