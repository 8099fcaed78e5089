"""`divmoe train` on several gloo ranks equals the single-process run: data parallelism,
expert parallelism and both, checkpoints moved between world sizes, and torchrun itself."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from divmoe.config import ConfigError
from divmoe.models import MoETransformer
from divmoe.train import load_config, train
from divmoe.train.checkpoint import load_weights

from spawn import run_ranks

# Tiny, but every balance state that crosses ranks is on: global-batch aux counts (all-reduced
# at every micro-batch), the loss-free bias, z-loss; two micro-batches per step.
TINY = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.seq_len=32",
        "moe.num_experts=4", "moe.expert_hidden=32", "moe.top_k=2",
        "moe.balance=[aux_loss,z_loss,loss_free_bias]", "moe.aux_loss_scope=global_batch",
        "train.steps=4", "train.batch_size=4", "train.grad_accum=2", "train.eval_every=2",
        "train.eval_batch_size=8", "data.val_bytes_per_domain=1024", "train.threads=1",
        "train.warmup_steps=1"]
COMPARED = ("train_loss", "val_loss", "val_bpb", "val_bpb_by_domain", "max_vio",
            "max_vio_by_layer", "expert_load", "activated_params_mean", "expert_vendi", "lr")


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _assert_same_metrics(a, b, rel=2e-4):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in COMPARED:
            va, vb = ra[key], rb[key]
            if va is None:
                assert vb is None, key
                continue
            ta, tb = torch.tensor(_flat(va), dtype=torch.float64), torch.tensor(_flat(vb),
                                                                               dtype=torch.float64)
            assert torch.allclose(ta, tb, rtol=rel, atol=1e-6), (ra["step"], key, va, vb)


def _flat(v):
    if isinstance(v, dict):
        return [x for k in sorted(v) for x in _flat(v[k])]
    if isinstance(v, list):
        return [x for item in v for x in _flat(item)]
    return [float(v)]


def _weights(run, settings=TINY):
    cfg = load_config(None, settings)
    model = MoETransformer(cfg.model, cfg.moe)
    load_weights(run / "checkpoint", model)
    return model.state_dict()


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    run = tmp_path_factory.mktemp("single") / "run"
    train(run, load_config(None, TINY), progress=False, report=False)
    return run


def _train_rank(rank, world, out, settings, resume, stop_after):
    train(out, load_config(None, settings) if settings is not None else None, resume=resume,
          progress=False, report=False, stop_after=stop_after)


@pytest.mark.parametrize("world,expert", [(2, 1), (2, 2), (4, 2)],
                         ids=["dp2", "ep2", "ep2xdp2"])
def test_distributed_run_equals_single_process(single, tmp_path, world, expert):
    run = tmp_path / "run"
    run_ranks(_train_rank, world, str(run), TINY + [f"parallel.expert={expert}"], False, None,
              timeout_s=240)
    _assert_same_metrics(_metrics(run), _metrics(single))
    want, got = _weights(single), _weights(run)
    assert want.keys() == got.keys()
    for k in want:  # every expert's weights stored under its global id, as one process stores them
        assert torch.allclose(got[k], want[k], rtol=1e-4, atol=1e-6), k
    summary = json.loads((run / "summary.json").read_text())
    assert summary["params_total"] == json.loads((single / "summary.json").read_text())["params_total"]
    # the exchanged bytes are logged under expert parallelism: in each of the 2 layers every
    # slot's row (k=2 per token, d=32 fp32 values) goes out and back in forward and again in
    # backward; a slot whose expert is local stays, so 2·4·k·d·4 bytes per token bound it
    exchanged = [r["all_to_all_bytes_per_token"] for r in _metrics(run)[1:]]
    if expert == 1:
        assert exchanged == [None] * len(exchanged)
    else:
        upper = 2 * 4 * 2 * 32 * 4 + 1  # + the count exchanges: 0.5 bytes per token here
        assert all(0.25 * upper < b <= upper for b in exchanged), exchanged


def test_checkpoint_moves_between_world_sizes(single, tmp_path):
    """Stopped at step 2 on 2 expert-parallel ranks, resumed on 1 and on 4 ranks: both runs
    end where the uninterrupted single-process run ends."""
    for world, expert in ((1, 1), (4, 4)):
        run = tmp_path / f"w{world}"
        run_ranks(_train_rank, 2, str(run), TINY + ["parallel.expert=2"], False, 2, timeout_s=240)
        assert _metrics(run)[-1]["step"] == 2
        resumed = TINY + [f"parallel.expert={expert}"]
        if world == 1:
            train(run, load_config(None, resumed), resume=True, progress=False, report=False)
        else:
            run_ranks(_train_rank, world, str(run), resumed, True, None, timeout_s=240)
        _assert_same_metrics(_metrics(run), _metrics(single))
        want, got = _weights(single), _weights(run)
        for k in want:
            assert torch.allclose(got[k], want[k], rtol=1e-4, atol=1e-6), (world, k)


def _sharded_logits(rank, world, run, out_file):
    """Load a single-process checkpoint, shard the experts over the ranks and score a batch
    split across them; rank 0 saves the gathered logits."""
    cfg = load_config(None, TINY)
    model = MoETransformer(cfg.model, cfg.moe)
    load_weights(os.path.join(run, "checkpoint"), model)
    model.shard_experts(dist.group.WORLD)
    tokens = torch.arange(8 * 32).remainder(251).view(8, 32)
    with torch.no_grad():
        logits = model(tokens.tensor_split(world)[rank]).logits
    parts = [torch.empty_like(logits) for _ in range(world)]
    dist.all_gather(parts, logits)
    if rank == 0:
        torch.save(torch.cat(parts), out_file)


def test_checkpoint_loads_at_another_world_size_with_identical_outputs(single, tmp_path):
    cfg = load_config(None, TINY)
    model = MoETransformer(cfg.model, cfg.moe)
    load_weights(single / "checkpoint", model)
    with torch.no_grad():
        want = model(torch.arange(8 * 32).remainder(251).view(8, 32)).logits
    for world in (2, 4):
        out = tmp_path / f"logits{world}.pt"
        run_ranks(_sharded_logits, world, str(single), str(out))
        assert torch.allclose(torch.load(out), want, rtol=1e-5, atol=1e-6), world


def _resume_expecting_error(rank, world, out, settings, err_file):
    try:
        train(out, load_config(None, settings), resume=True, progress=False, report=False)
    except ConfigError as exc:
        with open(f"{err_file}.{rank}", "w") as fh:
            fh.write(str(exc))


def test_a_layout_that_cannot_hold_the_experts_is_refused(single, tmp_path):
    err = tmp_path / "err"
    run_ranks(_resume_expecting_error, 3, str(single), TINY + ["parallel.expert=3"], str(err))
    for rank in range(3):  # every rank stops with the same message, none waits for the others
        msg = (tmp_path / f"err.{rank}").read_text()
        assert "num_experts=4" in msg and "3 ranks" in msg


def _train_expecting_error(rank, world, out, settings, err_file):
    try:
        train(out, load_config(None, settings), progress=False, report=False)
    except (ConfigError, ValueError) as exc:
        with open(f"{err_file}.{rank}", "w") as fh:
            fh.write(str(exc))


def test_uneven_batch_shards_are_refused(tmp_path):
    err = tmp_path / "err"
    run_ranks(_train_expecting_error, 3, str(tmp_path / "run"), TINY, str(err))
    for rank in range(3):
        assert "train.batch_size=4 must be divisible by the 3 ranks" in (
            tmp_path / f"err.{rank}").read_text()


def test_expert_parallelism_without_ranks_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="torchrun --nproc-per-node 2"):
        train(tmp_path / "run", load_config(None, TINY + ["parallel.expert=2"]), progress=False)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_end_to_end_equals_single_process(single, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
           "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port",
           str(_free_port()), "-m", "divmoe", "train", "--out", str(run), "--quiet"]
    for s in TINY + ["parallel.expert=2"]:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same_metrics(_metrics(run), _metrics(single))
    assert (run / "report.html").is_file()
    assert proc.stdout.count("report:") == 1, proc.stdout  # rank 0 speaks for the run
