"""Train several configurations on the same data, seed and budget; tabulate and plot them.

``run_compare(out, variants)`` trains each :class:`Variant` through :func:`divmoe.train.train`
into ``OUT/<name>/`` (resumable: a finished variant is not retrained, an interrupted one is
resumed from its checkpoint), then writes ``OUT/summary.md`` and ``OUT/report.html``.

Per-variant numbers (all from the variant's run folder, final evaluation):
  val bpb overall and per domain; MaxVio; specialisation MI = I(expert; domain) in bits
  from ``routing.json`` (expert × domain routed-slot counts on the validation set), mean
  over MoE layers (:func:`divmoe.diagnostics.specialization.mutual_information_bits`);
  expert-output Vendi (``expert_vendi``); activated params per token
  (``activated_params_mean`` of the metrics rows, mean over MoE layers, when the run logs it);
  tokens/s = mean training throughput over the run's evaluation intervals.
"""

from __future__ import annotations

import contextlib
import html
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ConfigError, apply_overrides
from ..files import check_output_folder
from ..train import load_config, train
from ..train.config import same_run
from ..train.checkpoint import checkpoint_candidates


@dataclass
class Variant:
    """One configuration: an optional YAML file, then ``key=value`` overrides."""

    name: str
    overrides: list[str] = field(default_factory=list)
    config: str | None = None

    def resolve(self, base: list[str] = ()):
        return load_config(self.config, list(base) + list(self.overrides))


def _check_name(name: str) -> str:
    if not name or "/" in name or name.startswith(".") or name in ("summary.md", "report.html"):
        raise ConfigError(f"variant name {name!r} is not allowed: it names a folder under --out")
    return name


def load_study(path: str | Path) -> tuple[list[str], list[Variant]]:
    """A study file: ``base:`` (list of key=value, or a nested mapping) applied to every variant,
    and ``variants:`` mapping name → list of key=value overrides (or a nested mapping)."""
    from ..train.config import read_yaml_file

    data = read_yaml_file(path, "study file")
    if not isinstance(data, dict) or not isinstance(data.get("variants"), dict) or not data["variants"]:
        raise ConfigError(f"study file {str(path)!r} must hold a mapping with a non-empty "
                          f"'variants:' mapping of name → overrides")
    unknown = sorted(set(data) - {"base", "variants"})
    if unknown:
        raise ConfigError(f"study file {str(path)!r}: unknown key {unknown[0]!r}; allowed: base, variants")
    return _as_overrides(data.get("base")), [Variant(_check_name(str(n)), _as_overrides(v))
                                             for n, v in data["variants"].items()]


def _as_overrides(spec: Any) -> list[str]:
    if spec is None:
        return []
    if isinstance(spec, list):
        return [str(s) for s in spec]
    if isinstance(spec, dict):
        out = []

        def walk(d, prefix):
            for k, v in d.items():
                if isinstance(v, dict) and v:
                    walk(v, f"{prefix}{k}.")
                else:
                    out.append(f"{prefix}{k}={json.dumps(v)}")
        walk(spec, "")
        return out
    raise ConfigError(f"overrides must be a list of key=value or a mapping, got {spec!r}")


