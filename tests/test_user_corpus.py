"""The user's own corpus (data.corpus): three layouts, the split, every bad input, and
training / analyzing on it."""

import json

import pytest

from divmoe.cli import main
from divmoe.data import CorpusError, load_user_corpus
from divmoe.data.user_corpus import split_documents

SEQ = 32


def _write_folder(root):
    for dom, stem, n in (("code", "def f(x):\n    return x * {i}\n", 12), ("prose", "The day {i} was long.\n", 12)):
        d = root / dom / "sub"
        d.mkdir(parents=True)
        for i in range(n):
            (d / f"f{i:02d}.txt").write_text(stem.format(i=i) * 8)
    (root / "code" / ".hidden").write_text("never read")
    return root


def test_folder_layout_and_deterministic_split(tmp_path):
    root = _write_folder(tmp_path / "c")
    a = load_user_corpus(root, SEQ)
    b = load_user_corpus(root, SEQ)
    assert [d.id for d in a["train"]] == [d.id for d in b["train"]]
    assert {d.domain for d in a["train"]} == {d.domain for d in a["val"]} == {"code", "prose"}
    ids_tr, ids_va = {d.id for d in a["train"]}, {d.id for d in a["val"]}
    assert not ids_tr & ids_va and len(ids_tr | ids_va) == 24
    assert all(d.id.startswith(("code/sub/f", "prose/sub/f")) for d in a["train"] + a["val"])
    # the validation share of bytes is reached, with whole documents only
    for dom in ("code", "prose"):
        va = sum(len(d.text) for d in a["val"] if d.domain == dom)
        tot = va + sum(len(d.text) for d in a["train"] if d.domain == dom)
        assert 0.05 * tot <= va < 0.05 * tot + max(len(d.text) for d in a["val"])


def test_yaml_glob_layout_matches_folder_docs(tmp_path):
    _write_folder(tmp_path / "c")
    spec = tmp_path / "corpus.yaml"
    spec.write_text("code: c/code/**/*.txt\nprose: c/prose/sub/f0*.txt\n")
    out = load_user_corpus(spec, SEQ)
    docs = out["train"] + out["val"]
    assert sum(d.domain == "code" for d in docs) == 12
    assert sum(d.domain == "prose" for d in docs) == 10  # f00..f09 only
    assert all(d.id.startswith("code/c/code/sub/") for d in docs if d.domain == "code")


def test_jsonl_layout(tmp_path):
    path = tmp_path / "c.jsonl"
    recs = [{"text": f"alpha {i} " * 20, "domain": "a"} for i in range(10)]
    recs += [{"text": f"beta {i} " * 20, "domain": "b", "id": f"b{i}"} for i in range(10)]
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    out = load_user_corpus(path, SEQ)
    assert {d.domain for d in out["val"]} == {"a", "b"}
    assert any(d.id == "b/b3" for d in out["train"] + out["val"])
    assert any(d.id == "a/line0000001" for d in out["train"] + out["val"])


def test_split_of_one_domain_is_by_hash_not_by_order():
    from divmoe.data import Document

    docs = [Document(f"x/{i}", "x", "t" * 100) for i in range(40)]
    tr, va = split_documents(docs, 0.1)
    assert len(va) == 4 and len(tr) == 36
    assert [d.id for d in va] != ["x/0", "x/1", "x/2", "x/3"]
    assert split_documents(list(reversed(docs)), 0.1)[1] == va or \
        {d.id for d in split_documents(list(reversed(docs)), 0.1)[1]} == {d.id for d in va}


