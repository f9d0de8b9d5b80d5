"""Prompts and infilling (issue 15 item 5): template syntax and its errors, prompts files, and
prompt tokens that no decoder ever changes (MDLM: ancestral, threshold, fixed_k, threshold with
R²; DID), on untrained tiny models; the command line on a trained tiny run."""

import dataclasses
import json
import os
import subprocess
import sys

import flax
import jax
import ml_collections
import numpy as np
import pytest

from configs import did_tiny
from dlm_jax import methods
from dlm_jax.data.tokenizers import get_tokenizer
from dlm_jax.run import api
from dlm_jax.run import prompts as prompts_lib
from dlm_jax.sampling import templates
from dlm_jax.sampling.templates import Span, TemplateError
from tests.tiny import TINY_FLAGS, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- template syntax -----------------------------------------------------------------------------
def test_parse_template():
  parts = templates.parse_template("The [[6]] sat on \\[[x]] the [[ * ]].")
  assert parts == ["The ", Span(1, "[[6]]", 6), " sat on [[x]] the ", Span(2, "[[ * ]]", None), "."]
  assert templates.parse_template("[[2]][[3]]") == [Span(1, "[[2]]", 2), Span(2, "[[3]]", 3)]
  for bad, where in (("a [[0]] b", "span 1 '[[0]]'"), ("a [[2]] [[x]]", "span 2 '[[x]]'"),
                     ("a [[-1]]", "span 1"), ("a [[2 b", "unclosed")):
    with pytest.raises(TemplateError, match=where.replace("[", "\\[")):
      templates.parse_template(bad)


def test_spans_overlap_or_exceed_are_named():
  text = "The cat sat on the mat."
  parts = templates.spans_to_template(text, [(19, 22, 2), (4, 7, 3)])
  assert parts == ["The ", Span(1, "[[3]]", 3), " sat on the ", Span(2, "[[2]]", 2), "."]
  with pytest.raises(TemplateError, match=r"span 2 \(5, 9\) overlaps span 1 \(4, 7\)"):
    templates.spans_to_template(text, [(4, 7, 3), (5, 9, 1)])
  with pytest.raises(TemplateError, match=r"span 1 \(20, 40\) exceeds the text"):
    templates.spans_to_template(text, [(20, 40, 2)])
  with pytest.raises(TemplateError, match=r"span 1 \(4, 7\).*>= 1"):
    templates.spans_to_template(text, [(4, 7, 0)])


def test_rows_refuse_what_the_method_cannot_fill():
  enc = lambda s: [ord(c) for c in s]  # noqa: E731
  row = templates.masked_row(templates.parse_template("ab[[3]]c"), enc, 1, 3, 16)
  assert row.ids == [1, 97, 98, 3, 3, 3, 99] and row.spans == {1: [3, 4, 5]}
  assert row.fill == [False, False, False, True, True, True, False]
  with pytest.raises(TemplateError, match=r"span 2 '\[\[10\]\]' would end at token 17"):
    templates.masked_row(templates.parse_template("ab[[3]]c[[10]]"), enc, 1, 3, 16)
  with pytest.raises(TemplateError, match=r"span 1 '\[\[\*\]\]'.*\[\[N\]\]"):
    templates.masked_row(templates.parse_template("ab[[*]]"), enc, 1, 3, 16)
  with pytest.raises(TemplateError, match="no span"):
    templates.masked_row(templates.parse_template("abc"), enc, 1, 3, 16)
  g = templates.gap_row(templates.parse_template("[[*]]ab[[*]]c"), enc, 8)
  assert g.ids == [97, 98, 99] and g.open == [1, 0, 2, 0]
  with pytest.raises(TemplateError, match=r"span 1 '\[\[4\]\]'.*\[\[\*\]\]"):
    templates.gap_row(templates.parse_template("a[[4]]"), enc, 8)
  with pytest.raises(TemplateError, match="span 2 .* same gap as span 1"):
    templates.gap_row(templates.parse_template("a[[*]][[*]]"), enc, 8)
  with pytest.raises(TemplateError, match="capacity=3"):
    templates.gap_row(templates.parse_template("abc[[*]]"), enc, 3)