def _read_rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _finished(run: Path, steps: int) -> bool:
    try:
        summary = json.loads((run / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    return not summary.get("interrupted") and summary.get("steps") == steps


@contextlib.contextmanager
def _locked(lock: str | Path | None):
    """Hold an exclusive flock on ``lock`` (a shared machine's heavy-job lock) if given."""
    if lock is None:
        yield
        return
    import fcntl

    with open(lock, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def train_variant(out: Path, variant: Variant, base: list[str] = (), progress: bool = False,
                  lock: str | Path | None = None, report: bool = True) -> str:
    """Train one variant into ``out/<name>``; returns 'done' (already finished), 'resumed' or
    'trained'. ``lock``: a file to flock while training (taken per variant, not per study);
    ``report=False``: no report.html."""
    cfg = variant.resolve(base)
    run = Path(out) / variant.name
    if (run / "config.yaml").exists():
        if not same_run(cfg, load_config(run / "config.yaml")):  # a longer budget resumes it
            raise ConfigError(f"{run} holds a run of a different configuration than variant "
                              f"{variant.name!r}; choose another --out or remove that folder")
    if _finished(run, cfg.train.steps):
        return "done"
    with _locked(lock):
        return _train_variant(run, cfg, progress, report)


def _train_variant(run: Path, cfg, progress: bool, report: bool = True) -> str:
    if run.exists() and checkpoint_candidates(run):
        train(run, cfg, resume=True, progress=progress, report=report)
        return "resumed"
    if run.exists():  # a run that died before its first checkpoint: nothing to keep
        shutil.rmtree(run)
    train(run, cfg, progress=progress, report=report)
    return "trained"


def specialization_mi(routing: dict | None) -> float | None:
    """Mean over MoE layers of I(expert; domain) in bits from routing.json counts [L][E][D]."""
    if not routing or not routing.get("counts"):
        return None
    from ..diagnostics.specialization import mutual_information_bits

    vals = [mutual_information_bits(c) for c in routing["counts"]]
    return sum(vals) / len(vals)


def variant_summary(run: Path) -> dict:
    """The table row of one finished run folder."""
    run = Path(run)
    rows = _read_rows(run)
    if not rows:
        raise FileNotFoundError(f"{run}: no metrics.jsonl rows")
    last = rows[-1]
    routing = None
    if (run / "routing.json").exists():
        routing = json.loads((run / "routing.json").read_text())
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else {}
    tps = [r["tokens_per_s"] for r in rows if r.get("tokens_per_s")]
    return {
        "name": run.name, "step": last["step"], "val_bpb": last["val_bpb"],
        "val_bpb_by_domain": last.get("val_bpb_by_domain", {}), "max_vio": last.get("max_vio"),
        "train_max_vio": last.get("train_max_vio"), "max_vio_pooled": last.get("max_vio_pooled"),
        "mi_bits": specialization_mi(routing), "expert_vendi": last.get("expert_vendi"),
        "mi_given_token_bits": last.get("mi_given_token_bits"),
        "activated_params": last.get("activated_params_mean"),
        "tokens_per_s": sum(tps) / len(tps) if tps else None,
        "wall_time_s": summary.get("wall_time_s"), "rows": rows,
    }


def _fmt(x, digits=3):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if isinstance(x, float) and abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def table_columns(summaries: list[dict]) -> tuple[list[str], list[list[str]]]:
    domains = sorted({d for s in summaries for d in s["val_bpb_by_domain"]})
    header = (["variant", "val bpb"] + [f"bpb {d}" for d in domains]
              + ["MaxVio", "spec. MI (bits)", "expert Vendi", "activated params", "tokens/s"])
    body = []
    for s in summaries:
        body.append([s["name"], _fmt(s["val_bpb"])]
                    + [_fmt(s["val_bpb_by_domain"].get(d)) for d in domains]
                    + [_fmt(s["max_vio"]), _fmt(s["mi_bits"]), _fmt(s["expert_vendi"], 2),
                       _fmt(float(s["activated_params"]) if s["activated_params"] is not None else None),
                       _fmt(float(s["tokens_per_s"]) if s["tokens_per_s"] else None)])
    return header, body


def markdown_table(summaries: list[dict]) -> str:
    header, body = table_columns(summaries)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines) + "\n"


TABLE_NOTES = ("val bpb: validation bits per byte at the last step (lower is better). MaxVio: "
               "(max load − mean)/mean on validation batches, mean over layers. spec. MI: "
               "I(expert; domain) in bits from routing.json, mean over MoE layers. expert Vendi: "
               "Vendi score across experts of their centred outputs on the fixed probe (1 … E), "
               "mean over layers. activated params: parameters a token touches per MoE layer "
               "(routed experts actually chosen + shared + router), mean over layers. tokens/s: "
               "mean training throughput (machine shared, indicative only).")


def write_summary_md(out: Path, summaries: list[dict], title: str = "divmoe compare",
                     extra: str = "") -> Path:
    text = f"# {title}\n\n" + markdown_table(summaries) + "\n" + TABLE_NOTES + "\n"
    if extra:
        text += "\n" + extra
    path = Path(out) / "summary.md"
    path.write_text(text)
    return path


def plot_overlay(summaries: list[dict], key: str, ylabel: str):
    from ..report import plots

    fig, ax = plots.plt.subplots(figsize=(7.5, 4.0), constrained_layout=True)
    drawn = False
    for s in summaries:
        pts = [(r["step"], r[key]) for r in s["rows"] if r.get(key) is not None]
        if key == "val_bpb":
            pts = [p for p in pts if p[0] > 0]  # the untrained step-0 value squashes the curves
        if pts:
            ax.plot(*zip(*pts), marker="o" if len(pts) <= 40 else None, ms=3, lw=1.4, label=s["name"])
            drawn = True
    if not drawn:
        plots.plt.close(fig)
        return None
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    return fig


def write_report_html(out: Path, summaries: list[dict], title: str = "divmoe compare",
                      extra_html: str = "") -> Path:
    from ..report.html import _atomic_write, _fig_to_data_uri, html_page

    parts = []
    header, body = table_columns(summaries)
    parts.append("<h2>Final metrics</h2><table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header)
                 + "</tr>" + "".join("<tr>" + "".join(
                     f"<td{'' if i == 0 else ' class=n'}>{html.escape(c)}</td>" for i, c in enumerate(r))
                     + "</tr>" for r in body) + "</table>")
    parts.append(f"<p class='meta'>{html.escape(TABLE_NOTES)}</p>")
    parts.append(extra_html)
    for key, label, cap in (("val_bpb", "validation bits per byte", "Validation bpb over training"),
                            ("max_vio", "MaxVio", "MaxVio over training (0 = balanced)"),
                            ("expert_vendi", "expert-output Vendi", "Expert-output Vendi over training")):
        fig = plot_overlay(summaries, key, label)
        if fig is not None:
            parts.append(f"<h2>{html.escape(cap)}</h2><figure><img alt='{html.escape(cap)}' "
                         f"src='{_fig_to_data_uri(fig)}'></figure>")
    meta = f"{len(summaries)} variants; written {time.strftime('%Y-%m-%d %H:%M:%S')}"
    path = Path(out) / "report.html"
    _atomic_write(path, html_page(title, meta, "\n".join(parts)))
    return path


def run_compare(out: str | Path, variants: list[Variant], base: list[str] = (),
                progress: bool = False, log=print, lock: str | Path | None = None) -> list[dict]:
    """Train every variant (resumably) and write summary.md and report.html; returns summaries."""
    out = Path(out)
    names = [_check_name(v.name) for v in variants]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ConfigError(f"variant name {dup!r} is used twice; names must be distinct")
    for v in variants:  # every configuration is checked before any training starts
        v.resolve(base)
    check_output_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    summaries = []
    for v in variants:
        t0 = time.perf_counter()
        how = train_variant(out, v, base, progress=progress, lock=lock)
        log(f"{v.name}: {how} ({time.perf_counter() - t0:.0f} s)")
        summaries.append(variant_summary(out / v.name))
    write_summary_md(out, summaries)
    write_report_html(out, summaries)
    return summaries


__all__ = ["Variant", "load_study", "run_compare", "train_variant", "variant_summary",
           "specialization_mi", "markdown_table", "write_summary_md", "write_report_html",
           "apply_overrides"]
