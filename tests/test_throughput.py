"""TFLOP/s per device and MFU next to tokens/s: the trainer's progress line and metrics."""

import json
import os

import pytest

from dlm_jax import hardware
from dlm_jax import metrics as metrics_lib
from dlm_jax.models import flops as flops_lib
from dlm_jax.run import experiment as exp_lib
from dlm_jax.run import trainer
from tests.tiny import tiny_config


def test_throughput_and_mfu_arithmetic():
  out = hardware.throughput(step_flops=8e12, steps_per_sec=2.0, num_devices=4, peak_flops=1e13)
  assert out == pytest.approx({"tflops_per_device": 4.0, "mfu": 0.4})
  assert hardware.throughput(8e12, 2.0, 4, None) == pytest.approx({"tflops_per_device": 4.0})
  assert hardware.chip_for("TPU v5 lite").peak_flops == 197e12
  assert hardware.chip_for("TPU v4").hbm_bytes == 30.75 * 2**30
  assert hardware.chip_for("NVIDIA H100 80GB HBM3").peak_flops == 989e12
  assert hardware.chip_for("cpu").peak_flops is None  # no MFU on CPU


def test_step_flops_is_three_forwards_of_the_network_rows():
  cfg = tiny_config()
  exp = exp_lib.Experiment.create(cfg)
  m = exp.method.model_cfg
  per_seq = flops_lib.forward_flops(m.num_layers, m.d_model, 32, m.vocab_size, m.mlp_ratio, "full")
  assert exp.step_flops() == pytest.approx(3 * 8 * per_seq)


def test_trainer_logs_tflops_per_device(tmp_path):
  cfg = tiny_config(train__num_steps=4)
  workdir = str(tmp_path / "run")
  trainer.train(cfg, workdir)
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  train_rows = [r for r in rows if "train/tflops_per_device" in r]
  assert train_rows, rows[0].keys()
  exp = exp_lib.Experiment.create(cfg)
  for r in train_rows:
    want = exp.step_flops() * r["train/steps_per_sec"] / 8 / 1e12
    assert r["train/tflops_per_device"] == pytest.approx(want, rel=1e-6)
    assert "train/mfu" not in r  # CPU: no known peak


def test_progress_line_shows_tflops_and_mfu():
  p = metrics_lib.Progress(100, 0, 1024, enabled=False)
  rates = dict(steps_per_sec=2.0, tokens_per_sec=2048.0, eta_sec=49.0,
               **hardware.throughput(8e12, 2.0, 4, 1e13))
  line = p.line(2, {"loss": 1.0, "lr": 1e-3}, rates)
  assert "tok/s 2,048 | TFLOP/s/dev 4 | MFU 40.0% | ETA" in line
  del rates["mfu"]
  assert "MFU" not in p.line(2, {"loss": 1.0}, rates)
