"""``divmoe analyze``: run the validation corpus through a MoE model, record per-layer routing
per token with domain labels, compute every diagnostic and write analysis.json + analysis.html.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.corpus import load_corpus
from ..data.user_corpus import load_user_corpus
from ..data.mixture import _domain_streams
from ..diagnostics import (cache_gain_at, expert_domain_counts, expert_output_vendi,
                           load_summary, load_trajectory, redundancy_summary, routing_totals,
                           sch_curve, specialization_summary, srp_curve)
from ..diagnostics.redundancy import probe_experts
from ..files import atomic_write_text, check_output_folder
from ..parallel.traces import trace_of
from .source import AnalysisSource, AnalyzeError, load_source

DEFAULT_MAX_BYTES = 32768
PROBE_TOKENS = 2048      # tokens (spread over domains) every expert is run on for redundancy
SCH_SEGMENTS = (1, 4, 16, 64)


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"analyze: {msg}", file=sys.stderr, flush=True)


def _windows(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping windows [N, seq_len] of a 1-D token stream (one shorter window if the
    stream is shorter than seq_len)."""
    if ids.numel() < 2:
        raise AnalyzeError("a validation domain produced fewer than 2 tokens; raise --max-bytes")
    n = ids.numel() // seq_len
    if n == 0:
        return ids[None]
    return ids[: n * seq_len].reshape(n, seq_len)


def _powers_of_two(limit: int) -> list[int]:
    out, m = [], 1
    while m <= limit:
        out.append(m)
        m *= 2
    return out


class _Recorder:
    """Forward hooks on every sparse layer: routing per token and a sample of layer inputs."""

    def __init__(self, src: AnalysisSource, probe_per_domain: int):
        self.src, self.probe_per_domain = src, probe_per_domain
        L = len(src.moes)
        self.ids: list[list[torch.Tensor]] = [[] for _ in range(L)]      # per batch [B, S, K]
        self.stats: list[list] = [[] for _ in range(L)]
        self.probe: list[list[torch.Tensor]] = [[] for _ in range(L)]
        self.probe_count = [0] * L
        self.hf_max_diff = None   # largest |HF block output − divmoe view output| seen
        self.batch_shape = None
        self.handles = [m.register_forward_hook(self._hook(i), with_kwargs=True)
                        for i, m in enumerate(src.hook_modules)]

    def new_domain(self):
        self.probe_count = [0] * len(self.probe_count)

    def _hook(self, li: int):
        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs.get("hidden_states")
            if self.src.kind == "divmoe":
                stats = output.stats
            else:  # HF block: route the same input through the divmoe view of the block
                with torch.no_grad():
                    ours = self.src.moes[li](x.detach())
                hf_out = output[0] if isinstance(output, tuple) else output
                if isinstance(hf_out, torch.Tensor) and hf_out.shape == ours.output.shape:
                    diff = float((hf_out.detach().float() - ours.output.float()).abs().max())
                    self.hf_max_diff = max(self.hf_max_diff or 0.0, diff)
                stats = ours.stats
            B, S = self.batch_shape
            self.ids[li].append(stats.expert_ids.reshape(B, S, -1).to(torch.int32).cpu())
            self.stats[li].append(stats)
            need = self.probe_per_domain - self.probe_count[li]
            if need > 0:
                flat = x.detach().reshape(-1, x.shape[-1])[:need].float().cpu()
                self.probe[li].append(flat)
                self.probe_count[li] += flat.shape[0]
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def _curve(d: dict) -> dict:
    return {"segment_lens": list(d), "values": list(d.values())}


@dataclass
class Routed:
    """The validation data routed through a model: per layer, per batch, the experts of every
    token (``rec.ids``), with the batches' domains."""
    rec: "_Recorder"
    domains: list[str]
    windows: dict[str, torch.Tensor]
    dom_of_batch: list[int]
    data: str | Path | None

    def ids_by_layer(self) -> list[torch.Tensor]:
        """Per layer, [T, K] chosen experts of all tokens, in the same order in every layer."""
        return [torch.cat([b.reshape(-1, b.shape[-1]) for b in ids]).long() for ids in self.rec.ids]


def validation_windows(src: AnalysisSource, max_bytes: int = DEFAULT_MAX_BYTES,
                       data: str | Path | None = None) -> tuple[dict, str | Path | None]:
    """Token windows [N, seq_len] of the first ``max_bytes`` validation bytes of every domain
    (the run's corpus for a divmoe run unless ``data`` is given; else the embedded one), and
    the corpus used."""
    val_fraction = 0.05
    if src.kind == "divmoe":
        from ..train.config import load_config

        run_data = load_config(src.info["config"]).data
        val_fraction = run_data.val_fraction
        data = data if data is not None else run_data.corpus
    val_docs = load_corpus("val") if data is None else \
        load_user_corpus(data, src.seq_len, val_fraction)["val"]
    streams = _domain_streams(val_docs)
    windows = {d: _windows(src.encode(streams[d][:max_bytes]), src.seq_len)
               for d in sorted(streams)}
    return windows, data


