"""Tests of dlm_jax.data.tasks: ARITH-CHAIN (spec/trims.md), HMM-16 (spec/decoding.md, spec/did.md), JSONL."""

import itertools
import json
import math

import numpy as np
import pytest

from dlm_jax.data.tasks import arith as arith_task, hmm as hmm_task, sft as sft_task

WORKED_PROMPT = [16, 3, 7, 10, 5, 11, 3, 10, 9, 15]
WORKED_RESPONSE = [3, 7, 10, 5, 12, 4, 2, 3, 11, 4, 2, 12, 2, 6, 2, 6, 10, 9, 12, 3, 5, 14, 3, 5, 17]


# ------------------------------------------------------------------------------------------------ ARITH-CHAIN


def test_arith_shapes_and_constants():
  task = arith_task.ArithChain()
  assert (task.prompt_len, task.response_len, task.vocab_size) == (10, 25, 20)
  assert (arith_task.PLUS, arith_task.TIMES, arith_task.EQUALS, arith_task.ARROW, arith_task.QUERY) == (10, 11, 12, 14, 15)
  assert (arith_task.BOS, arith_task.EOS, arith_task.PAD, arith_task.MASK) == (16, 17, 18, 19)
  g = task.generate(0, 64)
  assert g["prompt"].shape == (64, 10) and g["response"].shape == (64, 25) and g["answer"].shape == (64,)
  assert g["prompt"].dtype == np.int32 and g["response"].dtype == np.int32
  assert g["prompt"].max() < 19 and g["response"].max() < 19  # MASK never appears in data


def test_arith_worked_example():
  task = arith_task.ArithChain()
  # The worked example is a valid trace, its answer is 35, and the other orders of the same prompt are valid too.
  assert task.is_valid_trace(WORKED_PROMPT, WORKED_RESPONSE)
  assert arith_task.parse_answer(WORKED_RESPONSE) == 35
  text = task.render_text({"prompt": np.array(WORKED_PROMPT), "response": np.array(WORKED_RESPONSE)})
  assert text == "^37+5*3+9? -> 37+5=42 3*42=26 26+9=35 >35$"
  # The renderer used by the generator gives exactly these ids for a0 = 37, (+5, *3, +9), s = (0, 1, 0).
  ex = task.render(37, [("+", 5), ("*", 3), ("+", 9)], (0, 1, 0))
  np.testing.assert_array_equal(ex["prompt"][0], WORKED_PROMPT)
  np.testing.assert_array_equal(ex["response"][0], WORKED_RESPONSE)
  assert ex["answer"][0] == 35 and ex["num_steps"][0] == 3
  one = task.render(99, [("*", 3)])
  assert task.render_text({k: v[0] for k, v in one.items()}) == "^99*3? -> 99*3=97 >97$"
  assert one["response"][0, 10:].tolist() == [arith_task.EOS] * 15 and one["prompt"][0, 6:].tolist() == [arith_task.PAD] * 4


def test_arith_all_renderings_valid_and_counted():
  task = arith_task.ArithChain()
  blocks = [([3, 7, 10, 5, 12, 4, 2], [5, 10, 3, 7, 12, 4, 2]),
            ([4, 2, 11, 3, 12, 2, 6], [3, 11, 4, 2, 12, 2, 6]),
            ([2, 6, 10, 9, 12, 3, 5], [9, 10, 2, 6, 12, 3, 5])]
  tail = [14, 3, 5, 17]
  valid = 0
  for choice in itertools.product((0, 1), repeat=3):
    resp = sum((blocks[j][c] for j, c in enumerate(choice)), []) + tail
    valid += task.is_valid_trace(WORKED_PROMPT, resp)
    assert not arith_task.ArithChain(swap=False).is_valid_trace(WORKED_PROMPT, resp) or choice == (0, 0, 0)
  assert valid == 8
  # Mixing the two orders inside one step, a wrong result or a missing EOS breaks validity.
  bad = list(WORKED_RESPONSE)
  bad[0], bad[1] = 5, 10
  assert not task.is_valid_trace(WORKED_PROMPT, bad)
  bad = list(WORKED_RESPONSE)
  bad[23] = 6
  assert not task.is_valid_trace(WORKED_PROMPT, bad)
  bad = list(WORKED_RESPONSE)
  bad[24] = arith_task.PAD
  assert not task.is_valid_trace(WORKED_PROMPT, bad)
  assert not task.is_valid_trace([16, 3, 7, 10, 5, 11, 5, 10, 9, 15], WORKED_RESPONSE)  # '*5' is not a step


