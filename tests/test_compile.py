"""`python -m dlm_jax.compile`: the paper configs' steps compiled for a TPU the machine does not have.

The small local twins of configs/mdlm_owt.py and configs/did_owt.py (`:runlocal`: 2 blocks of
width 128, length 256, the GPT-2 vocabulary) are compiled for TPU v4-8 (`v4:2x2x1`, megacore: 4
chips) through the same code the trainer uses (`run/step.py`), with libtpu on this CPU host. The
full-size figures are in benchmarks/results/compile_table.md (`benchmarks/compile_table.py`).
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from configs import did_owt, mdlm_owt
from dlm_jax import hardware
from dlm_jax.run import aot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                reason="needs libtpu (in the [dev] and [tpu] extras)")

_REPORTS = {}


def _report(name, attention, sample=False):
  key = (name, attention, sample)
  if key not in _REPORTS:
    cfg = (mdlm_owt if name == "mdlm" else did_owt).get_config("runlocal")
    cfg.model.attention = attention
    _REPORTS[key] = aot.compile_report(cfg, "v4:2x2x1", mfu=0.4, sample=sample)
  return _REPORTS[key]


@pytest.mark.parametrize("name,attention", [("mdlm", "pallas"), ("mdlm", "xla"),
                                            ("did", "pallas"), ("did", "xla")])
def test_paper_configs_compile_for_tpu_v4(name, attention):
  r = _report(name, attention, sample=(name, attention) == ("mdlm", "pallas"))
  assert r["device_kind"] == "TPU v4" and r["devices"] == 4 and r["platform"] == "tpu"
  t = r["train"]
  assert t["fits"] is True, t
  if attention == "pallas":  # our Mosaic kernels (forward, dq, dk/dv) in every block
    assert t["kernel_calls"] >= 3 * 2, "no Mosaic custom call in the compiled train step"
  else:
    assert t["kernel_calls"] == 0


def test_auto_is_splash_on_tpu():
  """'auto' reads the platform from the mesh (TPU), not from the host (CPU): splash kernels."""
  r = _report("did", "auto")
  assert r["train"]["fits"] is True and r["train"]["kernel_calls"] >= 3 * 2


def test_memory_report_is_well_formed():
  r = _report("mdlm", "pallas", sample=True)
  for step in ("train", "sample"):
    t = r[step]
    for k in ("arguments", "outputs", "temporaries", "code", "total", "usable"):
      assert isinstance(t[k], float) and t[k] >= 0, (step, k, t[k])
    assert t["arguments"] <= t["total"] <= t["usable"] == hardware.chip_for("TPU v4").hbm_bytes
    assert t["margin"] == pytest.approx(t["usable"] - t["total"])
  t = r["train"]
  # The train step's arguments are the state (donated: aliased with the outputs) and the batch,
  # per device: the abstract state's shard sizes plus 3 int32 [rows per device, L] arrays.
  batch = 3 * 4 * r["per_device_batch"] * r["seq_len"]
  assert t["arguments"] == pytest.approx(r["state_bytes_per_device"] + batch, rel=0.01)
  assert t["aliased"] == pytest.approx(r["state_bytes_per_device"], rel=0.01)
  # FLOPs: analytic per step / devices / tokens, and the compiler's count within 2x of it.
  assert r["flops_per_device"] == pytest.approx(r["flops_per_step"] / 4)
  assert r["flops_per_token"] == pytest.approx(r["flops_per_step"] / (16 * 256))
  assert 0.3 < t["compiler_flops"] / r["flops_per_device"] < 2.0
  assert r["step_seconds_at_mfu"] == pytest.approx(r["flops_per_device"] / (0.4 * 275e12))
  text = aot.format_report(r)
  assert "FITS" in text and "temporaries" in text and "tokens/s" in text
  json.dumps(r, default=str)


def _command(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "dlm_jax.compile", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=900)


def test_too_big_config_says_by_how_much_and_what_to_change():
  r = _command("--config=configs/mdlm_owt.py:runlocal", "--topology=v5e-1", "--sample=false",
               "--config.model.attention=xla", "--config.train.global_batch_size=8192",
               "--config.data.seq_len=1024", "--config.model.max_len=1024")
  assert r.returncode == 1, r.stdout + r.stderr
  assert "DOES NOT FIT" in r.stdout and "short by" in r.stdout
  for field in ("config.train.global_batch_size=8192", "config.mesh", "config.model.remat",
                "config.model.attention", "parameter dtype"):
    assert field in r.stdout, field


def test_bad_topology_and_mesh_are_named():
  r = _command("--config=configs/mdlm_owt.py:runlocal", "--topology=v5e-17")
  assert r.returncode == 2 and "ERROR: --topology='v5e-17' is not a known compile target" in r.stderr
  assert "v5e-16" in r.stderr and "v4:2x2x4" in r.stderr
  r = _command("--config=configs/mdlm_owt.py:runlocal", "--topology=v4-8", "--config.mesh.data=3")
  assert r.returncode == 2, r.stderr
  assert "has 4 devices" in r.stderr and "config.mesh.data, config.mesh.fsdp and " \
      "config.mesh.tensor" in r.stderr


@pytest.mark.skipif(hardware.gpu_compile_available() is not None,
                    reason=f"GPU compile target: {hardware.gpu_compile_available()}")
def test_triton_kernels_compile_for_an_h100():
  """Our Pallas Triton kernels inside the whole train step, compiled for 2 H100s (no GPU here)."""
  cfg = mdlm_owt.get_config("runlocal")
  cfg.model.attention = "auto"  # GPU: our Triton flash kernels
  r = aot.compile_report(cfg, "h100:2", sample=False)
  assert r["platform"] == "gpu" and r["train"]["fits"] is True
  assert r["train"]["kernel_calls"] >= 3 * 2, "no Triton custom call in the compiled train step"
