"""Tests for divmoe.report: HTML run report from a synthetic run folder."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest
import yaml

from divmoe.report import write_report
from divmoe.report import plots
from divmoe.report.html import read_metrics

DOMAINS = ["code", "prose", "<b>bold</b>"]  # the last one must come out escaped
N_LAYERS, N_EXPERTS, N_ROWS = 2, 4, 5


def _moe_rows(n_rows=N_ROWS, n_layers=N_LAYERS, n_experts=N_EXPERTS, domains=DOMAINS):
    rows = []
    for t in range(n_rows):
        step = 100 * (t + 1)
        load = []
        for layer in range(n_layers):
            raw = [1.0 + (e == layer) * (n_rows - t) * 0.5 for e in range(n_experts)]
            tot = sum(raw)
            load.append([x / tot for x in raw])
        rows.append({
            "step": step,
            "train_loss": 5.0 - 0.5 * t,
            "val_loss": 5.1 - 0.45 * t,
            "val_bpb": 3.0 - 0.25 * t,
            "val_bpb_by_domain": {d: 3.0 - 0.25 * t + 0.1 * i for i, d in enumerate(domains)},
            "max_vio": 0.8 / (t + 1),
            "max_vio_by_layer": [0.8 / (t + 1) * (1 + 0.1 * li) for li in range(n_layers)],
            "tokens_per_s": 12345.6,
            "elapsed_s": 10.0 * (t + 1),
            "lr": 3e-4,
            "expert_load": load,
        })
    return rows


def _write_metrics(run: Path, rows) -> None:
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _make_run(tmp_path: Path, kind: str) -> Path:
    """kind: 'moe' (all files), 'dense' (no expert_load/routing), 'bare' (metrics only)."""
    run = tmp_path / kind
    run.mkdir()
    rows = _moe_rows()
    if kind == "dense":
        for r in rows:
            del r["expert_load"], r["max_vio_by_layer"]
            r["max_vio"] = None
    _write_metrics(run, rows)
    if kind == "bare":
        return run
    cfg = {"model": {"kind": kind, "d_model": 128, "n_layers": 4,
                     "moe": {"n_experts": N_EXPERTS, "top_k": 2}},
           "train": {"steps": 500, "lr": 3e-4}, "note": "a <script>alert(1)</script> note"}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    unigram = {d: 4.5 + 0.1 * i for i, d in enumerate(DOMAINS)}
    unigram["all"] = 4.6
    (run / "summary.json").write_text(json.dumps({
        "model": kind, "unigram_bpb": unigram, "wall_time_s": 3725.0, "steps": 500,
        "params_total": 12_345_678, "params_active": 4_567_890, "final": rows[-1],
    }))
    if kind == "moe":
        counts = [[[(10 * (e + 1) if e == d else 5) + layer for d in range(len(DOMAINS))]
                   for e in range(N_EXPERTS)] for layer in range(N_LAYERS)]
        (run / "routing.json").write_text(json.dumps(
            {"domains": DOMAINS, "layers": [1, 3], "counts": counts}))
    return run


def _imgs(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in
            re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def test_moe_report(tmp_path):
    run = _make_run(tmp_path, "moe")
    out = write_report(run)
    assert out == run / "report.html" and out.is_file()
    page = out.read_text(encoding="utf-8")
    imgs = _imgs(page)
    assert len(imgs) == 5  # loss, bpb, expert load, routing, MaxVio
    assert all(b.startswith(b"\x89PNG\r\n\x1a\n") for b in imgs)
    # summary numbers: final bpb overall/per domain, unigram, losses, MaxVio, tokens/s, params
    for s in ["2.0000", "2.1000", "4.6000", "4.5000", "3.0000", "3.3000", "0.160",
              "12,346", "500", "12,345,678", "4,567,890", "1h 02m 05s"]:
        assert s in page, s
    for d in ["code", "prose"]:
        assert d in page
    assert "&lt;b&gt;bold&lt;/b&gt;" in page and "<b>bold</b>" not in page
    assert "<script>" not in page and "&lt;script&gt;" in page  # config is escaped too
    assert "<details>" in page and "d_model" in page
    # self-contained: no external resources
    assert not re.search(r'(src|href)="(https?:)?//', page)
    assert "Incomplete run folder" not in page
    # atomic write leaves no temp files behind
    assert sorted(p.name for p in run.iterdir()) == [
        "config.yaml", "metrics.jsonl", "report.html", "routing.json", "summary.json"]


def test_dense_report(tmp_path):
    run = _make_run(tmp_path, "dense")
    page = write_report(run).read_text(encoding="utf-8")
    assert len(_imgs(page)) == 2  # loss + bpb only
    assert "routing.json" not in page  # not expected for a dense model
    assert "Dense model" in page and "2.0000" in page and "&lt;b&gt;bold&lt;/b&gt;" in page


def test_metrics_only_report(tmp_path):
    run = _make_run(tmp_path, "bare")
    page = write_report(str(run)).read_text(encoding="utf-8")
    assert len(_imgs(page)) == 4  # loss, bpb, expert load, MaxVio; no routing.json
    for missing in ["summary.json is missing", "config.yaml is missing",
                    "routing.json is missing"]:
        assert missing in page
    assert "2.0000" in page and "elapsed at last eval" in page


def test_empty_metrics_and_bad_optional_files(tmp_path):
    run = tmp_path / "empty"
    run.mkdir()
    (run / "metrics.jsonl").write_text("\n")
    (run / "summary.json").write_text("{not json")
    page = write_report(run).read_text(encoding="utf-8")
    assert "no evaluation rows" in page and "summary.json could not be read" in page


def test_missing_run_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="run directory"):
        write_report(tmp_path / "nope")


def test_missing_metrics(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        write_report(tmp_path)
    assert not (tmp_path / "report.html").exists()


def test_malformed_metrics_line(tmp_path):
    run = tmp_path / "bad"
    run.mkdir()
    good = json.dumps(_moe_rows(1)[0])
    (run / "metrics.jsonl").write_text(f"{good}\n\n{good}\n{{\"step\": 3, \n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl:4"):
        write_report(run)
    (run / "metrics.jsonl").write_text(f"{good}\n[1, 2]\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: expected a JSON object"):
        read_metrics(run / "metrics.jsonl")
    assert not (run / "report.html").exists()


def test_routing_fractions_columns_sum_to_one():
    frac = plots.routing_fractions([[1, 0, 0], [3, 2, 0]])
    assert frac[:, 0].tolist() == [0.25, 0.75]
    assert frac[:, 1].tolist() == [0.0, 1.0]
    assert all(x != x for x in frac[:, 2])  # empty domain -> NaN, not a crash


def test_awkward_domain_names_plot():
    rows = _moe_rows(2, domains=["$x_1$ {oops", "_hidden", "a$b"])
    fig = plots.plot_bpb(rows, {"_hidden": 4.0})
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any("hidden" in t for t in labels)
    fig.canvas.draw()  # mathtext would raise on the unbalanced '$'/'{'
    plots.plt.close(fig)


def test_plots_return_none_without_data():
    dense = [{"step": 1, "train_loss": 1.0, "val_loss": 1.0, "val_bpb": 1.0, "max_vio": None}]
    assert plots.plot_expert_load(dense) is None
    assert plots.plot_max_vio(dense) is None
    assert plots.plot_losses([{"step": 1}]) is None