def test_arith_generated_examples_are_valid_and_follow_the_law():
  task = arith_task.ArithChain()
  g = task.generate(1, 4000)
  assert task.valid_traces(g["prompt"][:300], g["response"][:300]).all()
  # The swap flags match the rendering: in a swapped step the operand comes first (slot 7j is a digit d, slot
  # 7j + 1 the operator), in a plain step slot 7j + 2 is the operator.
  for j in range(3):
    act = g["num_steps"] > j
    sw = g["swapped"][:, j] == 1
    assert np.isin(g["response"][act & sw, 7 * j + 1], (arith_task.PLUS, arith_task.TIMES)).all()
    assert np.isin(g["response"][act & ~sw, 7 * j + 2], (arith_task.PLUS, arith_task.TIMES)).all()
  np.testing.assert_array_equal(arith_task.parse_answers(g["response"]), g["answer"])
  assert arith_task.exact_match(g["response"], g["answer"]).all()
  k = g["num_steps"]
  assert set(np.unique(k)) == {1, 2, 3} and abs(np.mean(k == 1) - 1 / 3) < 0.03
  a0 = 10 * g["prompt"][:, 1] + g["prompt"][:, 2]
  assert a0.min() == 0 and a0.max() == 99
  ops = g["prompt"][:, 3]
  d = g["prompt"][:, 4]
  assert set(np.unique(d[ops == arith_task.PLUS])) == set(range(1, 10))
  assert set(np.unique(d[ops == arith_task.TIMES])) == {2, 3}
  assert abs(np.mean(ops == arith_task.TIMES) - 0.5) < 0.03
  s = g["swapped"][:, 0]
  assert abs(s.mean() - 0.5) < 0.03
  # Swapped steps only within the k drawn steps; swap=False never swaps.
  assert (g["swapped"][np.arange(3)[None, :] >= k[:, None]] == 0).all()
  g2 = arith_task.ArithChain(swap=False).generate(1, 500)
  assert (g2["swapped"] == 0).all()
  assert arith_task.ArithChain(swap=False).valid_traces(g2["prompt"], g2["response"]).all()


def test_arith_other_kmax():
  task = arith_task.ArithChain(kmax=5)
  g = task.generate(3, 300)
  assert g["prompt"].shape == (300, 14) and g["response"].shape == (300, 39)
  assert task.valid_traces(g["prompt"], g["response"]).all()
  assert g["num_steps"].max() == 5


def test_arith_determinism_and_splits():
  task = arith_task.ArithChain()
  a, b = task.generate(7, 100), task.generate(7, 100)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  np.testing.assert_array_equal(task.generate(7, 30)["response"], a["response"][:30])  # prefix-stable
  assert not np.array_equal(task.generate(8, 100)["response"], a["response"])
  tr, va, te = (task.split(s, 200)["response"] for s in ("train", "validation", "test"))
  assert not np.array_equal(tr, va) and not np.array_equal(va, te) and not np.array_equal(tr, te)
  np.testing.assert_array_equal(task.split("test", 200)["response"], te)
  assert not np.array_equal(task.split("train", 200, stream=1)["response"], tr)
  with pytest.raises(ValueError, match="split"):
    task.split("dev", 10)
  s = task.stream(5, 8)
  b0, b1 = next(s), next(s)
  assert not np.array_equal(b0["response"], b1["response"])
  np.testing.assert_array_equal(next(task.stream(5, 8))["response"], b0["response"])


