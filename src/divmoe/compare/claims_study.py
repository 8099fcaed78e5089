"""Run the seed-claims study (:mod:`.seed_claims`): every variant × seed as a resumable run in
parallel single-thread processes, then the final evaluation of each run, then the page.

Resumable and time-boxed: each invocation trains what is not finished (an interrupted run
resumes from its last checkpoint), starts nothing new after ``budget`` seconds, and may be
repeated until it reports every run complete. A finished run's records (config, metrics,
summary, final evaluation: no checkpoints) are mirrored to ``records`` as soon as it ends, so a
study can be committed run by run and continued from them on another machine.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import multiprocessing
import shutil
import time
from pathlib import Path

from ..files import atomic_write_text, check_output_folder
from .runner import Variant, _finished, specialization_mi, train_variant
from .seed_claims import DEFAULT_SEEDS, FULL_VALIDATION_BYTES, PRESETS, variants

FINAL_EVAL = "final_eval.json"
RECORD_FILES = ("config.yaml", "metrics.jsonl", "summary.json", FINAL_EVAL)
INVOCATIONS = "invocations.jsonl"


def jobs(preset: str, seeds: int) -> list[tuple[str, list[str]]]:
    """(run name, overrides) of every run, seed-major: a study stopped early has whole seeds."""
    return [(f"{v.name}-s{seed}", PRESETS[preset] + v.overrides + [f"train.seed={seed}"])
            for seed in range(seeds) for v in variants(preset)]


def final_evaluation(run: Path, max_bytes_per_domain: int) -> dict:
    """The run's last two checkpoints (its last two evaluations) scored on the validation split
    (``max_bytes_per_domain`` of each domain: all of it in the study) and averaged; written to
    ``run/final_eval.json`` once, read back after."""
    import torch

    from ..data.mixture import validation_set
    from ..data.tokenizer import run_tokenizer
    from ..data.user_corpus import load_splits
    from ..models import MoETransformer
    from ..train.checkpoint import STATE, checkpoint_candidates, load_weights
    from ..train.config import load_config
    from ..train.loop import evaluate, training_device

    path = run / FINAL_EVAL
    if path.is_file():
        return json.loads(path.read_text())
    cfg = load_config(run / "config.yaml")
    tokenizer = run_tokenizer(run, cfg.data)
    _, val_docs = load_splits(cfg.data.corpus, cfg.model.seq_len, cfg.data.val_fraction)
    val = validation_set(val_docs, cfg.model.seq_len, max_bytes_per_domain, tokenizer)
    model = MoETransformer(cfg.model, cfg.moe).to(training_device(cfg.parallel.device))
    rows = []
    for ckpt in checkpoint_candidates(run)[:2]:
        load_weights(ckpt, model)
        step = int(torch.load(ckpt / STATE, weights_only=True, map_location="cpu")["step"])
        ev = evaluate(model, val, cfg.train.eval_batch_size, token_bytes=tokenizer.token_bytes)
        rows.append({"step": step, **ev.row, "mi_bits": specialization_mi(ev.routing)})
    result = {"steps": [r["step"] for r in rows],
              "val_tokens": sum(int(w[:, 1:].numel()) for w in val.values()),
              "val_bytes": sum(int(tokenizer.token_bytes[w[:, 1:]].sum()) for w in val.values()),
              "mean": _mean_rows(rows), "rows": rows}
    atomic_write_text(path, json.dumps(result, indent=1))
    return result


def _mean_rows(rows: list[dict]) -> dict:
    out = {}
    for key, value in rows[0].items():
        if key == "step":
            continue
        if isinstance(value, (int, float)) and all(isinstance(r.get(key), (int, float)) for r in rows):
            out[key] = sum(r[key] for r in rows) / len(rows)
        elif isinstance(value, dict) and all(isinstance(r.get(key), dict) for r in rows):
            out[key] = {k: sum(r[key][k] for r in rows) / len(rows) for k in value}
    return out


def run_complete(run: Path, steps: int) -> bool:
    return _finished(run, steps) and (run / FINAL_EVAL).is_file()


def _restore(out: Path, records: Path | None) -> int:
    """Copy finished runs' records into ``out`` (a study continued on a fresh machine)."""
    if records is None or not records.is_dir():
        return 0
    n = 0
    for rec in sorted(p for p in records.iterdir() if (p / FINAL_EVAL).is_file()):
        dest = out / rec.name
        if not (dest / FINAL_EVAL).is_file():
            dest.mkdir(parents=True, exist_ok=True)
            for name in RECORD_FILES:
                shutil.copy2(rec / name, dest / name)
            n += 1
    return n


