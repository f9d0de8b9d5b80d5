"""Model schedules and FLOPs accounting (spec/decoding.md schedule/FLOPs oracles)."""

import numpy as np
import pytest

from dlm_jax.models.flops import forward_flops
from dlm_jax.scheduling.flops import schedule_flops
from dlm_jax.scheduling.schedule import (ModelSchedule, enumerate_placements, family_placement,
                                         parse_schedule)

OWT_H = dict(n_layers=12, d=768, seq_len=1024, vocab=50258)
OWT_L = dict(OWT_H, n_layers=4)
TOY_H = dict(n_layers=4, d=64, seq_len=32, vocab=17)
TOY_L = dict(TOY_H, n_layers=1)


def test_sandwich_expands():
  sched = ModelSchedule((("L", 125), ("H", 750), ("L", 125)))
  assert parse_schedule("L125,H750,L125") == sched
  assert str(sched) == "L125,H750,L125"
  is_light = sched.expand()
  assert is_light.shape == (1000,) and is_light.dtype == bool
  assert set(np.flatnonzero(is_light)) == set(range(125)) | set(range(875, 1000))
  assert sched.num_light == 250 and sched.num_steps == 1000
  assert ModelSchedule.from_mask(is_light) == sched
  assert ModelSchedule.from_light_steps(np.flatnonzero(is_light), 1000) == sched


def test_flops_paper_numbers():
  assert forward_flops(**OWT_H, convention="full") == pytest.approx(2.9165e11, rel=1e-4)
  assert forward_flops(**OWT_L, convention="full") == pytest.approx(1.4992e11, rel=1e-4)
  ratio = forward_flops(**OWT_L, convention="full") / forward_flops(**OWT_H, convention="full")
  assert ratio == pytest.approx(0.51403, abs=1e-5)
  sched = parse_schedule("L125,H750,L125")
  _, saving = schedule_flops(sched, OWT_H, OWT_L, "blocks")
  assert saving == pytest.approx(1 / 6, abs=1e-12)
  assert round(saving, 5) == 0.16667
  cost, saving = schedule_flops(sched.expand(), OWT_H, OWT_L, "full")
  assert round(saving, 5) == 0.12149
  f_h = forward_flops(**OWT_H, convention="full")
  f_l = forward_flops(**OWT_L, convention="full")
  assert cost == pytest.approx(750 * f_h + 250 * f_l)


def test_flops_toy_pair():
  for conv, ratio, save in (("blocks", 0.2500, 0.1875), ("full", 0.2538, 0.1865)):
    r = forward_flops(**TOY_L, convention=conv) / forward_flops(**TOY_H, convention=conv)
    assert r == pytest.approx(ratio, abs=5e-5)
    sched = ModelSchedule.from_placement((0, 7), num_segments=8, segment_len=4)
    assert sched.num_steps == 32 and sched.num_light == 8
    _, saving = schedule_flops(sched, TOY_H, TOY_L, conv)
    assert saving == pytest.approx(save, abs=5e-5)


def test_flops_with_nfe():
  sched = parse_schedule("L8,H24")
  f_h = forward_flops(**TOY_H)
  f_l = forward_flops(**TOY_L)
  cost, saving = schedule_flops(sched, TOY_H, TOY_L, "blocks", nfe_heavy=np.array([10, 20]),
                                nfe_light=np.array([2, 0]))
  np.testing.assert_allclose(cost, [10 * f_h + 2 * f_l, 20 * f_h])
  np.testing.assert_allclose(saving, [1 - (10 + 0.5) / 12, 0.0])
  _, saving = schedule_flops(sched, TOY_H, TOY_L, "blocks", nfe_heavy=10, nfe_light=2,
                             nfe_baseline=20)
  assert saving == pytest.approx(1 - 10.5 / 20)
  with pytest.raises(ValueError, match="nfe_heavy"):
    schedule_flops(sched, TOY_H, TOY_L, nfe_heavy=3)
  with pytest.raises(ValueError, match="vocab"):
    schedule_flops(sched, dict(n_layers=1, d=8, seq_len=4), TOY_L)
  with pytest.raises(ValueError, match="convention"):
    forward_flops(1, 8, 4, 5, convention="embeddings")


def test_placements_and_families():
  pl = enumerate_placements(8, 2)
  assert len(pl) == 28 and pl[0] == (0, 1) and pl[-1] == (6, 7) and len(set(pl)) == 28
  assert len(enumerate_placements(8, 0)) == 1
  assert family_placement("prefix", 8, 2) == (0, 1)
  assert family_placement("suffix", 8, 2) == (6, 7)
  assert family_placement("sandwich", 8, 2) == (0, 7)
  assert family_placement("sandwich", 8, 3) == (0, 1, 7)
  assert family_placement("middle", 8, 2) == (3, 4)
  assert family_placement("middle", 8, 1) == (3,)
  with pytest.raises(ValueError, match="num_light"):
    enumerate_placements(8, 9)
  with pytest.raises(ValueError, match="family"):
    family_placement("edges", 8, 2)


def test_bad_schedules_raise():
  with pytest.raises(ValueError, match="num_steps"):
    ModelSchedule((("L", 125), ("H", 750), ("L", 125)), num_steps=999)
  with pytest.raises(ValueError, match="num_steps"):
    parse_schedule("L125,H750,L125", num_steps=1001)
  with pytest.raises(ValueError, match=r"segments\[1\]"):
    ModelSchedule((("L", 4), ("X", 4)))
  with pytest.raises(ValueError, match=r"segments\[0\]"):
    ModelSchedule((("L", 0),))
  with pytest.raises(ValueError, match="segments"):
    ModelSchedule(())
  with pytest.raises(ValueError, match="light_steps"):
    ModelSchedule.from_light_steps([0, 10], num_steps=10)
  with pytest.raises(ValueError, match="light_segments"):
    ModelSchedule.from_placement((8,), 8, 4)
  for bad in ("L125,,H5", "M10", "L", "H-3", "Lx"):
    with pytest.raises(ValueError, match="segment"):
      parse_schedule(bad)
