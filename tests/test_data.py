"""Tests of dlm_jax.data: tokenizers, sources, the TFDS builder and the grain pipeline (all offline)."""
from __future__ import annotations

import io
import json
import lzma
import os
import tarfile

import grain
import numpy as np
import pytest

from dlm_jax.data import pipeline
from dlm_jax.data import tokenizers
from dlm_jax.data.pipeline import describe_batch, make_eval_iterator, make_lm_iterator
from dlm_jax.data.corpora import BibleSource, TextFilesSource, tfds_source
from dlm_jax.data.tokenizers import get_tokenizer


@pytest.fixture(scope="module")
def byte_tok():
  return get_tokenizer("bytes")


@pytest.fixture(scope="module")
def gpt2():
  return get_tokenizer("gpt2")


def _docs(n: int = 23) -> list[str]:
  """Distinct documents of varied length (some longer than the rows used below)."""
  return [f"doc{i:03d} " + "abcdefghij"[: i % 10] * (1 + i % 4) for i in range(n)]


def _check_rows(batch: dict[str, np.ndarray], tok, seq_len: int) -> None:
  """Invariants of every row: contiguous segments 1..k then padding; positions restart per segment."""
  for k in pipeline.FEATURES:
    assert batch[k].dtype == np.int32 and batch[k].shape[1] == seq_len, (k, batch[k].shape)
  for tokens, seg, pos in zip(batch["tokens"], batch["segment_ids"], batch["positions"]):
    n = int((seg > 0).sum())
    assert (seg[n:] == 0).all(), "padding only at the end of a row"
    assert (tokens[n:] == tok.pad_id).all() and (pos[n:] == 0).all()
    if n:
      assert seg[0] == 1 and set(np.diff(seg[:n]).tolist()) <= {0, 1}, seg
      for s in range(1, int(seg.max()) + 1):
        np.testing.assert_array_equal(pos[seg == s], np.arange((seg == s).sum()))


def _real_tokens(batches) -> list[int]:
  return [int(t) for b in batches for row, seg in zip(b["tokens"], b["segment_ids"]) for t in row[seg > 0]]


def _stream(docs, tok) -> list[int]:
  return [t for d in docs if d.strip() for t in [tok.bos_id, *tok.encode(d), tok.eos_id]]


# ---------------------------------------------------------------------------------------------------------
# Tokenizers.


def test_gpt2_ids_and_specials(gpt2):
  assert gpt2.encode("Hello world") == [15496, 995]
  assert (gpt2.vocab_size, gpt2.bos_id, gpt2.eos_id, gpt2.mask_id, gpt2.pad_id) == (50258, 50256, 50256,
                                                                                       50257, 50256)
  assert gpt2.decode([50256, 15496, 50257, 995, 50256]) == "Hello world"
  # Special-token strings inside a document are plain text.
  assert 50257 not in gpt2.encode("a [MASK] b <|endoftext|>")
  assert gpt2.decode_batch(np.array([[15496, 995], [15496, 50256]])) == ["Hello world", "Hello"]


def test_bytes_tokenizer_round_trip(byte_tok):
  text = "héllo\nwörld \x00 [MASK]"
  assert byte_tok.vocab_size == 260 and byte_tok.decode(byte_tok.encode(text)) == text
  assert min(byte_tok.encode(text)) >= 4


def test_bpe_trains_round_trips_and_is_cached(tmp_path, monkeypatch):
  texts = [BibleSource("train")[i] for i in range(150)]
  tok = get_tokenizer("bpe", vocab_size=600, train_texts=texts, cache_dir=str(tmp_path / "a"))
  assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id) == (600, 0, 1, 2, 3)
  for text in ["And God said, Let there be light.", "naïve café — 42 <|x|> [MASK]\n\tend"]:
    ids = tok.encode(text)
    assert all(i >= 4 for i in ids) and tok.decode(ids) == text
  assert len(tok.encode(texts[0])) < len(texts[0].encode()) / 2  # it learned merges
  assert os.path.exists(tok.cache_path)
  # Cached: a second call must not train again.
  monkeypatch.setattr(tokenizers, "_train_bpe", lambda *a: pytest.fail("retrained despite the cache"))
  again = get_tokenizer("bpe", vocab_size=600, train_texts=texts, cache_dir=str(tmp_path / "a"))
  assert again.fingerprint() == tok.fingerprint() and again.encode(texts[1]) == tok.encode(texts[1])
  monkeypatch.undo()
  # Deterministic: training again elsewhere gives the same vocabulary; other settings differ.
  fresh = get_tokenizer("bpe", vocab_size=600, train_texts=texts, cache_dir=str(tmp_path / "b"))
  assert fresh.fingerprint() == tok.fingerprint()
  other = get_tokenizer("bpe", vocab_size=700, train_texts=texts, cache_dir=str(tmp_path / "b"))
  assert other.fingerprint() != tok.fingerprint() != get_tokenizer("bytes").fingerprint()
  # 'file:' loads a tokenizer.json the user supplies.
  from_file = get_tokenizer(f"file:{tok.cache_path}")
  assert from_file.encode(texts[2]) == tok.encode(texts[2])
  assert (from_file.bos_id, from_file.eos_id, from_file.mask_id, from_file.pad_id) == (1, 2, 3, 0)


