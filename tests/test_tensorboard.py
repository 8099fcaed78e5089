"""TensorBoard scalars beside metrics.jsonl: the same numbers, and a resume leaves no
duplicate steps."""

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from divmoe.report.html import read_metrics
from divmoe.train import load_config, train
from test_train import TINY


def scalars(run):
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_scalars_equal_metrics_and_survive_a_resume(tmp_path):
    cfg = load_config(None, TINY)
    run = tmp_path / "run"
    train(run, cfg, progress=False, stop_after=6)       # evaluations at steps 0 and 4
    train(run, None, resume=True, progress=False)       # continues from the step-4 checkpoint
    rows = read_metrics(run / "metrics.jsonl")
    got = scalars(run)
    steps = [r["step"] for r in rows]
    assert [s for s, _ in got["val_bpb/all"]] == steps == [0, 4, 8, 12]
    for tag, key in (("val_bpb/all", "val_bpb"), ("lr", "lr")):
        assert [v for _, v in got[tag]] == pytest.approx([r[key] for r in rows], rel=1e-6)
    domain = sorted(rows[-1]["val_bpb_by_domain"])[0]
    assert got[f"val_bpb/{domain}"][-1][1] == pytest.approx(rows[-1]["val_bpb_by_domain"][domain])
    assert got["max_vio/layer1"][-1][1] == pytest.approx(rows[-1]["max_vio_by_layer"][1])
    assert got["expert_load/layer0/expert3"][-1][1] == pytest.approx(rows[-1]["expert_load"][0][3])
    assert [s for s, _ in got["loss/train"]] == [4, 8, 12]  # no training loss before step 1
