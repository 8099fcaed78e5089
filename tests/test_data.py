"""Tests for divmoe.data: embedded corpus, byte tokenizer, mixture sampler."""
from __future__ import annotations

import hashlib
import math
from importlib import resources

import pytest
import torch

from divmoe.data import (
    ByteTokenizer,
    Document,
    MixtureSampler,
    domains,
    load_corpus,
    manifest,
    mixture_weights,
    unigram_entropy_bits,
    validation_set,
)
from divmoe.data.mixture import DOC_SEPARATOR


def _nbytes(docs):
    return sum(len(d.text.encode("utf-8")) for d in docs)


@pytest.fixture(scope="module")
def train():
    return load_corpus("train")


@pytest.fixture(scope="module")
def val():
    return load_corpus("val")


def _toy_docs():
    return [
        Document("a/1", "alpha", "aaaa bbbb " * 40),
        Document("a/2", "alpha", "cccc dddd " * 40),
        Document("b/1", "beta", "0123456789" * 30),
        Document("c/1", "gamma", "xyz" * 200),
    ]


# ----------------------------------------------------------------------------- corpus
def test_domains_and_sizes(train, val):
    names = domains()
    assert len(names) >= 3
    assert list(names) == sorted(names)
    total = _nbytes(train) + _nbytes(val)
    assert total >= 5_000_000
    for name in names:
        tr = [d for d in train if d.domain == name]
        va = [d for d in val if d.domain == name]
        assert tr and va, name
        assert _nbytes(va) >= 60_000, name
        assert _nbytes(va) < _nbytes(tr), name


def test_every_document_labelled(train, val):
    names = set(domains())
    for doc in train + val:
        assert isinstance(doc, Document)
        assert doc.domain in names
        assert doc.id and doc.text.strip()
    with pytest.raises(Exception):
        doc.text = "x"  # frozen


def test_split_is_fixed_and_disjoint(train, val):
    tr_ids = [d.id for d in train]
    va_ids = [d.id for d in val]
    assert len(set(tr_ids)) == len(tr_ids)
    assert len(set(va_ids)) == len(va_ids)
    assert not set(tr_ids) & set(va_ids)
    # cached and stable
    assert [d.id for d in load_corpus("train")] == tr_ids
    assert load_corpus("val")[0] is val[0]


def test_bad_split_names_allowed_values():
    with pytest.raises(ValueError, match="train.*val"):
        load_corpus("test")


def test_manifest_matches_content(train, val):
    m = manifest()
    assert tuple(sorted(m["domains"])) == domains()
    for name, info in m["domains"].items():
        assert info["source"] and info["package"] and info["version"]
        assert info["licence"]
        assert info["train_bytes"] == _nbytes([d for d in train if d.domain == name])
        assert info["val_bytes"] == _nbytes([d for d in val if d.domain == name])
        assert info["train_docs"] == sum(d.domain == name for d in train)
    blob = resources.files("divmoe.data").joinpath("corpus/corpus.jsonl.xz").read_bytes()
    assert hashlib.sha256(blob).hexdigest() == m["files"]["corpus.jsonl.xz"]["sha256"]
    assert len(blob) <= 3_000_000


#: uncompressed_sha256 of the four-domain corpus (commit 7218c2c) that earlier results used
FOUR_DOMAIN_SHA256 = "78d709c13811876a97f9a4f6be81a9074f72d8b7637269774a65e385118a8a6b"


def test_the_four_original_domains_are_byte_identical():
    import json
    import lzma

    blob = resources.files("divmoe.data").joinpath("corpus/corpus.jsonl.xz").read_bytes()
    lines = [ln for ln in lzma.decompress(blob).decode("utf-8").splitlines()
             if ln and json.loads(ln)["domain"] in ("docs", "english", "python", "spanish")]
    assert hashlib.sha256(("\n".join(lines) + "\n").encode()).hexdigest() == FOUR_DOMAIN_SHA256
    assert len(domains()) >= 8