def test_bpe_default_corpus_and_concurrent_cache(tmp_path):
  """Two processes building the same cached tokenizer at once both succeed with one identical file."""
  import subprocess
  import sys
  code = ("from dlm_jax.data.tokenizers import get_tokenizer; "
          f"print(get_tokenizer('bpe', vocab_size=400, cache_dir={str(tmp_path)!r}).fingerprint())")
  procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(2)]
  outs = [p.communicate(timeout=120)[0].strip() for p in procs]
  assert all(p.returncode == 0 for p in procs) and outs[0] == outs[1]
  files = [f for f in os.listdir(tmp_path) if f.endswith(".json")]
  assert len(files) == 1 and files[0].startswith("bpe-kjv-400-")
  tok = get_tokenizer("bpe", vocab_size=400, cache_dir=str(tmp_path))
  assert tok.fingerprint() == outs[0]


def test_tokenizer_pickles_as_plain_text(gpt2):
  import pickle
  again = pickle.loads(pickle.dumps(gpt2))
  assert again.encode("x [MASK] <|endoftext|>") == gpt2.encode("x [MASK] <|endoftext|>")
  assert 50257 not in again.encode("[MASK]")


def test_tokenizer_errors(tmp_path):
  missing = str(tmp_path / "nope" / "tokenizer.json")
  with pytest.raises(FileNotFoundError, match="config.data.tokenizer") as e:
    get_tokenizer(f"file:{missing}")
  assert missing in str(e.value)
  with pytest.raises(ValueError, match="unknown tokenizer"):
    get_tokenizer("sentencepiece")
  with pytest.raises(ValueError, match="vocab_size"):
    get_tokenizer("bpe", vocab_size=100, cache_dir=str(tmp_path))
  assert get_tokenizer("bytes", vocab_size=4096).vocab_size == 260  # 'bpe only' option: ignored


# ---------------------------------------------------------------------------------------------------------
# Sources.


def test_bible_source_split():
  train, val = BibleSource("train"), BibleSource("validation")
  assert (len(train), len(val)) == (1130, 59)
  assert train[0].startswith("Genesis 1\nIn the beginning God created the heaven and the earth.")
  assert not set(train[i] for i in range(len(train))) & set(val[i] for i in range(len(val)))
  with pytest.raises(ValueError, match="split"):
    BibleSource("test")


def test_text_files_source(tmp_path):
  (tmp_path / "a.txt").write_bytes(b"first doc\nline two\n\n\n\nsecond \xff\xfe doc\r\n\r\nthird")
  (tmp_path / "sub").mkdir()
  (tmp_path / "sub" / "b.jsonl").write_bytes(
      b'{"text": "json doc"}\nnot json\n{"other": 1}\n{"text": ""}\n{"text": "bad \xc3\x28 utf8"}\n')
  src = TextFilesSource(str(tmp_path), split=None)
  docs = [src[i] for i in range(len(src))]
  assert docs == ["first doc\nline two", "second \ufffd\ufffd doc", "third", "json doc", "bad \ufffd( utf8"]
  train, val = (TextFilesSource(str(tmp_path), s, validation_every=2) for s in ("train", "validation"))
  assert len(train) + len(val) == 5 and len(val) == 2
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="no .txt/.jsonl files"):
    TextFilesSource(str(tmp_path / "empty"))
  with pytest.raises(FileNotFoundError, match="config.data.path"):
    TextFilesSource(str(tmp_path / "missing"))


