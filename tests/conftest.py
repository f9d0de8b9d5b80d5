"""Test set-up: 8 fake CPU devices (set before jax is imported) and a shared compilation cache.

Many tests (and the subprocesses of the entry-point tests) compile the same tiny train step;
a persistent cache for this pytest session turns the repeats into cache hits.
"""
import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"dlm_jax_test_cache_{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: slower tests (still run in CI)")


@pytest.fixture(scope="session")
def gcs_emulator():
  """A local GCS JSON API (tests/gcs_emulator.py) for this pytest process, started on first use.

  One per process: tensorstore (Orbax's array data) reads TENSORSTORE_GCS_HTTP_URL once per
  process, so every gs:// test of the process shares this server (each under its own prefix).
  The variables that point the clients at it are set here, before any GCS client is made.
  """
  from tests.gcs_emulator import Emulator  # pylint: disable=g-import-not-at-top
  emu = Emulator()
  os.environ.update(emu.env)
  yield emu
  emu.stop()
