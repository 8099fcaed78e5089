"""data.tokenizer=bpe end to end: the BPE itself (exact round trip, byte lengths, determinism,
refusals), exact bits per byte, and a tiny BPE run through train, resume, evaluate, generate,
analyze and surgery. The runs use a small corpus cut from the embedded one (a BPE learned on
all of it takes seconds) and a vocabulary of 320."""

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from divmoe.analyze.source import load_source
from divmoe.cli import main
from divmoe.config import ConfigError
from divmoe.data.corpus import load_corpus
from divmoe.data.mixture import DOC_SEPARATOR, validation_set
from divmoe.data.tokenizer import TOKENIZER_FILE, BPETokenizer, ByteTokenizer
from divmoe.data.user_corpus import load_splits
from divmoe.inference import generate, load_run, score_validation
from divmoe.models import MoETransformer
from divmoe.surgery.calibrate import run_calibration_batches
from divmoe.train import load_config, train
from divmoe.train.loop import evaluate
from test_train import TINY, read_metrics, strip_timing

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 320
DOMAINS = ("english", "python", "spanish")
LN2 = math.log(2.0)


@pytest.fixture(scope="module")
def texts():
    """A few documents (their first 1500 characters) of three embedded domains, Spanish
    accents included."""
    by_domain = {d: [doc for doc in load_corpus("train") if doc.domain == d][:5] for d in DOMAINS}
    return {d: [doc.text[:1500] for doc in docs] for d, docs in by_domain.items()}


@pytest.fixture(scope="module")
def tok(texts):
    return BPETokenizer.train([t for d in DOMAINS for t in texts[d]], VOCAB)