def test_parse_answer_bad_responses():
  good = list(WORKED_RESPONSE)
  assert arith_task.parse_answer(good) == 35
  no_arrow = [t if t != arith_task.ARROW else arith_task.EQUALS for t in good]
  assert arith_task.parse_answer(no_arrow) == -1
  non_digit = list(good)
  non_digit[22] = arith_task.MASK
  assert arith_task.parse_answer(non_digit) == -1
  at_end = [arith_task.EOS] * 23 + [arith_task.ARROW, 4]
  assert arith_task.parse_answer(at_end) == -1
  assert arith_task.parse_answer([arith_task.ARROW, 0, 7] + [arith_task.EOS] * 22) == 7
  # The FIRST '>' counts.
  two = [arith_task.ARROW, 1, 2, arith_task.ARROW, 3, 4] + [arith_task.EOS] * 19
  assert arith_task.parse_answer(two) == 12
  preds = np.array([good, no_arrow, two])
  np.testing.assert_array_equal(arith_task.exact_match(preds, [35, 35, 34]), [True, False, False])


# ------------------------------------------------------------------------------------------------ HMM-16


def test_hmm16_parameters():
  hmm = hmm_task.HMM16()
  np.testing.assert_allclose(hmm.A.sum(0), 1.0)
  np.testing.assert_allclose(hmm.A.sum(1), 1.0)
  np.testing.assert_allclose(hmm.B.sum(1), 1.0)
  assert hmm.A[2, 2] == 0.85 and hmm.A[7, 0] == 0.10 and hmm.A[6, 1] == 0.05
  assert hmm.B[7, 14] == 0.4 and hmm.B[7, 1] == 0.1
  assert ((hmm.B > 0).sum(0) == 2).all()  # every symbol comes from two states
  np.testing.assert_allclose(hmm.stationary(), np.full(8, 1 / 8), atol=1e-12)
  assert hmm.unigram_entropy() == pytest.approx(2.75245, abs=5e-6)
  assert hmm.unigram_entropy() == pytest.approx(-(0.6 * math.log(0.075) + 0.4 * math.log(0.05)), rel=1e-12)
  sm = hmm.smoothed(1e-3)
  np.testing.assert_allclose(sm.A.sum(1), 1.0)
  np.testing.assert_allclose(sm.B.sum(1), 1.0)
  assert sm.B.min() == pytest.approx(1e-3 / 16) and sm.A.min() == pytest.approx(1e-3 / 8)


def test_hmm16_log_prob_matches_brute_force():
  hmm = hmm_task.HMM16()
  x = hmm.sample(0, 5, 4)
  for h in (hmm, hmm.smoothed()):
    lp = h.log_prob(x)
    for b in range(5):
      total = 0.0
      for z in itertools.product(range(8), repeat=4):
        p = h.pi[z[0]] * h.B[z[0], x[b, 0]]
        for t in range(1, 4):
          p *= h.A[z[t - 1], z[t]] * h.B[z[t], x[b, t]]
        total += p
      assert lp[b] == pytest.approx(math.log(total), rel=1e-10)
  # Prefix lengths score prefixes; an impossible sequence scores -inf under the source, finite when smoothed.
  np.testing.assert_allclose(hmm.log_prob(x, lengths=np.full(5, 2)), hmm.log_prob(x[:, :2]), rtol=1e-12)
  possible = np.array([[0, 9]])  # 0 comes from states 0 and 7, 9 from states 3 and 4; 0 -> 3 is a transition
  assert np.isfinite(hmm.log_prob(possible)[0])
  impossible = np.array([[0, 11]])  # 11 comes from states 4 and 5, not reachable from states 0 or 7 in one step
  assert hmm.log_prob(impossible)[0] == -np.inf
  assert np.isfinite(hmm.smoothed().log_prob(impossible)[0])
  assert hmm.smoothed().log_prob(np.array([[0, 16]]))[0] == -np.inf  # not a symbol


def test_hmm16_entropy_rate_and_uniform_score():
  hmm = hmm_task.HMM16()
  x = hmm.sample(1, 2000, 32)
  assert x.dtype == np.int32 and x.min() >= 0 and x.max() <= 15
  nll = -hmm.log_prob(x) / 32
  assert nll.mean() == pytest.approx(1.7735, abs=0.02)
  assert (-hmm.smoothed().log_prob(x) / 32).mean() == pytest.approx(1.7745, abs=0.02)
  u = np.random.default_rng(2).integers(0, 16, (2000, 32))
  assert (-hmm.smoothed().log_prob(u) / 32).mean() == pytest.approx(4.404, abs=0.05)
  np.testing.assert_array_equal(hmm.sample(1, 2000, 32), x)
  assert not np.array_equal(hmm.sample(2, 2000, 32), x)


