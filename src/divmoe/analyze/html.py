"""Render analysis.json into one self-contained analysis.html (inline CSS, base64 PNGs), with
the same look and helpers as the run report."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any

from ..report import plots as report_plots
from ..report.html import _atomic_write, _e, _f, _figure, _kv_table, _try_plot, html_page
from . import plots


def _cell(x: Any, digits: int = 3) -> str:
    return f"<td class='n'>{_e(_f(x, digits))}</td>"


def _layer_table(result: dict) -> str:
    K = result["model"]["top_k"]
    ref = result["summary"].get("srp_segment_len")
    sref = result["summary"].get("sch_segment_len")
    head = ("<tr><th>layer</th><th>MaxVio</th><th>CV</th><th>entropy / log E</th>"
            "<th>dropped</th><th>rerouted</th><th>activated params</th>"
            "<th>I(expert; domain) bits</th><th>NMI</th>"
            f"<th>SRP m={ref}</th><th>SCH c=k, m={sref}</th><th>SCH c=2k</th>"
            "<th>mean CKA</th><th>Vendi</th></tr>")
    rows = []
    for lay in result["layers"]:
        sch_k = sch_2k = None
        if sref is not None:
            vals = lay["sch"]["values"][lay["sch"]["segment_lens"].index(sref)]
            sch_k, sch_2k = vals[K - 1], vals[min(2 * K, len(vals)) - 1]
        srp = lay["srp"]["values"][lay["srp"]["segment_lens"].index(ref)] \
            if ref in lay["srp"]["segment_lens"] else None
        r = lay["routing"]
        rows.append(
            f"<tr><td>{_e(lay['name'])}</td>{_cell(lay['load']['max_vio'])}"
            f"{_cell(lay['load']['cv'])}{_cell(lay['load']['entropy_normalized'])}"
            f"<td class='n'>{r['dropped_slots']}</td><td class='n'>{r['rerouted_slots']}</td>"
            f"<td class='n'>{r['activated_params_mean']:,.0f}</td>"
            f"{_cell(lay['specialization']['mi_bits'])}{_cell(lay['specialization']['nmi'])}"
            f"{_cell(srp)}{_cell(sch_k)}{_cell(sch_2k)}"
            f"{_cell(lay['redundancy'].get('mean_cka'))}{_cell(lay.get('vendi'))}</tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _merge_table(result: dict) -> str:
    rows = []
    for lay in result["layers"]:
        for c in lay["redundancy"].get("merge_candidates", [])[:3]:
            rows.append(f"<tr><td>{_e(lay['name'])}</td><td>{c['i']} + {c['j']}</td>"
                        f"{_cell(c['cka'])}{_cell(c['cosine'])}</tr>")
    if not rows:
        return "<p class='meta'>No redundancy data.</p>"
    return ("<table><tr><th>layer</th><th>experts</th><th>CKA</th><th>mean cosine</th></tr>"
            + "".join(rows) + "</table>")


def _js_table(result: dict) -> str:
    domains = result["data"]["domains"]
    head = "<tr><th>layer</th>" + "".join(f"<th>{_e(d)}</th>" for d in domains) + "</tr>"
    rows = "".join(
        f"<tr><td>{_e(l['name'])}</td>"
        + "".join(_cell(l["specialization"]["js_bits"].get(d)) for d in domains) + "</tr>"
        for l in result["layers"])
    return f"<table>{head}{rows}</table>"


def write_analysis_html(result: dict, path: str | Path) -> Path:
    path = Path(path)
    layers, model, src, s = result["layers"], result["model"], result["source"], result["summary"]
    E, K = model["num_experts"], model["top_k"]
    problems: list[str] = list(src.get("notes") or [])
    routing = {"domains": result["data"]["domains"], "layers": model["layers"],
               "counts": [l["counts_by_domain"] for l in layers]}
    figs = [
        _figure("Expert load", _try_plot("load", problems, plots.plot_layer_load, layers),
                "Share of routed token-slots per expert on the validation text; the red line is "
                "the uniform share 1/E."),
        _figure("Routing by domain", _try_plot("routing", problems, report_plots.plot_routing,
                                               routing),
                "Each domain column sums to 1. Mutual information I(expert; domain) (table) is "
                "0 when all columns are alike and H(domain) when every expert serves one domain."),
        _figure("Local routing consistency: SRP", _try_plot("SRP", problems, plots.plot_srp,
                                                            layers, K),
                "SRP (Liang et al. 2025): best micro-F1 of one fixed expert set per sliding "
                "segment of m tokens; right: share of slots the best k / 2k experts of each "
                "segment cover. Higher = neighbouring tokens share experts (offloading-friendly)."),
        _figure("Local routing consistency: SCH", _try_plot("SCH", problems, plots.plot_sch,
                                                            layers, K),
                "SCH: hit rate of a cache of c experts that holds the experts most used in the "
                "next m tokens. The paper finds most models reach most of the attainable hit "
                "rate near c = 2k (table: 'gain at 2k')."),
        _figure("Expert redundancy (CKA)", _try_plot("CKA", problems, plots.plot_cka, layers),
                "Linear CKA between the outputs of every pair of experts on the same probe "
                "tokens; 1 = interchangeable up to rotation and scale (merge candidates)."),
        _figure("Expert-output diversity (Vendi)", _try_plot("Vendi", problems,
                                                             plots.plot_vendi, layers, E),
                "Vendi score of the experts' centred outputs: the effective number of distinct "
                "experts, from 1 (all alike) to E."),
    ]
    gains = ""
    if s.get("sch_segment_len") is not None:
        gains = (f"<p class='meta'>SCH at look-ahead m={s['sch_segment_len']}: cache of k={K} "
                 f"experts hits {_f(s.get('sch_at_k'), 3)}, of 2k={2 * K} hits "
                 f"{_f(s.get('sch_at_2k'), 3)}: 2k reaches {_f(s.get('sch_gain_at_2k'), 3)} of "
                 f"the gain from k to all E={E} experts (mean over layers).</p>")
    pairs = [("source", f"{src['kind']} — {src['path']}"), ("tokenizer", src["tokenizer"]),
             ("MoE layers", str(len(layers))), ("experts E / active k", f"{E} / {K}"),
             ("tokens analysed", f"{sum(result['data']['tokens_by_domain'].values()):,}"),
             ("max bytes per domain", f"{result['data']['max_bytes_per_domain']:,}"),
             ("mean MaxVio", _f(s.get("max_vio"), 3)),
             ("mean I(expert; domain)", f"{_f(s.get('mi_bits'), 3)} bits (NMI {_f(s.get('nmi'), 3)})"),
             (f"mean SRP (m={s.get('srp_segment_len')})", _f(s.get("srp"), 3)),
             ("mean expert CKA", _f(s.get("mean_cka"), 3)),
             ("mean Vendi of expert outputs", _f(s.get("vendi"), 3))]
    if "hf_check" in result:
        diff = result["hf_check"]["max_abs_diff_divmoe_vs_hf_block"]
        pairs.append(("max |divmoe − HF block| output",
                      "not compared" if diff is None else f"{diff:.2e}"))
    warn = ""
    if problems:
        warn = ("<div class='warn'><b>Notes:</b><ul>"
                + "".join(f"<li>{_e(p)}</li>" for p in problems) + "</ul></div>")
    now = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    title = f"divmoe analysis: {Path(src['path']).name}"
    corpus = result["data"].get("corpus", "embedded")
    which = "the embedded" if corpus == "embedded" else f"the user corpus {_e(corpus)}:"
    meta = f"""Generated {_e(now)} by <code>divmoe analyze</code> on {which} validation
split ({_e(', '.join(result['data']['domains']))})."""
    page = html_page(title, meta, f"""{warn}
<h2>Summary</h2>
{_kv_table(pairs)}
<h2>Per layer</h2>
{_layer_table(result)}
{gains}
<h3>JS divergence of each domain's expert distribution from the overall one (bits)</h3>
{_js_table(result)}
<h3>Top merge candidates (by CKA)</h3>
{_merge_table(result)}
<h2>Plots</h2>
{''.join(figs)}""")
    _atomic_write(path, page)
    return path