def test_text_is_plain(train):
    spanish = [d for d in train if d.domain == "spanish"]
    assert spanish
    joined = "".join(d.text for d in spanish[:50])
    assert "<w " not in joined and "lemma=" not in joined and "</" not in joined
    assert "Jehová" in "".join(d.text for d in spanish)
    assert all("\r" not in d.text for d in train[:200])


# ----------------------------------------------------------------------------- tokenizer
def test_tokenizer_roundtrip():
    tok = ByteTokenizer()
    assert tok.vocab_size == 256
    for text in ["", "hello", "Génesis 1: EN el principio crió Dios", "def f(x):\n\treturn x  # ü€😀"]:
        ids = tok.encode(text)
        assert all(0 <= i < 256 for i in ids)
        assert len(ids) == len(text.encode("utf-8"))
        assert tok.decode(ids) == text
        assert tok.decode(torch.tensor(ids, dtype=torch.long)) == text
    assert tok.decode([0xFF, 0x41]) == "\ufffdA"


# ----------------------------------------------------------------------------- mixture weights
def test_mixture_weights_temperature():
    sizes = {"a": 100, "b": 300, "c": 600}
    w1 = mixture_weights(sizes)
    assert list(w1) == ["a", "b", "c"]
    assert math.isclose(sum(w1.values()), 1.0)
    assert w1 == pytest.approx({"a": 0.1, "b": 0.3, "c": 0.6})
    w_hot = mixture_weights(sizes, temperature=1e6)
    assert w_hot == pytest.approx({k: 1 / 3 for k in sizes}, abs=1e-5)
    w2 = mixture_weights(sizes, temperature=2.0)
    assert w1["a"] < w2["a"] < 1 / 3 and w2["c"] < w1["c"]
    w_cold = mixture_weights(sizes, temperature=0.01)
    assert w_cold["c"] > 0.999
    assert mixture_weights({"a": 0, "b": 5}) == {"a": 0.0, "b": 1.0}


def test_mixture_weights_explicit():
    sizes = {"a": 100, "b": 300, "c": 600}
    w = mixture_weights(sizes, weights={"a": 2, "b": 1, "c": 1})
    assert w == pytest.approx({"a": 0.5, "b": 0.25, "c": 0.25})
    w = mixture_weights(sizes, temperature=5.0, weights={"a": 1})  # explicit weights override
    assert w == {"a": 1.0, "b": 0.0, "c": 0.0}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"weights": {"zz": 1.0}}, "unknown domain"),
        ({"weights": {"a": -1.0, "b": 2.0}}, ">= 0"),
        ({"weights": {"a": 0.0, "b": 0.0}}, "sum to zero"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
    ],
)
def test_mixture_weights_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mixture_weights({"a": 1, "b": 2}, **kwargs)


def test_mixture_weights_bad_sizes():
    with pytest.raises(ValueError):
        mixture_weights({})
    with pytest.raises(ValueError):
        mixture_weights({"a": 0, "b": 0})


# ----------------------------------------------------------------------------- sampler
def test_sampler_shape_dtype_and_content():
    docs = _toy_docs()
    s = MixtureSampler(docs, seq_len=16, seed=3)
    assert s.domain_names == ("alpha", "beta", "gamma")
    tokens, dom = s.batch(step=0, batch_size=64)
    assert tokens.shape == (64, 17) and tokens.dtype == torch.int64
    assert dom.shape == (64,) and dom.dtype == torch.int64
    assert int(tokens.min()) >= 0 and int(tokens.max()) < 256
    assert int(dom.min()) >= 0 and int(dom.max()) < 3
    streams = {}
    for name in s.domain_names:
        texts = [d.text for d in sorted(docs, key=lambda d: d.id) if d.domain == name]
        streams[name] = DOC_SEPARATOR.join(texts).encode()
    for row, d in zip(tokens.tolist(), dom.tolist()):
        assert bytes(row) in streams[s.domain_names[d]]


