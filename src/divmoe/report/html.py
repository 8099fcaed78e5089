"""Render a training run folder into one self-contained ``report.html``.

The report embeds every figure as a base64 PNG and uses only inline CSS, so the
file can be copied or mailed on its own.  Only ``metrics.jsonl`` is required;
``config.yaml``, ``routing.json`` and ``summary.json`` are shown when present
and listed as missing otherwise.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from ..files import atomic_write_text as _atomic_write
from . import plots

__all__ = ["write_report", "read_metrics"]

REPORT_NAME = "report.html"


# ----------------------------------------------------------------------------- loading
def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Parse ``metrics.jsonl``: one JSON object per non-blank line.

    Raises ``FileNotFoundError`` if the file is absent and ``ValueError`` naming
    the file and 1-based line number for a line that is not a JSON object.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metrics file not found: {path}")
    rows: list[dict[str, Any]] = []
    with path.open("r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: malformed JSON: {exc.msg}") from exc
            if not isinstance(obj, dict):
                raise ValueError(
                    f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}"
                )
            rows.append(obj)
    return rows


def _read_optional(path: Path, kind: str, problems: list[str], why: str = "") -> Any:
    """Load an optional json/yaml file; note (not raise) when absent or unreadable."""
    if not path.is_file():
        problems.append(f"{path.name} is missing{why}")
        return None
    try:
        text = path.read_text(encoding="utf-8")
        return json.loads(text) if kind == "json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        problems.append(f"{path.name} could not be read ({first})")
        return None


# ----------------------------------------------------------------------------- formatting
def _num(x: Any) -> float | None:
    if x is None or isinstance(x, bool):
        return None
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def _f(x: Any, digits: int = 4) -> str:
    v = _num(x)
    if v is None:
        return "—"
    if not math.isfinite(v):
        return str(v)
    return f"{v:.{digits}f}"


def _g(x: Any) -> str:
    v = _num(x)
    return "—" if v is None else f"{v:.3g}"


def _int(x: Any) -> str:
    v = _num(x)
    return "—" if v is None or not math.isfinite(v) else f"{int(round(v)):,}"


def _params(x: Any) -> str:
    v = _num(x)
    if v is None or not math.isfinite(v):
        return "—"
    for div, suf in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.2f}{suf} ({int(v):,})"
    return f"{int(v):,}"


def _duration(x: Any) -> str:
    v = _num(x)
    if v is None or not math.isfinite(v):
        return "—"
    s = int(round(v))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    human = f"{h}h {m:02d}m {sec:02d}s" if h else (f"{m}m {sec:02d}s" if m else f"{v:.1f}s")
    return f"{human} ({v:,.1f} s)"


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _fig_to_data_uri(fig) -> str:
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=110, facecolor="white")
    finally:
        plots.plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# ----------------------------------------------------------------------------- sections
_CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;max-width:1100px;
margin:24px auto;padding:0 16px;color:#222;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.25em;margin-top:1.6em;
border-bottom:1px solid #ddd;padding-bottom:.2em}
.meta{color:#666;font-size:.9em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}
th,td{border:1px solid #ccc;padding:4px 10px;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}
th{background:#f3f3f3}
.warn{background:#fff4e0;border:1px solid #f0c36d;padding:8px 12px;border-radius:4px}
.warn ul{margin:.2em 0 .2em 1.2em;padding:0}
figure{margin:1.2em 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{color:#444;font-size:.9em;margin-top:.3em}
details{margin:1em 0}summary{cursor:pointer;font-weight:600}
pre{background:#f7f7f7;border:1px solid #e3e3e3;padding:10px;overflow:auto;font-size:.85em}
.tables{display:flex;flex-wrap:wrap;gap:28px;align-items:flex-start}
"""


def html_page(title: str, meta_html: str, body_html: str) -> str:
    """A self-contained page in the shared style: title heading, a meta line, then the body
    (``meta_html`` and ``body_html`` are already-escaped HTML)."""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title><style>{_CSS}</style></head>