def route_validation(src: AnalysisSource, max_bytes: int = DEFAULT_MAX_BYTES,
                     batch_size: int = 16, probe_tokens: int = PROBE_TOKENS,
                     progress: bool = True, data: str | Path | None = None) -> Routed:
    """Route the validation split (the run's corpus for a divmoe run unless ``data`` is
    given; else the embedded one) through ``src``, recording every layer's routing and a
    sample of ``probe_tokens`` layer inputs (0: none)."""
    windows, data = validation_windows(src, max_bytes, data)
    domains = sorted(windows)
    rec = _Recorder(src, probe_tokens and max(1, probe_tokens // len(domains)))
    dom_of_batch: list[int] = []
    try:
        with torch.no_grad():
            for di, d in enumerate(domains):
                rec.new_domain()
                batches = windows[d].split(batch_size)
                _log(progress, f"domain {d}: {windows[d].numel()} tokens in {len(batches)} batches")
                for b in batches:
                    rec.batch_shape = tuple(b.shape)
                    src.forward(b)
                    dom_of_batch.append(di)
    finally:
        rec.close()
    return Routed(rec, domains, windows, dom_of_batch, data)


def analyze(path: str | Path, out: str | Path, max_bytes: int = DEFAULT_MAX_BYTES,
            probe_tokens: int = PROBE_TOKENS, batch_size: int = 16,
            progress: bool = True, data: str | Path | None = None) -> dict:
    """Analyze the model at ``path`` and write ``out/analysis.json`` and ``out/analysis.html``.

    ``data``: a user corpus (layouts of ``data.corpus``) whose validation split is routed
    instead of the embedded corpus; a divmoe run trained on a user corpus defaults to it.
    Returns the analysis dict (the content of analysis.json).
    """
    t0 = time.perf_counter()
    if max_bytes < 2:
        raise AnalyzeError(f"--max-bytes must be >= 2, got {max_bytes}")
    out = check_output_folder(out)
    src = load_source(path)
    for note in src.notes:  # a fallback or a guessed tokenizer is said even with --quiet
        _log(True, f"note: {note}")
    _log(progress, f"{src.kind} model from {src.path}: {len(src.moes)} MoE layers, "
                   f"E={src.info['num_experts']}, k={src.info['top_k']}, tokenizer {src.tokenizer}")
    routed = route_validation(src, max_bytes, batch_size, probe_tokens, progress, data)
    rec, domains, windows = routed.rec, routed.domains, routed.windows
    dom_of_batch, data = routed.dom_of_batch, routed.data
    L, E, K = len(src.moes), int(src.info["num_experts"]), int(src.info["top_k"])

    _log(progress, "computing diagnostics")
    S = max(w.shape[1] for w in windows.values())
    seg_lens = _powers_of_two(S)
    layers = []
    ids_by_layer = routed.ids_by_layer()
    for li in range(L):
        name = src.layer_names[li]
        # tokens per domain, flattened in order, with their domain label
        ids_TK = ids_by_layer[li]
        dom_T = torch.cat([torch.full((b.shape[0] * b.shape[1],), di, dtype=torch.long)
                           for b, di in zip(rec.ids[li], dom_of_batch)])
        counts_ED = expert_domain_counts(ids_TK, dom_T, E, len(domains))
        # sequences of the most common length (a short tail window is left out of SRP/SCH)
        seqs = torch.cat([b for b in rec.ids[li] if b.shape[1] == S]).long()
        srp = srp_curve(seqs, E, seg_lens)
        cov_k = srp_curve(seqs, E, seg_lens, set_size=K)
        cov_2k = srp_curve(seqs, E, seg_lens, set_size=2 * K)
        sch = sch_curve(seqs, E, [m for m in SCH_SEGMENTS if m <= S] or [S])
        _log(progress, f"{name}: routing done; probing {E} experts")
        probe_x = torch.cat(rec.probe[li])
        out_ETD = probe_experts(src.moes[li], probe_x).float()
        try:
            red = redundancy_summary(out_ETD)
            vendi = expert_output_vendi(out_ETD)
        except ValueError as exc:  # e.g. an expert with constant output (CKA undefined)
            red, vendi = {"error": str(exc)}, None
        layers.append({
            "name": name,
            "load": load_summary(counts_ED.sum(1)),
            "routing": routing_totals(rec.stats[li]),
            "counts_by_domain": counts_ED.tolist(),
            "specialization": specialization_summary(counts_ED, domains),
            "srp": _curve(srp),
            "srp_coverage_k": _curve(cov_k),
            "srp_coverage_2k": _curve(cov_2k),
            "sch": {"segment_lens": list(sch), "cache_sizes": list(range(1, E + 1)),
                    "values": list(sch.values()),
                    "gain_at_2k": [cache_gain_at(v, 2 * K, K) for v in sch.values()]},
            "redundancy": red,
            "vendi": vendi,
            "probe_tokens": int(probe_x.shape[0]),
        })

    def mean(key_fn):
        vals = [key_fn(l) for l in layers]
        vals = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
        return sum(vals) / len(vals) if vals else None

    m_ref = 16 if 16 in seg_lens else seg_lens[-1]
    sch_ref = 16 if 16 in SCH_SEGMENTS and 16 <= S else None
    summary = {
        "max_vio": mean(lambda l: l["load"]["max_vio"]),
        "cv": mean(lambda l: l["load"]["cv"]),
        "entropy_normalized": mean(lambda l: l["load"]["entropy_normalized"]),
        "dropped_fraction": mean(lambda l: l["routing"]["dropped_fraction"]),
        "mi_bits": mean(lambda l: l["specialization"]["mi_bits"]),
        "nmi": mean(lambda l: l["specialization"]["nmi"]),
        "srp_segment_len": m_ref,
        "srp": mean(lambda l: l["srp"]["values"][l["srp"]["segment_lens"].index(m_ref)]),
        "sch_segment_len": sch_ref,
        "sch_at_k": None if sch_ref is None else mean(
            lambda l: l["sch"]["values"][l["sch"]["segment_lens"].index(sch_ref)][K - 1]),
        "sch_at_2k": None if sch_ref is None else mean(
            lambda l: l["sch"]["values"][l["sch"]["segment_lens"].index(sch_ref)][min(2 * K, E) - 1]),
        "sch_gain_at_2k": None if sch_ref is None else mean(
            lambda l: l["sch"]["gain_at_2k"][l["sch"]["segment_lens"].index(sch_ref)]),
        "mean_cka": mean(lambda l: l["redundancy"].get("mean_cka")),
        "mean_cosine": mean(lambda l: l["redundancy"].get("mean_cosine")),
        "vendi": mean(lambda l: l["vendi"]),
    }
    result = {
        "source": {"path": str(Path(path).resolve()), "kind": src.kind,
                   "tokenizer": src.tokenizer, "notes": src.notes, **src.info},
        "model": {"num_experts": E, "top_k": K, "layers": src.layer_names, "seq_len": src.seq_len},
        "data": {"split": "val", "corpus": str(data) if data is not None else "embedded",
                 "domains": domains, "max_bytes_per_domain": max_bytes,
                 "tokens_by_domain": {d: int(windows[d].numel()) for d in domains},
                 "probe_tokens": probe_tokens},
        "summary": summary,
        "layers": layers,
    }
    result["placement_trace"] = trace_of(src, ids_by_layer).to_json()
    if src.kind == "hf":
        result["hf_check"] = {"max_abs_diff_divmoe_vs_hf_block": rec.hf_max_diff}
    traj = _training_load(src)
    if traj is not None:
        result["training_load"] = traj
    result["elapsed_s"] = time.perf_counter() - t0

    out.mkdir(parents=True, exist_ok=True)
    result = _clean(result)
    atomic_write_text(out / "analysis.json", json.dumps(result, indent=1, allow_nan=False))
    from .html import write_analysis_html

    write_analysis_html(result, out / "analysis.html")
    _log(progress, f"wrote {out / 'analysis.json'} and {out / 'analysis.html'} "
                   f"({result['elapsed_s']:.1f} s)")
    return result


def _clean(o):
    """JSON-ready copy: tensors to lists, NaN/inf to None (strict JSON has no NaN)."""
    if isinstance(o, torch.Tensor):
        o = o.tolist()
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o


def _training_load(src: AnalysisSource) -> dict | None:
    """MaxVio / CV / entropy per layer over training, from the run's metrics.jsonl."""
    path = src.info.get("metrics")
    if not path:
        return None
    steps, per_layer = [], None
    try:
        for line in Path(path).read_text().splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            load = row.get("expert_load")
            if not isinstance(load, list):
                continue
            steps.append(row.get("step"))
            per_layer = per_layer or [[] for _ in load]
            for li, l in enumerate(load[: len(per_layer)]):
                per_layer[li].append(l)
    except (OSError, ValueError):
        return None
    if not steps:
        return None
    return {"steps": steps, "layers": [load_trajectory(p) for p in per_layer]}
