"""How close `divmoe train` on several gloo ranks comes to the single-process run: the largest
relative difference of every logged metric and of every weight after the tiny run of
tests/test_distributed_train.py, for dp2, ep2, ep2×dp2 and a torchrun launch.

    python benchmarks/distributed_tolerances.py      # ~2 minutes on 2 cores
"""
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from spawn import run_ranks  # noqa: E402
from test_distributed_train import (TINY, _flat, _free_port, _metrics, _train_rank,  # noqa: E402
                                    _weights)

from divmoe.train import load_config, train  # noqa: E402

KEYS = ("train_loss", "val_loss", "val_bpb", "val_bpb_by_domain", "max_vio", "expert_load",
        "expert_vendi")


def _rel(a, b):
    a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return float(((a - b).abs() / b.abs().clamp_min(1e-12)).max()) if a.numel() else 0.0


def compare(single, run):
    m, s = _metrics(run), _metrics(single)
    metric = max(_rel(_flat(ra[k]), _flat(rb[k])) for ra, rb in zip(m, s) for k in KEYS
                 if ra[k] is not None)
    w, ws = _weights(run), _weights(single)
    weight = max(float((w[k] - ws[k]).abs().max()) for k in ws)
    return metric, weight


def main():
    tmp = Path(tempfile.mkdtemp())
    single = tmp / "single"
    train(single, load_config(None, TINY), progress=False, report=False)
    rows = []
    for name, world, expert in (("dp2", 2, 1), ("ep2", 2, 2), ("ep2×dp2", 4, 2)):
        run = tmp / name
        run_ranks(_train_rank, world, str(run), TINY + [f"parallel.expert={expert}"], False,
                  None, timeout_s=300)
        rows.append((name, *compare(single, run)))
    run = tmp / "torchrun"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "divmoe",
           "train", "--out", str(run), "--quiet"]
    for s in TINY + ["parallel.expert=2"]:
        cmd += ["--set", s]
    subprocess.run(cmd, check=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    rows.append(("torchrun ep2", *compare(single, run)))
    print("| run | max relative difference of a metric | max abs difference of a weight |")
    print("|---|---|---|")
    for name, metric, weight in rows:
        print(f"| {name} | {metric:.1e} | {weight:.1e} |")


if __name__ == "__main__":
    main()