<body>
<h1>{_e(title)}</h1>
<p class="meta">{meta_html}</p>
{body_html}
</body></html>
"""


def _kv_table(pairs: list[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{_e(k)}</th><td class='n'>{_e(v)}</td></tr>" for k, v in pairs)
    return f"<table>{body}</table>"


def _bpb_table(final: Mapping[str, Any], unigram: Mapping[str, Any], domains: list[str]) -> str:
    by_dom = final.get("val_bpb_by_domain")
    by_dom = by_dom if isinstance(by_dom, Mapping) else {}
    head = ("<tr><th>domain</th><th>final val bits/byte</th>"
            "<th>unigram byte entropy</th><th>model ÷ unigram</th></tr>")

    def row(label: str, model: Any, uni: Any, bold: bool = False) -> str:
        m, u = _num(model), _num(uni)
        ratio = _f(m / u, 3) if m is not None and u not in (None, 0.0) else "—"
        lab = f"<b>{_e(label)}</b>" if bold else _e(label)
        return (f"<tr><td>{lab}</td><td class='n'>{_e(_f(model))}</td>"
                f"<td class='n'>{_e(_f(uni))}</td><td class='n'>{_e(ratio)}</td></tr>")

    rows = [row("all domains", final.get("val_bpb"), unigram.get("all"), bold=True)]
    rows += [row(d, by_dom.get(d), unigram.get(d)) for d in domains]
    return f"<table>{head}{''.join(rows)}</table>"


def _domains(rows: list[dict], summary: Mapping, routing: Mapping | None) -> list[str]:
    seen: dict[str, None] = {}
    if routing and isinstance(routing.get("domains"), list):
        for d in routing["domains"]:
            seen.setdefault(str(d), None)
    for r in rows:
        by = r.get("val_bpb_by_domain")
        if isinstance(by, Mapping):
            for d in by:
                seen.setdefault(str(d), None)
    uni = summary.get("unigram_bpb")
    if isinstance(uni, Mapping):
        for d in uni:
            if d != "all":
                seen.setdefault(str(d), None)
    return list(seen)


def _figure(title: str, fig, caption: str) -> str:
    if fig is None:
        return ""
    uri = _fig_to_data_uri(fig)
    return (f"<figure><img src=\"{uri}\" alt=\"{_e(title)}\">"
            f"<figcaption><b>{_e(title)}.</b> {_e(caption)}</figcaption></figure>")


def _try_plot(name: str, problems: list[str], fn, *args, **kwargs):
    """Build one figure; a malformed input becomes a note instead of a crash."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - a bad plot must not lose the whole report
        problems.append(f"could not draw {name}: {type(exc).__name__}: {exc}")
        return None