def test_hmm16_sample_from_jax_key():
  jax = pytest.importorskip("jax")
  hmm = hmm_task.HMM16()
  a = hmm.sample(jax.random.key(3), 4, 8)
  np.testing.assert_array_equal(a, hmm.sample(jax.random.key(3), 4, 8))
  np.testing.assert_array_equal(a, hmm.sample(jax.random.PRNGKey(3), 4, 8))
  assert not np.array_equal(a, hmm.sample(jax.random.key(4), 4, 8))


def test_hmm16_variable_length():
  vl = hmm_task.HMM16VarLen()
  x, lengths = vl.sample(5, 4000)
  assert x.shape == (4000, 32) and lengths.min() == 8 and lengths.max() == 32
  np.testing.assert_array_equal(vl.lengths_of(x), lengths)
  assert (x[np.arange(32)[None, :] >= lengths[:, None]] == hmm_task.HMM_PAD).all()
  lp = vl.log_prob(x)
  np.testing.assert_allclose(lp, vl.hmm.log_prob(x, lengths) + math.log(1 / 25), rtol=1e-12)
  assert lengths.mean() == pytest.approx(20, abs=0.3)
  assert -lp.sum() / lengths.sum() == pytest.approx(1.958, abs=0.03)
  short = x[:1].copy()
  short[0, 5:] = hmm_task.HMM_PAD
  assert vl.log_prob(short)[0] == -np.inf  # length 5 < 8
  assert np.isfinite(vl.smoothed().log_prob(x[:10])).all()


# ------------------------------------------------------------------------------------------------ JSONL


def _encode(text):
  return [ord(c) for c in text]


def _write(tmp_path, lines):
  path = tmp_path / "data.jsonl"
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  return path


def test_jsonl_loads_examples(tmp_path):
  path = _write(tmp_path, [json.dumps({"prompt": "ab", "response": "cde"}), "",
                           json.dumps({"prompt": "", "response": "xyz", "extra": 1})])
  ex = sft_task.load_prompt_response_jsonl(path, _encode, max_len=5)
  assert len(ex) == 2
  np.testing.assert_array_equal(ex[0]["prompt"], [97, 98])
  np.testing.assert_array_equal(ex[0]["response"], [99, 100, 101])
  assert ex[0]["prompt"].dtype == np.int32
  assert (ex[1]["example_id"], ex[1]["line"], ex[1]["prompt"].size) == (1, 3, 0)
  path2 = _write(tmp_path, [json.dumps({"q": "a", "a": "b"})])
  ex2 = sft_task.load_prompt_response_jsonl(path2, _encode, max_len=5, prompt_key="q", response_key="a")
  np.testing.assert_array_equal(ex2[0]["response"], [98])


@pytest.mark.parametrize("bad_line,match", [
    ("{not json", "not valid JSON"),
    ('["a", "b"]', "expected a JSON object"),
    ('{"prompt": "ab"}', "missing field 'response'"),
    ('{"prompt": "ab", "response": 3}', "must be a string"),
    ('{"prompt": "abc", "response": "def"}', "longer than max_len = 5"),
    ('{"prompt": "ab", "response": ""}', "no tokens"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, bad_line, match):
  good = json.dumps({"prompt": "a", "response": "b"})
  path = _write(tmp_path, [good, "", good, bad_line, good])
  with pytest.raises(ValueError, match=match) as err:
    sft_task.load_prompt_response_jsonl(path, _encode, max_len=5)
  assert f"{path}:4:" in str(err.value)


def test_jsonl_empty_and_missing_file(tmp_path):
  path = _write(tmp_path, ["", "  "])
  with pytest.raises(ValueError, match="no examples"):
    sft_task.load_prompt_response_jsonl(path, _encode, max_len=5)
  with pytest.raises(FileNotFoundError):
    sft_task.load_prompt_response_jsonl(tmp_path / "missing.jsonl", _encode, max_len=5)