def test_missing_tfds_data_gives_prepare_command(tmp_path):
  for name in ("openwebtext", "lm1b"):
    with pytest.raises(FileNotFoundError, match="python -m dlm_jax.prepare") as e:
      tfds_source(name, "train", str(tmp_path))
    assert f"--dataset={name}" in str(e.value) and str(tmp_path) in str(e.value)
  assert not any("array_record" in f for _, _, files in os.walk(tmp_path) for f in files)  # nothing prepared


def test_owt_builder_array_record_round_trip(tmp_path, byte_tok):
  """Prepare OpenWebTextLocal from 3 local .txt files, read it back with tfds.data_source + the pipeline."""
  from dlm_jax import prepare
  src_dir, data_dir = tmp_path / "owt", tmp_path / "tfds"
  src_dir.mkdir()
  texts = {f"doc{i}.txt": f"Open web text number {i}.\n\nIt has two paragraphs {i}." for i in range(3)}
  for name, text in texts.items():
    (src_dir / name).write_text(text)
  out = prepare.prepare("openwebtext", data_dir=str(data_dir), source_dir=str(src_dir))
  assert any(f.endswith(".array_record-00000-of-00001") for f in os.listdir(out))
  train, val = tfds_source("openwebtext", "train", str(data_dir)), tfds_source("openwebtext", "validation",
                                                                                str(data_dir))
  assert len(train) == 2 and len(val) == 1  # document 0 of every 200 is validation
  same = tfds_source("openwebtext_local", "train", str(data_dir))
  assert [same[0], same[1]] == [train[0], train[1]]
  assert sorted([train[0], train[1], val[0]]) == sorted(texts.values())
  it = make_eval_iterator(train, byte_tok, seq_len=64, global_batch_size=2, packing="pad")
  got = [b for b in it]
  assert len(got) == 1
  assert sorted(byte_tok.decode_batch(got[0]["tokens"])) == sorted([t for t in texts.values()
                                                                    if t != val[0]][:2])
  batch = next(make_lm_iterator(train, byte_tok, seq_len=32, global_batch_size=2))
  _check_rows(batch, byte_tok, 32)
  assert "tensorflow" not in __import__("sys").modules