def test_prompts_file_errors_name_the_line(tmp_path):
  path = tmp_path / "p.jsonl"
  path.write_text('{"prompt": "a"}\n\n{"infill": "b [[2]]", "id": 4}\n')
  items = prompts_lib.read_prompts(str(path))
  assert [(i.kind, i.text, i.id) for i in items] == [("prompt", "a", None), ("infill", "b [[2]]", 4)]
  for content, msg in (('{"prompt": "a"}\n{"promt": "b"}\n', "line 2: unknown key.*'promt'"),
                       ('{"prompt": "a", "infill": "b"}\n', "line 1: give exactly one"),
                       ('{"prompt": 3}\n', "line 1: 'prompt' must be a string"),
                       ('not json\n', "line 1: not valid JSON"), ("\n", "no prompts")):
    path.write_text(content)
    with pytest.raises(ValueError, match=msg):
      prompts_lib.read_prompts(str(path))


# -- prompt tokens are never changed ------------------------------------------------------------
@dataclasses.dataclass
class FakeRun:
  """What prompts.generate reads from a LoadedRun, with untrained parameters."""
  config: ml_collections.ConfigDict
  tokenizer: object
  method: object
  params: object
  mesh: object


def make_run(config):
  tok = get_tokenizer("bytes")
  method = methods.make_method(config, tok)
  params = flax.linen.meta.unbox(method.init_params(jax.random.key(0)))
  return FakeRun(config, tok, method, params, api._mesh_over([jax.devices()[0]]))  # pylint: disable=protected-access


PROMPTS = [{"prompt": "Hi"}, {"prompt": "Hello there", "id": "h"}, {"infill": "ab[[3]]cd[[2]]e"}]