# ----------------------------------------------------------------------------- main entry
def write_report(run_dir: str | Path) -> Path:
    """Write ``run_dir/report.html`` and return its path.

    Raises ``FileNotFoundError`` if ``run_dir`` or ``run_dir/metrics.jsonl`` does
    not exist, ``ValueError`` (with file and line number) for a malformed metrics
    line.  Missing or unreadable optional files are reported inside the page.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    metrics_path = run_dir / "metrics.jsonl"
    if not metrics_path.is_file():
        raise FileNotFoundError(
            f"{metrics_path} not found: is {run_dir} a divmoe training run (divmoe train --out)?"
        )
    rows = read_metrics(metrics_path)

    problems: list[str] = []
    summary = _read_optional(
        run_dir / "summary.json", "json", problems,
        why=": the run may have been interrupted; final numbers come from the last metrics "
            "row, and unigram entropies and parameter counts are unknown")
    config = _read_optional(run_dir / "config.yaml", "yaml", problems)
    summary_ok = isinstance(summary, Mapping)
    summary_d: Mapping[str, Any] = summary if summary_ok else {}
    if summary is not None and not summary_ok:
        problems.append("summary.json is not a JSON object")

    final: Mapping[str, Any] = rows[-1] if rows else (summary_d.get("final") or {})
    is_moe = (summary_d.get("model") == "moe"
              or any(isinstance(r.get("expert_load"), list) for r in rows))
    routing = None
    if is_moe:
        routing = _read_optional(run_dir / "routing.json", "json", problems,
                                 why=": no expert × domain routing plot")
        if routing is not None and not isinstance(routing, Mapping):
            problems.append("routing.json is not a JSON object")
            routing = None
    if not rows:
        problems.append("metrics.jsonl has no evaluation rows yet")

    unigram = summary_d.get("unigram_bpb")
    unigram = unigram if isinstance(unigram, Mapping) else {}
    domains = _domains(rows, summary_d, routing)
    moe_layers = routing.get("layers") if routing else None
    model_kind = summary_d.get("model") or (
        "moe (inferred from metrics)" if is_moe else "dense (inferred from metrics)")

    # ---- summary tables
    wall = summary_d.get("wall_time_s")
    wall_label = "wall time"
    if wall is None:
        wall, wall_label = final.get("elapsed_s"), "elapsed at last eval"
    steps = summary_d.get("steps", final.get("step"))
    pairs = [
        ("model", str(model_kind)),
        ("steps", _int(steps)),
        ("evaluations", _int(len(rows))),
        ("final train loss (nats/token)", _f(final.get("train_loss"))),
        ("final val loss (nats/token)", _f(final.get("val_loss"))),
        ("final MaxVio (mean over MoE layers)", _f(final.get("max_vio"), 3)),
        ("activated MoE-layer params per token (last eval, mean over layers)",
         _params(final.get("activated_params_mean"))),
        ("tokens / s (last eval)", _int(final.get("tokens_per_s"))),
        (wall_label, _duration(wall)),
        ("parameters, total", _params(summary_d.get("params_total"))),
        ("parameters, active per token", _params(summary_d.get("params_active"))),
        ("final learning rate", _g(final.get("lr"))),
    ]

    # ---- figures
    f_loss = _try_plot("loss curves", problems, plots.plot_losses, rows)
    f_bpb = _try_plot("bits-per-byte curves", problems, plots.plot_bpb, rows, unigram, domains)
    f_load = _try_plot("expert load heatmap", problems, plots.plot_expert_load, rows, moe_layers)
    f_route = (_try_plot("routing matrix", problems, plots.plot_routing, routing)
               if routing else None)
    f_vio = _try_plot("MaxVio curve", problems, plots.plot_max_vio, rows, moe_layers)
    f_mix = _try_plot("mixture weights", problems, plots.plot_mix_weights, rows)

    figs = [
        _figure("Loss", f_loss,
                "Training loss (mean over the steps since the previous evaluation) and "
                "validation loss, in nats per token; both should fall, and a widening gap "
                "between them means over-fitting."),
        _figure("Validation bits per byte", f_bpb,
                "Solid lines: validation bits per byte overall (black) and per domain; dashed "
                "lines of the same colour: that domain's unigram byte entropy, the score of a "
                "model that ignores context. Curves well below their dashed line mean the "
                "model uses context; lower is better."),
        _figure("Expert load over training", f_load,
                "One panel per MoE layer; each column is an evaluation step, each row an "
                "expert, and the colour is the fraction of routed token-slots that expert "
                "received. White is the uniform share 1/E, red an overloaded expert, blue an "
                "under-used one; grey means no data. A balanced layer stays pale."),
        _figure("Final routing by domain", f_route,
                "One panel per MoE layer of the final model on the validation set; each column "
                "(domain) sums to 1 and shows how that domain's token-slots are split across "
                "experts. Bright cells concentrated in different rows for different columns "
                "mean experts specialise by domain; flat columns near 1/E mean they do not."),
        _figure("MaxVio", f_vio,
                "Maximal load violation (largest expert load ÷ mean expert load − 1) per "
                "evaluation: black is the mean over MoE layers, thin lines single layers. "
                "0 is perfect balance; 1 means some expert gets twice its fair share."),
        _figure("Domain mixture weights", f_mix,
                "Sampling weight of each domain as the run went (data.mixing=dynamic: "
                "re-weighted from the routing of a fixed probe every data.mix_every steps). "
                "A rising line is a domain whose tokens the experts route unlike the others'."),
    ]
    figs_html = "".join(figs) or "<p>No plottable metrics yet.</p>"
    if not is_moe:
        figs_html += ("<p class='meta'>Dense model: expert load, routing and MaxVio plots "
                      "do not apply.</p>")

    # ---- config
    if config is not None:
        try:
            cfg_text = yaml.safe_dump(config, sort_keys=False, default_flow_style=False,
                                      allow_unicode=True)
        except yaml.YAMLError:
            cfg_text = str(config)
        cfg_html = (f"<details><summary>Resolved config (config.yaml)</summary>"
                    f"<pre>{_e(cfg_text)}</pre></details>")
    else:
        cfg_html = "<p class='meta'>No config.yaml available.</p>"

    warn_html = ""
    if problems:
        items = "".join(f"<li>{_e(p)}</li>" for p in problems)
        warn_html = f"<div class='warn'><b>Incomplete run folder:</b><ul>{items}</ul></div>"

    now = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    title = f"divmoe run report: {run_dir.resolve().name}"
    meta = f"Run folder: <code>{_e(run_dir.resolve())}</code> · generated {_e(now)}"
    page = html_page(title, meta, f"""{warn_html}
<h2>Summary</h2>
<div class="tables">
{_bpb_table(final, unigram, domains)}
{_kv_table(pairs)}
</div>
<p class="meta">Bits per byte: lower is better; "model ÷ unigram" below 1 means the model
beats a context-free byte-frequency model of that domain.</p>
<h2>Plots</h2>
{figs_html}
<h2>Configuration</h2>
{cfg_html}""")
    out = run_dir / REPORT_NAME
    _atomic_write(out, page)
    return out