def test_owt_iter_documents_reads_nested_archives(tmp_path):
  """The original dump layout: an .xz tar of .xz tars of .txt files, read with the standard library."""
  from dlm_jax.data.owt_builder import iter_documents

  def tar_bytes(files: dict[str, bytes], mode: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
      for name, data in files.items():
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()

  inner = tar_bytes({"0001.txt": b"inner one", "0002.txt": b"inner \xff two"}, "w:xz")
  (tmp_path / "openwebtext.tar.xz").write_bytes(tar_bytes({"openwebtext/urlsf_subset00-1_data.xz": inner},
                                                          "w:xz"))
  (tmp_path / "plain.txt").write_text("plain")
  (tmp_path / "urlsf_subset01-1_data.xz").write_bytes(lzma.compress(tar_bytes({"x.txt": b"loose xz"}, "w")))
  docs = [text for _, text in iter_documents(str(tmp_path))]
  assert docs == ["inner one", "inner \ufffd two", "plain", "loose xz"]


# ---------------------------------------------------------------------------------------------------------
# Pipeline.


def test_pack_covers_every_token_once(byte_tok):
  docs = _docs() + ["", "   ", "x" * 70]  # empty, blank and over-long documents
  seq_len = 16
  it = make_lm_iterator(docs, byte_tok, seq_len=seq_len, global_batch_size=4, shuffle=False, num_epochs=1,
                        drop_remainder=False)
  batches = list(it)
  for b in batches:
    assert b["tokens"].shape == (4, seq_len)
    _check_rows(b, byte_tok, seq_len)
  assert _real_tokens(batches) == _stream(docs, byte_tok)
  rows = [r for b in batches for r in b["segment_ids"]]
  assert sum((r == 0).sum() for r in rows) < seq_len * 4  # padding only at the very end
  # A document's start carries BOS at position 0; continuation chunks start at position 0 without BOS.
  first = batches[0]
  assert first["tokens"][0, 0] == byte_tok.bos_id and first["positions"][0, 0] == 0


def test_pad_mode_one_document_per_row(byte_tok):
  docs = ["short", "", "y" * 40, "mid length doc"]
  it = make_lm_iterator(docs, byte_tok, seq_len=12, global_batch_size=2, shuffle=False, num_epochs=1,
                        packing="pad", drop_remainder=False)
  batches = list(it)
  assert len(batches) == 2  # 3 non-empty docs -> the last batch gets one all-padding row
  rows = [(t, s) for b in batches for t, s in zip(b["tokens"], b["segment_ids"])]
  for b in batches:
    _check_rows(b, byte_tok, 12)
  assert [byte_tok.decode(t[s > 0]) for t, s in rows] == ["short", "y" * 11, "mid length ", ""]
  assert rows[0][0][0] == byte_tok.bos_id and rows[0][0][6] == byte_tok.eos_id
  assert rows[1][1].max() == 1 and (rows[1][1] == 1).all()  # truncated: no EOS, no padding


def test_robust_to_bad_documents(gpt2):
  docs = ["", "ok doc", b"bytes \xff\xfe doc", " \n ", "\ufffd" * 3, "w " * 3000, {"text": "dict doc"}]
  for packing in ("pack", "pad"):
    it = make_lm_iterator(docs, gpt2, seq_len=32, global_batch_size=2, shuffle=False, num_epochs=1,
                          packing=packing, drop_remainder=False)
    batches = list(it)
    assert batches
    for b in batches:
      _check_rows(b, gpt2, 32)
  with pytest.raises(ValueError, match="empty"):
    make_lm_iterator([], gpt2, seq_len=8, global_batch_size=2)
  with pytest.raises(ValueError, match="multiple of the number of processes"):
    make_lm_iterator(docs, gpt2, seq_len=8, global_batch_size=3, process_count=2)
  with pytest.raises(ValueError, match="packing"):
    make_lm_iterator(docs, gpt2, seq_len=8, global_batch_size=2, packing="wrap")


def test_deterministic_for_seed(byte_tok):
  def first(seed):
    it = make_lm_iterator(_docs(), byte_tok, seq_len=16, global_batch_size=4, seed=seed)
    return np.concatenate([next(it)["tokens"] for _ in range(6)])
  np.testing.assert_array_equal(first(3), first(3))
  assert not np.array_equal(first(3), first(4))


@pytest.mark.parametrize("packing", ["pack", "pad"])
def test_state_restore_yields_next_unseen_batch(byte_tok, packing):
  kw = dict(seq_len=16, global_batch_size=4, seed=7, packing=packing)
  it = make_lm_iterator(_docs(), byte_tok, **kw)
  # Restore points across epochs and inside split documents; the state goes through JSON like Orbax's.
  states, batches = [], []
  for _ in range(14):
    states.append(json.loads(json.dumps(it.get_state())))
    batches.append(next(it))
  for k in (0, 1, 5, 9, 13):
    fresh = make_lm_iterator(_docs(), byte_tok, **kw)
    fresh.set_state(states[k])
    for expected in batches[k:k + 2]:
      got = next(fresh)
      for name in pipeline.FEATURES:
        np.testing.assert_array_equal(got[name], expected[name])


def test_orbax_checkpoint_of_iterator(tmp_path, byte_tok):
  import orbax.checkpoint as ocp
  kw = dict(seq_len=16, global_batch_size=4, seed=1)
  it = make_lm_iterator(_docs(), byte_tok, **kw)
  for _ in range(5):
    next(it)
  with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mngr:
    mngr.save(5, args=ocp.args.Composite(
        state=ocp.args.StandardSave({"step": np.array(5)}),
        data_iter=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    expected = [next(it) for _ in range(3)]
    restored_it = make_lm_iterator(_docs(), byte_tok, **kw)
    restored = mngr.restore(5, args=ocp.args.Composite(
        state=ocp.args.StandardRestore({"step": np.array(0)}),
        data_iter=grain.checkpoint.CheckpointRestore(restored_it)))
  assert int(restored["state"]["step"]) == 5
  for e in expected:
    got = next(restored.data_iter)
    for name in pipeline.FEATURES:
      np.testing.assert_array_equal(got[name], e[name])


@pytest.mark.parametrize("packing", ["pack", "pad"])
def test_process_shards_disjoint_and_cover(byte_tok, packing):
  docs = _docs(25)
  per_process = []
  for p in range(2):
    it = make_lm_iterator(docs, byte_tok, seq_len=64, global_batch_size=4, process_index=p, process_count=2,
                          shuffle=True, seed=0, num_epochs=1, packing=packing, drop_remainder=False)
    batches = list(it)
    assert all(b["tokens"].shape == (2, 64) for b in batches)
    # Rebuild the documents from the token stream (pack mode splits them across rows).
    stream = np.array(_real_tokens(batches))
    starts = np.flatnonzero(stream == byte_tok.bos_id).tolist() + [len(stream)]
    per_process.append([byte_tok.decode(stream[a:b]) for a, b in zip(starts[:-1], starts[1:])])
  assert not set(per_process[0]) & set(per_process[1])
  assert sorted(per_process[0] + per_process[1]) == sorted(docs)


@pytest.mark.parametrize("packing", ["pack", "pad"])
def test_eval_iterator_covers_split_once(byte_tok, packing):
  docs = _docs(11) + [""]
  seq_len, global_batch = 24, 4
  outs = [list(make_eval_iterator(docs, byte_tok, seq_len=seq_len, global_batch_size=global_batch,
                                  process_index=p, process_count=2, packing=packing)) for p in range(2)]
  assert len(outs[0]) == len(outs[1]) > 0  # same number of batches on every process
  for batches in outs:
    for b in batches:
      assert b["tokens"].shape == (2, seq_len)
      _check_rows(b, byte_tok, seq_len)
  # Interleave the processes' halves back into global batches: the split, once, in order.
  merged = [{k: np.concatenate([b0[k], b1[k]]) for k in b0} for b0, b1 in zip(*outs)]
  if packing == "pack":
    assert _real_tokens(merged) == _stream(docs, byte_tok)
  else:
    texts = [byte_tok.decode(t[s > 0]) for b in merged for t, s in zip(b["tokens"], b["segment_ids"])]
    expected = [byte_tok.decode(np.array(_stream([d], byte_tok)[:seq_len], dtype=np.int32)) for d in docs]
    assert texts == expected + [""] * (len(texts) - len(docs))
  again = list(make_eval_iterator(docs, byte_tok, seq_len=seq_len, global_batch_size=global_batch,
                                  process_index=0, process_count=2, packing=packing))
  np.testing.assert_array_equal(np.stack([b["tokens"] for b in again]), np.stack([b["tokens"] for b in outs[0]]))


def test_describe_batch(gpt2):
  it = make_lm_iterator(BibleSource("validation"), gpt2, seq_len=64, global_batch_size=2, shuffle=False)
  text = describe_batch(next(it), gpt2)
  assert "Genesis 20" in text and "segment 1" in text and "BOS" in text


def test_data_source_registry(tmp_path):
  """config.data.source names a registered source; each checks the data.* fields it reads."""
  from configs import mdlm_tiny  # pylint: disable=g-import-not-at-top
  from dlm_jax.config import ConfigError  # pylint: disable=g-import-not-at-top
  from dlm_jax.data import sources as registry  # pylint: disable=g-import-not-at-top
  assert set(registry.names()) == {"bible", "text", "tfds", "arith", "hmm", "hmm_varlen", "sft"}
  with pytest.raises(ConfigError, match=r"config.data.source='wikipedia' is not one of"):
    registry.get("wikipedia")
  cfg = mdlm_tiny.get_config()
  with pytest.raises(ConfigError, match="config.data.path: is empty"):
    registry.get("text").check(cfg)
  cfg.data.path = str(tmp_path / "nope.txt")
  with pytest.raises(ConfigError, match="does not exist"):
    registry.get("text").check(cfg)
  with pytest.raises(ConfigError, match="config.data.tfds_name"):
    registry.get("tfds").check(cfg)
  cfg.data.path = str(tmp_path / "pairs.txt")
  with pytest.raises(ConfigError, match=r"data.source='sft' reads a prompt/response .jsonl"):
    registry.get("sft").check(cfg)
  # The embedded corpus, through the registry, as training reads it.
  cfg.data.tokenizer, cfg.train.global_batch_size, cfg.data.seq_len = "bytes", 2, 32
  bible = registry.get("bible")
  batch = next(bible.train_iterator(cfg, bible.make_tokenizer(cfg)))
  assert batch["tokens"].shape == (2, 32)