def test_sampler_determinism_and_resume():
    docs = _toy_docs()
    a = MixtureSampler(docs, seq_len=16, seed=7)
    x0, d0 = a.batch(0, 32)
    x0b, d0b = a.batch(0, 32)
    assert torch.equal(x0, x0b) and torch.equal(d0, d0b)
    x1, _ = a.batch(1, 32)
    assert not torch.equal(x0, x1)
    # a fresh sampler (as after a restart), built from docs in another order,
    # jumping straight to step 5, sees the same batch as one that ran steps 0..5
    for step in range(5):
        a.batch(step, 32)
    xa, da = a.batch(5, 32)
    b = MixtureSampler(list(reversed(docs)), seq_len=16, seed=7)
    xb, db = b.batch(5, 32)
    assert torch.equal(xa, xb) and torch.equal(da, db)
    # the seed matters
    c = MixtureSampler(docs, seq_len=16, seed=8)
    assert not torch.equal(c.batch(5, 32)[0], xa)
    # sampling does not touch the global RNG
    torch.manual_seed(0)
    r1 = torch.rand(3)
    torch.manual_seed(0)
    a.batch(9, 8)
    assert torch.equal(torch.rand(3), r1)


def test_sampler_respects_weights():
    docs = _toy_docs()
    s = MixtureSampler(docs, seq_len=8, seed=0, weights={"alpha": 3, "beta": 1})
    assert s.weights == pytest.approx({"alpha": 0.75, "beta": 0.25, "gamma": 0.0})
    _, dom = s.batch(0, 4000)
    counts = torch.bincount(dom, minlength=3).tolist()
    assert counts[2] == 0
    assert abs(counts[0] / 4000 - 0.75) < 0.04
    with pytest.raises(ValueError, match="unknown domain"):
        MixtureSampler(docs, seq_len=8, seed=0, weights={"delta": 1})
    with pytest.raises(ValueError):
        MixtureSampler(docs, seq_len=10_000, seed=0)


def test_sampler_on_real_corpus(train):
    s = MixtureSampler(train, seq_len=128, seed=0, temperature=2.0)
    assert s.domain_names == domains()
    tokens, dom = s.batch(123, 16)
    assert tokens.shape == (16, 129)
    again, dom2 = MixtureSampler(train, seq_len=128, seed=0, temperature=2.0).batch(123, 16)
    assert torch.equal(tokens, again) and torch.equal(dom, dom2)


# ----------------------------------------------------------------------------- validation windows
def test_validation_set_toy():
    docs = _toy_docs()
    v = validation_set(docs, seq_len=16, max_bytes_per_domain=100)
    assert list(v) == ["alpha", "beta", "gamma"]
    for name, w in v.items():
        assert w.dtype == torch.int64 and w.shape == ((100 - 1) // 16, 17)
        assert torch.equal(w[:-1, -1], w[1:, 0])  # stride seq_len: targets never overlap
    stream = DOC_SEPARATOR.join(d.text for d in docs if d.domain == "alpha").encode()
    flat = torch.cat([v["alpha"][0], v["alpha"][1:, 1:].reshape(-1)])
    assert bytes(flat.tolist()) == stream[: flat.numel()]
    assert torch.equal(validation_set(docs, 16, 100)["beta"], v["beta"])
    with pytest.raises(ValueError):
        validation_set(docs, seq_len=16, max_bytes_per_domain=10)


def test_validation_set_real(val):
    v = validation_set(val, seq_len=256, max_bytes_per_domain=32_768)
    assert tuple(v) == domains()
    for w in v.values():
        assert w.shape == ((32_768 - 1) // 256, 257)
        assert w.dtype == torch.int64


# ----------------------------------------------------------------------------- entropy
def test_unigram_entropy(train):
    h = unigram_entropy_bits(train)
    assert "all" in h and set(h) == set(domains()) | {"all"}
    for name, bits in h.items():
        assert 0.0 < bits < 8.0, (name, bits)
    assert h["all"] >= min(v for k, v in h.items() if k != "all")
    toy = unigram_entropy_bits([Document("1", "x", "abab"), Document("2", "y", "aaaa")])
    assert toy["x"] == pytest.approx(1.0)
    assert toy["y"] == pytest.approx(0.0)
    assert toy["all"] == pytest.approx(-(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25)))
