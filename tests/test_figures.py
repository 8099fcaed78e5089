"""Every plot of report.html, analysis.html and the compare report: its axes contain its data
(visibly) and its labels name the quantity. The figures are read as the pages embed them."""

import pytest

from divmoe.analyze import analyze
from divmoe.analyze.html import write_analysis_html
from divmoe.compare.runner import write_report_html
from divmoe.report import write_report
from divmoe.train import load_config, train

from figures import capture, check_labels
from test_report import _make_run, _moe_rows
from test_train import TINY


def test_report_figures(tmp_path, monkeypatch):
    figs = capture(monkeypatch)
    page = write_report(_make_run(tmp_path, "moe")).read_text()
    # the checks read the very figures the page embeds
    assert page.count("data:image/png;base64,") == len(figs) == 5
    loss, bpb, load, routing, vio = figs
    check_labels(loss, x="training step", y="loss (nats / token)")
    check_labels(bpb, x="training step", y="bits / byte")
    check_labels(load, x="training step", y="expert", colorbar="fraction of routed token-slots")
    check_labels(routing, y="expert", colorbar="fraction of the domain's token-slots")
    check_labels(vio, x="training step", y="MaxVio")


def test_report_figures_of_a_metrics_only_folder(tmp_path, monkeypatch):
    figs = capture(monkeypatch)
    write_report(_make_run(tmp_path, "bare"))
    assert len(figs) == 4


@pytest.fixture(scope="module")
def analysis(tmp_path_factory):
    """analysis.json of a tiny trained run with 8 experts (loads near 1/8: the bar-chart bug
    drew them on a 0–7 axis)."""
    tmp = tmp_path_factory.mktemp("fig")
    train(tmp / "run", load_config(None, TINY + ["moe.num_experts=8", "train.steps=4"]),
          progress=False)
    return analyze(tmp / "run", tmp / "analysis", max_bytes=512, progress=False)


def test_analysis_figures(analysis, tmp_path, monkeypatch):
    figs = capture(monkeypatch)
    write_analysis_html(analysis, tmp_path / "analysis.html")
    assert len(figs) == 6
    load, routing, srp, sch, cka, vendi = figs
    check_labels(load, x="expert", y="share of slots")
    check_labels(routing, y="expert", colorbar="fraction of the domain's token-slots")
    check_labels(srp, x="segment length m", y="SRP")
    check_labels(sch, x="cache size c", y="SCH (hit rate)")
    check_labels(cka, colorbar="linear CKA")
    check_labels(vendi, y="Vendi score")
    assert [ax.get_title() for ax in routing.axes[:2]] == ["layer 0", "layer 1"]
    # the load bars: experts on x, shares on a y axis scaled to them
    for ax in load.axes:
        if ax.get_visible():
            assert ax.get_xlim()[1] <= 8 and ax.get_ylim()[1] < 1


def test_vendi_bars_stay_visible_for_many_experts(analysis, tmp_path, monkeypatch):
    """With E=64 and a Vendi score of ~2, an axis to E would hide the bars."""
    from divmoe.analyze.plots import plot_vendi

    from figures import check_inside

    layers = [{**analysis["layers"][0], "vendi": 2.0}]
    fig = plot_vendi(layers, 64)
    fig.canvas.draw()
    check_inside(fig)
    check_labels(fig, y="Vendi score")


def test_compare_figures(tmp_path, monkeypatch):
    summaries = []
    for name, shift in (("a", 0.0), ("b", 0.1)):
        rows = _moe_rows()
        for r in rows:
            r["val_bpb"] += shift
            r["expert_vendi"] = 2.0 + shift
        summaries.append({"name": name, "val_bpb": rows[-1]["val_bpb"], "step": 500,
                          "val_bpb_by_domain": rows[-1]["val_bpb_by_domain"],
                          "max_vio": rows[-1]["max_vio"], "mi_bits": 0.1, "expert_vendi": 2.0,
                          "activated_params": 1000, "tokens_per_s": 10.0, "rows": rows})
    figs = capture(monkeypatch)
    write_report_html(tmp_path, summaries)
    assert len(figs) == 3
    for fig, y in zip(figs, ("validation bits per byte", "MaxVio", "expert-output Vendi")):
        check_labels(fig, x="step", y=y)
        assert len(fig.axes[0].get_legend().get_texts()) == 2



def test_report_mixture_weights_figure(tmp_path, monkeypatch):
    """data.mixing=dynamic runs log mix_weights per evaluation: a sixth figure."""
    from test_report import _write_metrics

    run = _make_run(tmp_path, "moe")
    rows = _moe_rows()
    for t, r in enumerate(rows):
        r["mix_weights"] = {"code": 0.5 - 0.05 * t, "prose": 0.5 + 0.05 * t}
    _write_metrics(run, rows)
    figs = capture(monkeypatch)
    write_report(run)
    assert len(figs) == 6
    mix = [f for f in figs if "mixture" in f.axes[0].get_title()]
    assert len(mix) == 1
    check_labels(mix[0], x="training step", y="sampling weight")