def _mirror(run: Path, records: Path | None) -> None:
    if records is None:
        return
    dest = records / run.name
    dest.mkdir(parents=True, exist_ok=True)
    for name in RECORD_FILES:
        shutil.copy2(run / name, dest / name)


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def _run_one(out: str, name: str, overrides: list[str], full_bytes: int, deadline: float,
             records: str | None) -> tuple[str, float]:
    from ..train.config import load_config

    run, t0 = Path(out) / name, time.time()
    steps = load_config(None, overrides).train.steps
    if run_complete(run, steps):
        return "done", 0.0
    if time.time() > deadline and not _finished(run, steps):
        return "skipped", 0.0
    how = train_variant(Path(out), Variant(name, overrides), report=False)
    final_evaluation(run, full_bytes)
    _mirror(run, Path(records) if records else None)
    return how, time.time() - t0


def run_study(out: str | Path, preset: str = "cpu", seeds: int | None = None, workers: int = 2,
              budget: float | None = None, records: str | Path | None = None,
              report_only: bool = False, log=print, docs: Path | None = None,
              command: str = "") -> dict:
    """Train and evaluate what is missing (see the module docstring), then write
    ``OUT/summary.md``, ``OUT/results.json`` and the curves (and ``docs``, the documentation
    page, with ``command`` quoted on it); returns the results."""
    if preset not in PRESETS:
        raise ValueError(f"preset {preset!r} is not allowed: expected one of {', '.join(PRESETS)}")
    seeds = DEFAULT_SEEDS[preset] if seeds is None else seeds
    if seeds < 2:
        raise ValueError(f"seeds={seeds}: a paired interval needs at least 2 seeds")
    if workers < 1:
        raise ValueError(f"workers={workers}: expected an int >= 1")
    out = check_output_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    records = Path(records) if records else None
    restored = _restore(out, records)
    if restored:
        log(f"restored {restored} finished runs from {records}")
    todo = jobs(preset, seeds)
    if not report_only:
        t_start, trained = time.time(), 0
        deadline = t_start + (budget if budget is not None else float("inf"))
        ctx = multiprocessing.get_context("spawn")
        try:
            with cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker) as pool:
                futures = {pool.submit(_run_one, str(out), name, o, FULL_VALIDATION_BYTES[preset],
                                       deadline, str(records) if records else None): name
                           for name, o in todo}
                for f in cf.as_completed(futures):
                    how, seconds = f.result()
                    if how not in ("done", "skipped"):
                        trained += 1
                        log(f"{futures[f]}: {how} in {seconds:.0f} s")
        finally:  # the study's wall time is the sum of its invocations'
            with open(out / INVOCATIONS, "a") as fh:
                fh.write(json.dumps({"start": t_start, "end": time.time(), "workers": workers,
                                     "runs_finished": trained}) + "\n")
    steps = int(dict(kv.split("=", 1) for kv in PRESETS[preset])["train.steps"])
    complete = [name for name, _ in todo if run_complete(out / name, steps)]
    log(f"{len(complete)} of {len(todo)} runs complete")
    from .claims_report import write_report

    result = write_report(out, preset, seeds, complete, docs=docs, command=command)
    result["complete"] = len(complete) == len(todo)
    return result
