"""``divmoe mixture search``: RegMix over the corpus domains.

Steps (all files under ``OUT``):

1. draw ``n`` proxy mixtures around the token prior (:func:`.proposals.draw_mixtures`),
   kept in ``proposals.json`` so a resumed search trains the same ones;
2. train one tiny, short proxy per mixture into ``proxies/pNNN/`` in ``workers`` parallel
   single-thread processes; a finished proxy is skipped, an interrupted one resumed, and
   with ``time_budget`` no new proxy starts after that many seconds (run again to go on);
3. fit every available regressor from weights to the target loss (mean of the per-domain
   validation bpb, or one named domain's), with out-of-fold predictions and their Spearman
   correlation to the observed losses (``fit.json``);
4. search the simplex with the best (or the named) regressor
   (:func:`.proposals.search_simplex`) and write ``mixture.yaml`` (the base settings plus
   ``data.weights``) for ``divmoe train --config``; ``search.json`` and ``search.md`` hold
   the numbers, ``predicted_vs_observed.png`` and ``weights_vs_loss.png`` the plots.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np

from ..config import ConfigError, apply_overrides
from .proposals import draw_mixtures, search_simplex, token_prior
from .regression import REGRESSORS, cross_val_predictions, lightgbm_available, make_regressor, spearman

#: the proxy model and budget: 1/4 the width, 1/2 the depth, 3/20 the steps and 1/2 the batch
#: of the default run; evaluated once at the end, on 1/4 of the validation text
PROXY_DEFAULTS = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "train.steps=60",
                  "train.batch_size=16", "train.eval_every=60", "train.warmup_steps=6",
                  "data.val_bytes_per_domain=8192", "train.threads=1"]


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _train_sizes(base: list[str]) -> tuple[dict[str, int], object]:
    from ..data.mixture import _domain_streams
    from ..data.user_corpus import load_splits
    from ..train import load_config

    cfg = load_config(None, base)
    train_docs, _ = load_splits(cfg.data.corpus, cfg.model.seq_len, cfg.data.val_fraction)
    return {d: len(b) for d, b in _domain_streams(train_docs).items()}, cfg


def _proposals(out: Path, sizes: dict[str, int], n: int, seed: int) -> np.ndarray:
    path = out / "proposals.json"
    domains = sorted(sizes)
    if path.exists():
        saved = json.loads(path.read_text())
        if saved["domains"] != domains or saved["seed"] != seed or len(saved["weights"]) != n:
            raise ConfigError(f"{path} was drawn for {len(saved['weights'])} proxies, seed "
                              f"{saved['seed']}, domains {saved['domains']}; this search asks for "
                              f"{n}, seed {seed}, domains {domains}: choose another --out")
        return np.array(saved["weights"])
    weights = draw_mixtures(sizes, n, seed)
    _write_json_atomic(path, {"domains": domains, "seed": seed, "weights": weights.tolist()})
    return weights


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def _run_proxy(proxies: str, name: str, overrides: list[str], deadline: float | None) -> str:
    from ..compare.runner import Variant, _finished, train_variant
    from ..train import load_config

    if deadline is not None and time.time() > deadline:
        if not _finished(Path(proxies) / name, load_config(None, overrides).train.steps):
            return "skipped"
    return train_variant(Path(proxies), Variant(name, overrides), report=False)


def proxy_overrides(base: list[str], proxy_set: list[str], domains: list[str], w: np.ndarray) -> list[str]:
    weights = {d: round(float(x), 6) for d, x in zip(domains, w)}
    return list(base) + PROXY_DEFAULTS + list(proxy_set) + [f"data.weights={json.dumps(weights)}"]


def _target_value(final: dict, target: str) -> float:
    by = final["val_bpb_by_domain"]
    return float(np.mean(list(by.values()))) if target == "average" else float(by[target])


def train_proxies(out: Path, overrides: list[list[str]], workers: int,
                  time_budget: float | None, log=print) -> dict[str, str]:
    """Train every proxy not yet finished; returns {name: trained|resumed|done|skipped}."""
    proxies = out / "proxies"
    proxies.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + time_budget if time_budget is not None else None
    names = [f"p{i:03d}" for i in range(len(overrides))]
    status = {}
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker) as pool:
        futures = {pool.submit(_run_proxy, str(proxies), n, o, deadline): n
                   for n, o in zip(names, overrides)}
        for fut in cf.as_completed(futures):
            status[futures[fut]] = fut.result()
            if status[futures[fut]] != "skipped":
                log(f"proxy {futures[fut]}: {status[futures[fut]]}")
    return dict(sorted(status.items()))


def fit_and_search(X: np.ndarray, y: np.ndarray, sizes: dict[str, int], regressor: str,
                   seed: int) -> dict:
    """Cross-validate every available regressor, pick one, search the simplex with it."""
    names = [r for r in REGRESSORS if r != "lightgbm" or lightgbm_available()]
    if regressor not in ("best", *REGRESSORS):
        raise ConfigError(f"unknown regressor {regressor!r}; allowed: best, {', '.join(REGRESSORS)}")
    if regressor != "best":
        make_regressor(regressor)  # a clear error when lightgbm is missing
    fits = {}
    for r in names:
        oof = cross_val_predictions(r, X, y, seed=seed)
        model = make_regressor(r, seed).fit(X, y)
        fits[r] = {"cv_spearman": spearman(oof, y), "train_spearman": spearman(model.predict(X), y),
                   "cv_mae": float(np.abs(oof - y).mean()), "oof": oof.tolist(), "model": model}
    chosen_r = regressor if regressor != "best" else max(
        names, key=lambda r: (np.nan_to_num(fits[r]["cv_spearman"], nan=-2), r == "linear"))
    model = fits[chosen_r]["model"]
    mixture, top = search_simplex(model.predict, sizes, seed)
    for f in fits.values():
        f.pop("model")
    return {"regressors": fits, "regressor": chosen_r, "mixture": mixture.tolist(),
            "predicted": float(model.predict(mixture[None])[0]),
            "top_candidates_predicted": model.predict(top).tolist()}


def _plots(out: Path, X: np.ndarray, y: np.ndarray, domains: list[str], fit: dict, target: str) -> None:
    from ..report import plots

    plt = plots.plt
    fig, ax = plt.subplots(figsize=(5.2, 4.6), constrained_layout=True)
    for r, f in fit["regressors"].items():
        ax.scatter(y, f["oof"], s=14, label=f"{r} (CV Spearman {f['cv_spearman']:.2f})")
    lo, hi = float(min(y.min(), *[min(f["oof"]) for f in fit["regressors"].values()])), \
        float(max(y.max(), *[max(f["oof"]) for f in fit["regressors"].values()]))
    ax.plot([lo, hi], [lo, hi], color="grey", lw=1, ls="--")
    ax.set_xlabel(f"observed proxy loss ({target} val bpb)")
    ax.set_ylabel("predicted (out-of-fold)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.savefig(out / "predicted_vs_observed.png", dpi=110)
    plt.close(fig)
    cols = 4
    rows = -(-len(domains) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 2.5 * rows), constrained_layout=True,
                             squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= len(domains):
            ax.axis("off")
            continue
        ax.scatter(X[:, i], y, s=10)
        ax.axvline(fit["mixture"][i], color="C3", lw=1, label="chosen")
        ax.set_title(domains[i], fontsize=9)
        ax.set_xlabel("weight", fontsize=8)
        ax.set_ylabel(f"{target} bpb", fontsize=8)
        ax.grid(alpha=0.3)
    fig.savefig(out / "weights_vs_loss.png", dpi=110)
    plt.close(fig)


def _mixture_config(base: list[str], domains: list[str], mixture: list[float]) -> dict:
    data = apply_overrides({}, list(base))
    data.setdefault("data", {})
    data["data"]["weights"] = {d: round(float(w), 6) for d, w in zip(domains, mixture)}
    data["data"].pop("temperature", None)
    return data


def _search_md(res: dict) -> str:
    lines = [f"# divmoe mixture search ({res['target']} val bpb)", "",
             f"{res['proxies']} proxies ({' '.join(PROXY_DEFAULTS + res['proxy_set'])}); "
             f"{res['proxy_core_seconds']:.0f} core-seconds of proxy training "
             f"(estimated {res['proxy_train_flops']:.3g} training FLOPs = 6 · active params · tokens).",
             "", "| regressor | CV Spearman | train Spearman | CV MAE (bpb) |", "|---|---|---|---|"]
    for r, f in res["fit"]["regressors"].items():
        lines.append(f"| {r}{' (chosen)' if r == res['fit']['regressor'] else ''} | "
                     f"{f['cv_spearman']:.3f} | {f['train_spearman']:.3f} | {f['cv_mae']:.4f} |")
    lines += ["", "| domain | token prior (T=0.5) | chosen weight |", "|---|---|---|"]
    for d, p, w in zip(res["domains"], res["prior"], res["fit"]["mixture"]):
        lines.append(f"| {d} | {p:.3f} | {w:.3f} |")
    lines += ["", f"Predicted {res['target']} bpb of the chosen mixture (proxy scale): "
              f"{res['fit']['predicted']:.4f}; best observed proxy: {min(res['observed']):.4f}.",
              "", "Train it: `divmoe train --config mixture.yaml --out RUN`."]
    return "\n".join(lines) + "\n"


def run_search(out: str | Path, proxies: int = 32, workers: int = 2, target: str = "average",
               regressor: str = "best", base: list[str] = (), proxy_set: list[str] = (),
               seed: int = 0, time_budget: float | None = None, log=print) -> dict:
    """The whole search (resumable); returns the contents of ``search.json``, or
    ``{"complete": False, ...}`` when the time budget stopped it before every proxy ran."""
    import yaml

    out = Path(out)
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    sizes, cfg = _train_sizes(list(base))
    domains = sorted(sizes)
    if target != "average" and target not in domains:
        raise ConfigError(f"--target {target!r} is not allowed: give 'average' or one of the "
                          f"domains {', '.join(domains)}")
    out.mkdir(parents=True, exist_ok=True)
    W = _proposals(out, sizes, proxies, seed)
    overrides = [proxy_overrides(list(base), list(proxy_set), domains, w) for w in W]
    from ..train import load_config
    for o in overrides[:1]:
        load_config(None, o)  # a bad --set fails before any process starts
    status = train_proxies(out, overrides, workers, time_budget, log)
    left = [n for n, s in status.items() if s == "skipped"]
    if left:
        return {"complete": False, "finished": len(status) - len(left), "proxies": len(status)}
    rows, y, core_s, flops = [], [], 0.0, 0.0
    for i, w in enumerate(W):
        summary = json.loads((out / "proxies" / f"p{i:03d}" / "summary.json").read_text())
        pcfg = load_config(out / "proxies" / f"p{i:03d}" / "config.yaml")
        tokens = pcfg.train.steps * pcfg.train.batch_size * pcfg.train.grad_accum * pcfg.model.seq_len
        core_s += summary["wall_time_s"] * max(pcfg.train.threads, 1)
        flops += 6.0 * summary["params_active"] * tokens
        y.append(_target_value(summary["final"], target))
        rows.append({"name": f"p{i:03d}", "weights": dict(zip(domains, w.tolist())),
                     "target": y[-1], "val_bpb_by_domain": summary["final"]["val_bpb_by_domain"],
                     "wall_time_s": summary["wall_time_s"]})
    X, y = W, np.array(y)
    fit = fit_and_search(X, y, sizes, regressor, seed)
    config = _mixture_config(list(base), domains, fit["mixture"])
    tmp = out / "mixture.yaml.tmp"
    tmp.write_text(yaml.safe_dump(config, sort_keys=False))
    load_config(tmp)  # what we write must be a valid config
    os.replace(tmp, out / "mixture.yaml")
    res = {"complete": True, "target": target, "domains": domains, "proxies": len(W),
           "proxy_set": list(proxy_set), "prior": token_prior(sizes).tolist(),
           "observed": y.tolist(), "rows": rows, "fit": fit, "proxy_core_seconds": core_s,
           "proxy_train_flops": flops, "base": list(base), "seed": seed}
    _write_json_atomic(out / "search.json", res)
    (out / "search.md").write_text(_search_md(res))
    _plots(out, X, y, domains, fit, target)
    return res