@pytest.mark.parametrize("case, match", [
    ("missing", "does not exist"),
    ("empty_domain", "domain 'b' is empty"),
    ("empty_jsonl_domain", "domain 'b' is empty"),
    ("undecodable", "is not UTF-8 text \\(byte 0xff at offset 3\\)"),
    ("too_small", "domain 'a' is too small for its validation share"),
    ("one_document", "domain 'a' is too small for its validation share"),
    ("bad_suffix", "allowed: a folder, a .yaml/.yml file"),
    ("no_subfolders", "has no subfolders"),
    ("bad_json", "c.jsonl:2 is not valid JSON"),
    ("missing_field", "c.jsonl:1 needs string fields 'text' and 'domain'"),
    ("glob_no_match", "the glob 'nothing/\\*.txt' matches no files"),
])
def test_bad_inputs_one_clear_error(tmp_path, case, match):
    big = "word " * 400
    if case == "missing":
        path = tmp_path / "nope"
    elif case in ("empty_domain", "undecodable", "too_small", "one_document", "no_subfolders"):
        path = tmp_path / "c"
        (path / "a").mkdir(parents=True)
        if case != "no_subfolders":
            for i in range(4):
                (path / "a" / f"{i}.txt").write_text("x" * 20 if case == "too_small" else big)
        if case == "one_document":
            for f in list((path / "a").iterdir())[1:]:
                f.unlink()
        if case == "empty_domain":
            (path / "b").mkdir()
            (path / "b" / "blank.txt").write_text("   \n")
        if case == "undecodable":
            (path / "a" / "bad.txt").write_bytes(b"abc\xff\xfe")
        if case == "no_subfolders":
            (path / "a").rmdir()
            (path / "file.txt").write_text(big)
    elif case == "bad_suffix":
        path = tmp_path / "c.csv"
        path.write_text("text,domain\n")
    elif case in ("bad_json", "missing_field", "empty_jsonl_domain"):
        path = tmp_path / "c.jsonl"
        first = {"text": big, "domain": "a"} if case != "missing_field" else {"text": big}
        second = "{not json" if case == "bad_json" else json.dumps({"text": "  ", "domain": "b"})
        path.write_text(json.dumps(first) + "\n" + second + "\n")
    elif case == "glob_no_match":
        path = tmp_path / "c.yaml"
        path.write_text("a: nothing/*.txt\n")
    with pytest.raises(CorpusError, match=match):
        load_user_corpus(path, SEQ)


def test_train_and_analyze_on_user_corpus(tmp_path, capsys):
    path = tmp_path / "c.jsonl"
    recs = [{"text": f"def f{i}(x):\n    return x + {i}\n" * 6, "domain": "code"} for i in range(12)]
    recs += [{"text": f"Once upon a time number {i}, it rained.\n" * 6, "domain": "tale"} for i in range(12)]
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    tiny = ["model.d_model=16", "model.n_layers=1", "model.n_heads=2", "model.seq_len=32",
            "moe.num_experts=4", "moe.top_k=2", "moe.expert_hidden=16", "train.steps=4",
            "train.batch_size=4", "train.eval_every=4", "train.warmup_steps=1",
            "data.val_bytes_per_domain=512", "train.threads=1", f"data.corpus={path}"]
    run = tmp_path / "run"
    args = ["train", "--out", str(run), "--quiet"] + [a for kv in tiny for a in ("--set", kv)]
    assert main(args) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert set(rows[-1]["val_bpb_by_domain"]) == {"code", "tale"}
    assert rows[-1]["mix_weights"].keys() == {"code", "tale"}
    # analyze defaults to the run's corpus; --data names it explicitly
    assert main(["analyze", str(run), "--out", str(tmp_path / "an"), "--quiet", "--data", str(path)]) == 0
    res = json.loads((tmp_path / "an" / "analysis.json").read_text())
    assert res["data"]["domains"] == ["code", "tale"] and res["data"]["corpus"] == str(path)
    # a missing corpus is one line from the CLI, not a traceback
    assert main(["train", "--out", str(tmp_path / "r2"), "--quiet", "--set",
                 f"data.corpus={tmp_path / 'missing'}"]) == 2
    assert "does not exist" in capsys.readouterr().err