@pytest.fixture(scope="module")
def corpus(texts, tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "small.jsonl"
    path.write_text("".join(json.dumps({"domain": d, "id": str(i), "text": t}) + "\n"
                            for d in DOMAINS for i, t in enumerate(texts[d])))
    return path


def bpe_config(corpus, extra=()):
    return load_config(None, TINY + [f"data.corpus={corpus}", "data.val_fraction=0.3",
                                     "data.tokenizer=bpe", f"data.bpe_vocab={VOCAB}",
                                     "train.steps=6", "train.eval_every=3",
                                     "data.val_bytes_per_domain=600"] + list(extra))


@pytest.fixture(scope="module")
def bpe_run(corpus, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bpe") / "full"
    result = train(folder, bpe_config(corpus), progress=False, report=False)
    return folder, result


# ------------------------------------------------------------------ the tokenizer
def test_round_trip_is_exact_and_token_bytes_count_the_text(texts, tok):
    spanish = DOC_SEPARATOR.join(texts["spanish"])
    assert DOC_SEPARATOR == "\n\n" and any(c in spanish for c in "áéíóúñ")
    for text in [spanish, DOC_SEPARATOR.join(texts["python"]), "año\n\nniño €😀 x"]:
        ids = tok.encode_tensor(text)
        assert tok.decode(ids) == text
        assert tok.bytes_of(ids) == text.encode("utf-8")
        assert int(tok.token_bytes[ids].sum()) == len(text.encode("utf-8"))
    ids = tok.encode_tensor(spanish)
    assert len(ids) < 0.9 * len(spanish.encode())  # the merges do shorten the text
    assert tok.vocab_size == VOCAB and int(tok.token_bytes.max()) > 1
    assert ids.max() >= 256  # ids beyond the bytes are used


def test_training_twice_gives_the_identical_file(texts, tok, tmp_path):
    again = BPETokenizer.train([t for d in DOMAINS for t in texts[d]], VOCAB)
    tok.save(tmp_path / "a.json")
    again.save(tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    loaded = BPETokenizer.load(tmp_path / "a.json")
    assert loaded.fingerprint == tok.fingerprint
    assert torch.equal(loaded.token_bytes, tok.token_bytes)


@pytest.mark.parametrize("size", [256, 0, 300.5])
def test_bad_vocab_sizes_are_refused(size):
    with pytest.raises(ValueError, match=r"BPE vocab_size must be an integer > 256.*got"):
        BPETokenizer.train(["some text some text"], size)


def test_bad_settings_and_files_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="bpe_vocab"):
        load_config(None, ["data.bpe_vocab=100"])
    with pytest.raises(ConfigError, match="tokenizer"):
        load_config(None, ["data.tokenizer=wordpiece"])
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a tokenizer file"):
        BPETokenizer.load(tmp_path / "bad.json")


# ------------------------------------------------------------------ exact bits per byte
def hand_bpb(model, windows, tokenizer):
    """Σ cross-entropy nats of the targets / ln 2 / Σ UTF-8 bytes the targets decode to."""
    nats, nbytes = 0.0, 0
    with torch.no_grad():
        for w in windows:
            logits = model(w[None, :-1]).logits[0].double()
            nats += float(F.cross_entropy(logits, w[1:], reduction="sum"))
            nbytes += len(tokenizer.bytes_of(w[1:]))
    return nats / LN2 / nbytes


def tiny_model(vocab):
    cfg = load_config(None, TINY + [f"model.vocab_size={vocab}"])
    torch.manual_seed(0)
    return MoETransformer(cfg.model, cfg.moe).eval()


def test_val_bpb_is_exact_bits_per_byte_with_bpe(corpus, tok):
    _, val_docs = load_splits(corpus, 32, 0.3)
    val = validation_set(val_docs, 32, 600, tok)
    stream = DOC_SEPARATOR.join(d.text for d in val_docs if d.domain == "spanish").encode()
    targets = tok.bytes_of(val["spanish"][:, 1:].reshape(-1))
    assert targets in stream  # the targets are the text itself, each byte once
    model = tiny_model(tok.vocab_size)
    row = evaluate(model, val, 4, probe_tokens_per_domain=0, token_bytes=tok.token_bytes).row
    for d in DOMAINS:
        assert row["val_bpb_by_domain"][d] == pytest.approx(hand_bpb(model, val[d], tok),
                                                            rel=1e-5)
    everything = torch.cat([val[d] for d in sorted(val)])
    assert row["val_bpb"] == pytest.approx(hand_bpb(model, everything, tok), rel=1e-5)
    assert row["val_bpb"] < row["val_loss"] / LN2  # a token stands for more than one byte
    scored = score_validation(model, val, 4, token_bytes=tok.token_bytes)
    assert scored["bpb"] == pytest.approx(row["val_bpb"], rel=1e-5)


def test_val_bpb_with_bytes_is_nats_per_token(corpus):
    _, val_docs = load_splits(corpus, 32, 0.3)
    val = validation_set(val_docs, 32, 600, ByteTokenizer())
    model = tiny_model(256)
    row = evaluate(model, val, 4, probe_tokens_per_domain=0,
                   token_bytes=ByteTokenizer().token_bytes).row
    assert row["val_bpb"] == pytest.approx(row["val_loss"] / LN2, rel=1e-12)
    assert row == evaluate(model, val, 4, probe_tokens_per_domain=0).row
    assert row["val_bpb"] == pytest.approx(hand_bpb(model, torch.cat(list(val.values())),
                                                    ByteTokenizer()), rel=1e-5)


# ------------------------------------------------------------------ a BPE run
def forbid_learning_a_bpe(monkeypatch):
    """A run that has its tokenizer.json must read it: learning merges again fails the test."""
    def learn(*args, **kwargs):
        raise AssertionError("a run with a tokenizer.json must read it, not learn a BPE again")
    monkeypatch.setattr(BPETokenizer, "train", learn)


def test_bpe_run_saves_its_tokenizer_and_sizes_the_model_by_it(bpe_run):
    folder, result = bpe_run
    saved = BPETokenizer.load(folder / TOKENIZER_FILE)
    assert load_config(folder / "config.yaml").model.vocab_size == saved.vocab_size == VOCAB
    assert [r["step"] for r in result.metrics] == [0, 3, 6]
    assert result.metrics[-1]["val_bpb"] < result.metrics[0]["val_bpb"]
    batch = run_calibration_batches(load_run(folder).config, saved, 4)[0]
    assert batch.shape == (4, 32) and int(batch.max()) >= 256  # BPE ids, not bytes


def test_resume_reads_the_saved_tokenizer_and_ends_equal(bpe_run, corpus, tmp_path,
                                                         monkeypatch):
    full_dir, full = bpe_run
    part = train(tmp_path / "part", bpe_config(corpus), progress=False, report=False,
                 stop_after=4)
    assert part.interrupted and [r["step"] for r in part.metrics] == [0, 3]
    saved = (tmp_path / "part" / TOKENIZER_FILE).read_bytes()
    forbid_learning_a_bpe(monkeypatch)
    resumed = train(tmp_path / "part", None, resume=True, progress=False, report=False)
    assert (tmp_path / "part" / TOKENIZER_FILE).read_bytes() == saved
    assert saved == (full_dir / TOKENIZER_FILE).read_bytes()
    assert strip_timing(read_metrics(tmp_path / "part")) == strip_timing(full.metrics)
    assert strip_timing(resumed.metrics) == strip_timing(full.metrics)


def test_cli_evaluate_reproduces_the_runs_val_bpb(bpe_run, tmp_path, capsys):
    folder, result = bpe_run
    assert main(["evaluate", str(folder), "--json", str(tmp_path / "e.json")]) == 0
    assert "next-token accuracy" in capsys.readouterr().out
    row = json.loads((tmp_path / "e.json").read_text())
    final = result.metrics[-1]
    assert row["bpb_by_domain"].keys() == final["val_bpb_by_domain"].keys()
    for d, v in final["val_bpb_by_domain"].items():
        assert row["bpb_by_domain"][d] == pytest.approx(v, rel=1e-5)
    assert row["bpb"] == pytest.approx(final["val_bpb"], rel=1e-5)
    assert row["bytes"] > row["tokens"]
    # The other decoding methods work on BPE ids as they do on bytes.
    assert main(["evaluate", str(folder), "--roe", "2,0.5", "--max-bytes", "300"]) == 0
    assert main(["evaluate", str(folder), "--scmoe", "0.5,0.1,2", "--max-bytes", "300"]) == 0
    assert main(["generate", str(folder), "--prompt", "El ", "--max-new", "3",
                 "--scmoe", "0.5,0.1,2"]) == 0
    assert "3 tokens in" in capsys.readouterr().err


def test_cli_generate_counts_and_streams_tokens(bpe_run, texts, capsys):
    folder, _ = bpe_run
    run = load_run(folder)
    tok = run.tokenizer
    # A prompt of more bytes than the context holds but fewer tokens is accepted.
    prompt = next(t[:n] for t in texts["spanish"] for n in range(len(t), 0, -1)
                  if len(tok.encode(t[:n])) <= 28)
    assert len(prompt.encode()) > 32
    assert main(["generate", str(folder), "--prompt", prompt, "--max-new", "4",
                 "--temperature", "0"]) == 0
    cap = capsys.readouterr()
    assert "4 tokens in" in cap.err
    ids = tok.encode_tensor(prompt).long()[None]
    want = generate(run.model, ids, 4, temperature=0).new_tokens[0]
    assert cap.out == prompt + tok.bytes_of(want).decode("utf-8", errors="replace") + "\n"
    long = texts["english"][0][:400]
    assert main(["generate", str(folder), "--prompt", long]) == 2
    err = capsys.readouterr().err
    assert f"--prompt is {len(tok.encode(long))} tokens, longer than" in err


def test_a_bpe_run_without_its_tokenizer_is_refused(bpe_run, tmp_path, capsys):
    folder, _ = bpe_run
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    (copy / TOKENIZER_FILE).unlink()
    assert main(["evaluate", str(copy)]) == 2
    assert f"has no {TOKENIZER_FILE}" in capsys.readouterr().err
    assert main(["analyze", str(copy), "--out", str(tmp_path / "an"), "--quiet"]) == 2
    assert f"has no {TOKENIZER_FILE}" in capsys.readouterr().err


def test_analyze_encodes_with_the_runs_bpe(bpe_run, tmp_path):
    folder, _ = bpe_run
    src = load_source(folder)
    text = "El niño comió\n\n"
    assert src.tokenizer == "bpe"
    assert torch.equal(src.encode(text.encode()), load_run(folder).tokenizer.encode_tensor(text))
    assert main(["analyze", str(folder), "--out", str(tmp_path / "an"), "--quiet",
                 "--max-bytes", "512"]) == 0
    assert json.loads((tmp_path / "an" / "analysis.json").read_text())["source"]["tokenizer"] \
        == "bpe"


def test_surgery_keeps_the_tokenizer_and_the_new_runs_evaluate(bpe_run, tmp_path, capsys,
                                                               monkeypatch):
    folder, _ = bpe_run
    source = (folder / TOKENIZER_FILE).read_bytes()
    assert main(["merge", str(folder), "--experts-per-layer", "3", "--out",
                 str(tmp_path / "merged"), "--calibration-sequences", "4"]) == 0
    assert main(["prune", str(folder), "--keep", "2", "--out", str(tmp_path / "pruned"),
                 "--calibration-sequences", "4"]) == 0
    for name in ("merged", "pruned"):
        run = tmp_path / name
        assert (run / TOKENIZER_FILE).read_bytes() == source
        assert load_run(run).tokenizer.vocab_size == VOCAB
        capsys.readouterr()
        assert main(["evaluate", str(run)]) == 0
        assert capsys.readouterr().out.startswith("val_bpb ")
    # The new run trains on with the source's merges (never learned again).
    forbid_learning_a_bpe(monkeypatch)
    pruned = tmp_path / "pruned"
    assert main(["train", "--out", str(pruned), "--resume", "--quiet", "--config",
                 str(pruned / "config.yaml"), "--set", "train.steps=2"]) == 0
    assert [r["step"] for r in read_metrics(pruned)] == [0, 2]
    assert (pruned / TOKENIZER_FILE).read_bytes() == source
    assert main(["prune", str(folder), "--keep", "2", "--out", str(tmp_path / "x"),
                 "--set", "data.tokenizer=bytes"]) == 2
    assert "keeps the source's tokenizer" in capsys.readouterr().err


def test_upcycling_a_dense_bpe_run_keeps_its_tokenizer(corpus, tmp_path, capsys):
    dense = tmp_path / "dense"
    train(dense, bpe_config(corpus, ["model.moe=false", "train.steps=3"]), progress=False,
          report=False)
    assert main(["upcycle", str(dense), "--experts", "4", "--top-k", "2",
                 "--out", str(tmp_path / "up")]) == 0
    assert (tmp_path / "up" / TOKENIZER_FILE).read_bytes() == \
        (dense / TOKENIZER_FILE).read_bytes()
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "up")]) == 0
    assert capsys.readouterr().out.startswith("val_bpb ")