def _check_given_tokens_kept(run, res, items):
  rows = prompts_lib._rows(run, prompts_lib.as_items(items), run.config.sample)  # pylint: disable=protected-access
  per = len(res["records"]) // len(items)
  for n, rec in enumerate(res["records"]):
    row = rows[n // per]
    got = np.asarray(rec["tokens"])
    if run.method.family == "masked":
      fill = np.asarray(row.fill)
      np.testing.assert_array_equal(got[~fill], np.asarray(row.ids)[~fill])
      assert (got[fill] != run.tokenizer.mask_id).all()
    else:  # DID: the given tokens, in order, once the inserted ones are removed
      assert len(got) >= len(row.ids)
    assert rec["decoder"] and rec["nfe"] >= 1


@pytest.mark.parametrize("decoder,r2", [("ancestral", ""), ("threshold", ""), ("fixed_k", ""),
                                        ("threshold", "all")])
def test_mdlm_prompts_and_infill_keep_given_tokens(decoder, r2):
  run = make_run(tiny_config())
  s = ml_collections.ConfigDict(run.config.sample.to_dict())
  s.decoder, s.r2, s.num_steps, s.block_len, s.batch_size = decoder, r2, 8, 8, 4
  s.num_samples = 2
  with jax.enable_x64(True):
    res = prompts_lib.generate(run, PROMPTS, s, seed=1)
  assert len(res["records"]) == 6
  assert [r.get("id") for r in res["records"]] == [None, None, "h", "h", None, None]
  assert isinstance(res["records"][0]["completion"], str)
  assert isinstance(res["records"][4]["completion"], list) and len(res["records"][4]["completion"]) == 2
  _check_given_tokens_kept(run, res, PROMPTS)
  # The prefix gets the remaining training length.
  assert len(res["records"][0]["tokens"]) == run.config.data.seq_len


def test_did_prompts_and_infill_keep_given_tokens():
  c = did_tiny.get_config()
  c.data.tokenizer, c.data.seq_len = "bytes", 24
  c.model.num_layers, c.model.d_model, c.model.num_heads, c.model.max_len = 1, 32, 2, 64
  run = make_run(c)
  s = ml_collections.ConfigDict(run.config.sample.to_dict())
  s.num_steps, s.batch_size, s.num_samples = 6, 4, 2
  items = [{"prompt": "Hi"}, {"infill": "ab[[*]]cd[[*]]e"}]
  with jax.enable_x64(True):
    res = prompts_lib.generate(run, items, s, seed=2)
    # Token level: with the span ids, the given tokens come back in order and intact.
    rows = prompts_lib._rows(run, prompts_lib.as_items(items), s)  # pylint: disable=protected-access
    from dlm_jax.methods.did import sampler as did_sampler  # pylint: disable=g-import-not-at-top
    lay = did_sampler.gap_layout([(r.ids, r.open) for r in rows], 24, run.tokenizer.bos_id)
    s2 = ml_collections.ConfigDict(s.to_dict())
    s2.batch_size = 2
    out = jax.device_get(run.method.sample(run.params, jax.random.key(3), s2, layout=lay))
  for j, row in enumerate(rows):
    n = int(out["total_lengths"][j])
    ids, span = np.asarray(out["tokens"])[j, :n], np.asarray(out["span"])[j, :n]
    np.testing.assert_array_equal(ids[span == 0], row.ids)
    # inserted tokens sit only in open gaps: between given tokens i and i+1 only if open
    given_pos = np.nonzero(span == 0)[0]
    for g in range(len(row.ids) + 1):
      lo = given_pos[g - 1] if g else -1
      hi = given_pos[g] if g < len(row.ids) else n
      if not row.open[g]:
        assert hi - lo == 1, (j, g)
      else:
        assert (span[lo + 1:hi] == row.open[g]).all()
  assert len(res["records"]) == 4
  assert res["records"][0]["text"].startswith("Hi")
  assert isinstance(res["records"][2]["completion"], list)
  _check_given_tokens_kept(run, res, items)


def test_reference_path_refuses_layouts():
  run = make_run(tiny_config())
  s = ml_collections.ConfigDict(run.config.sample.to_dict())
  s.reference, s.num_samples = True, 1
  with pytest.raises(ValueError, match="reference=True"):
    prompts_lib.generate(run, ["Hi"], s)


# -- command line --------------------------------------------------------------------------------
def _run(args, timeout=600):
  return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout)


@pytest.mark.slow
def test_sample_prompts_command(tmp_path):
  wd = str(tmp_path / "run")
  r = _run(["dlm_jax.train", "--config=configs/mdlm_tiny.py", f"--workdir={wd}",
            "--config.train.num_steps=2", *TINY_FLAGS])
  assert r.returncode == 0, r.stderr[-3000:]
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text('{"prompt": "In the"}\n{"infill": "And [[4]] said", "id": 9}\n')
  out = tmp_path / "out"
  r = _run(["dlm_jax.sample", f"--workdir={wd}", f"--prompts={prompts}", f"--out_dir={out}",
            "--infill=Let [[2]] be", "--num_samples=2", "--set", "decoder=threshold"])
  assert r.returncode == 0, r.stderr[-3000:]
  recs = [json.loads(l) for l in open(out / "completions.jsonl")]
  assert len(recs) == 6 and {r["decoder"] for r in recs} == {"threshold"}
  assert recs[0]["prompt"] == "In the" and recs[0]["text"].startswith("In the")
  assert recs[2]["id"] == 9 and len(recs[2]["completion"]) == 1
  assert recs[4]["prompt"] == "Let [[2]] be"
  prompts.write_text('{"prompt": "In the"}\n{"prompt": "x", "temperature": 1}\n')
  r = _run(["dlm_jax.sample", f"--workdir={wd}", f"--prompts={prompts}", f"--out_dir={out}"])
  assert r.returncode == 2 and "line 2: unknown key(s) 'temperature'" in r.stderr
  r = _run(["dlm_jax.sample", f"--workdir={wd}", "--infill=The [[*]] sat", f"--out_dir={out}"])
  assert r.returncode == 2 and "span 1 '[[*]]'" in r.stderr
