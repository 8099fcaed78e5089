"""Expert parallelism on gloo ranks equals the single-process layer (float64): outputs, input
gradients, every expert's weight gradient, router gradients after the data-parallel sum."""

import os

import pytest
import torch
import torch.distributed as dist

from divmoe.config import ConfigError
from divmoe.layer import MoE, MoEConfig
from divmoe.parallel import exchange, metered
from spawn import run_ranks

D = 8


def _a2a_worker(rank, world, out_dir):
    # rank r sends (r + 1)·s rows to rank s (rank 0 sends nothing to itself: a zero split)
    send = [(rank + 1) * s for s in range(world)]
    recv = [(r + 1) * rank for r in range(world)]
    x = (torch.arange(sum(send) * 2, dtype=torch.float64).view(-1, 2) + 1000 * rank)
    x.requires_grad_()
    with metered() as m:
        y = exchange(x, send, recv)
        (y * (rank + 1)).sum().backward()
    torch.save({"x": x.detach(), "y": y.detach(), "grad": x.grad,
                "meter": (m.calls, m.bytes_sent, m.bytes_received)},
               os.path.join(out_dir, f"{rank}.pt"))


@pytest.mark.parametrize("world", [2, 3])
def test_exchange_uneven_and_zero_splits_forward_and_backward(tmp_path, world):
    run_ranks(_a2a_worker, world, str(tmp_path))
    res = [torch.load(tmp_path / f"{r}.pt") for r in range(world)]
    for r in range(world):
        # what rank r received from s: rows of s's send block for r, in rank order
        expect = []
        for s in range(world):
            send_s = [(s + 1) * q for q in range(world)]
            lo = sum(send_s[:r])
            expect.append(res[s]["x"][lo:lo + send_s[r]])
        torch.testing.assert_close(res[r]["y"], torch.cat(expect))
        # a row sent to rank q gets gradient q + 1
        send = [(r + 1) * q for q in range(world)]
        grad = torch.cat([torch.full((n, 2), q + 1.0, dtype=torch.float64)
                          for q, n in enumerate(send)])
        torch.testing.assert_close(res[r]["grad"], grad)
        # the meter: forward and backward, rows to and from other ranks only, 2 × 8 bytes each
        off_rank_sent = sum(n for q, n in enumerate(send) if q != r)
        off_rank_recv = sum((s + 1) * r for s in range(world) if s != r)
        assert res[r]["meter"] == (
            2, 16 * (off_rank_sent + off_rank_recv), 16 * (off_rank_recv + off_rank_sent))


CASES = {
    "top2_shared": dict(top_k=2, num_shared_experts=1),  # shared experts replicated
    "top1": dict(top_k=1),
    "null_experts": dict(router="null_experts", num_null_experts=2, top_k=2),
    "hetero": dict(expert_widths=[4, 8, 4, 8, 12, 4, 8, 4]),
    "skewed": dict(top_k=2),          # every token to experts 0 and 1: one rank receives nothing
    "empty_expert": dict(top_k=1),    # expert 5 never chosen
}


def _layer(case, dispatch="grouped", group=None):
    torch.manual_seed(0)
    kw = dict(num_experts=8, expert_hidden=6, balance=[], dispatch=dispatch, **CASES[case])
    moe = MoE(D, MoEConfig(**kw), process_group=group).double()
    with torch.no_grad():
        w = moe.router.gate.weight
        if case == "skewed":
            w.zero_()
            w[:2] += 5.0 * torch.ones(D, dtype=torch.float64)
        if case == "empty_expert":
            w[5] = -100.0 * torch.sign(torch.ones(D, dtype=torch.float64))
    return moe


def _inputs(T):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, D, dtype=torch.float64, generator=g).abs() + 0.1  # skewed case: x > 0
    return x, torch.randn(T, D, dtype=torch.float64, generator=g)


def _shards(T, world):
    """Token ranges per rank: uneven, and the last rank has none."""
    cuts = [0] + [T * (i + 1) // (world - 1) for i in range(world - 1)] + [T]
    return [(cuts[r], cuts[r + 1]) for r in range(world)]


def _ep_worker(rank, world, T, out_dir):
    for case in CASES:  # one spawn for every case: process start-up dominates the cost
        moe = _layer(case, group=dist.group.WORLD)
        x_all, g_all = _inputs(T)
        lo, hi = _shards(T, world)[rank]
        x = x_all[lo:hi].clone().requires_grad_()
        out = moe(x)
        (out.output * g_all[lo:hi]).sum().backward()
        torch.save({"out": out.output.detach(), "grad_x": x.grad,
                    "params": {n: p.grad for n, p in moe.named_parameters()},
                    "counts": out.stats.tokens_per_expert},
                   os.path.join(out_dir, f"{case}-{rank}.pt"))


def _expert_grads(experts, grads):
    """Per expert of a layout, its weight gradients (a pair of tensors); ``grads`` maps the
    layer's parameter names to gradients (None, for a bucket no row reached, reads as 0)."""
    params = dict(experts.named_parameters(prefix="experts"))
    g = {n: grads[n] if grads[n] is not None else torch.zeros_like(params[n]) for n in params}
    if hasattr(experts, "w_in_EDH2"):
        gi, go = g["experts.w_in_EDH2"], g["experts.w_out_EHD"]
        return [(gi[e], go[e]) for e in range(gi.shape[0])]
    return [(g[f"experts.w_in.{b}"][j], g[f"experts.w_out.{b}"][j])
            for b, j in zip(experts.bucket_of, experts.local_of)]


@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_equals_single_process(tmp_path, world):
    T = 24
    run_ranks(_ep_worker, world, T, str(tmp_path))
    per_rank = 8 // world
    for case in CASES:
        res = [torch.load(tmp_path / f"{case}-{r}.pt") for r in range(world)]
        ref = _layer(case, dispatch="reference")
        x, g = _inputs(T)
        x.requires_grad_()
        out = ref(x)
        (out.output * g).sum().backward()
        torch.testing.assert_close(torch.cat([r["out"] for r in res]), out.output,
                                   rtol=1e-12, atol=1e-12, msg=case)
        torch.testing.assert_close(torch.cat([r["grad_x"] for r in res]), x.grad,
                                   rtol=1e-12, atol=1e-12, msg=case)
        ref_grads = {n: p.grad for n, p in ref.named_parameters()}
        ref_experts = _expert_grads(ref.experts, ref_grads)
        for r, rr in enumerate(res):  # every expert, from the rank that holds it
            shard = ref.experts.select(list(range(r * per_rank, (r + 1) * per_rank)))
            for e_loc, grads in enumerate(_expert_grads(shard, rr["params"])):
                for got, want in zip(grads, ref_experts[r * per_rank + e_loc]):
                    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=case)
        # replicated parameters (router, shared experts): the sum over ranks is the whole
        # batch's gradient
        for n in (n for n in ref_grads if n.startswith(("router.", "shared."))):
            torch.testing.assert_close(sum(rr["params"][n] for rr in res), ref_grads[n],
                                       rtol=1e-10, atol=1e-12, msg=f"{case} {n}")
        counts = sum(rr["counts"] for rr in res)
        if case == "skewed":  # the premise: some rank's experts got no tokens at all
            assert any(int(counts[r * per_rank:(r + 1) * per_rank].sum()) == 0
                       for r in range(world))
        if case == "empty_expert":
            assert int(counts[5]) == 0


def test_refused_settings_name_the_setting():
    from divmoe.parallel import check_expert_parallel

    with pytest.raises(ConfigError, match="moe.num_experts=6 .* 4 must divide"):
        check_expert_parallel(MoEConfig(num_experts=6), 4)
    with pytest.raises(ConfigError, match="router='soft_merge'"):
        check_expert_parallel(MoEConfig(router="soft_merge"), 2)
    with pytest.raises(ConfigError, match="diversity"):
        check_expert_parallel(MoEConfig(diversity=["exclusivity"]), 2)


def _balance_layer(group=None):
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=8, expert_hidden=6, top_k=2, aux_loss_scope="global_batch",
                    balance=["aux_loss", "loss_free_bias"], bias_update_rate=0.1)
    return MoE(D, cfg, process_group=group).double()


def _balance_worker(rank, world, T, out_dir):
    moe = _balance_layer(dist.group.WORLD)
    x_all, _ = _inputs(T)
    per = T // world
    micro = [x_all[:T // 2], x_all[T // 2:]]  # two micro-batches, each split over the ranks
    moe.begin_step()
    losses = []
    for mb in micro:
        n = mb.shape[0] // world
        out = moe(mb[rank * n:(rank + 1) * n])
        losses.append(out.stats.losses["aux_loss"])
    moe.update_balancers()
    torch.save({"aux": losses, "bias": moe.selection_bias_E.clone(), "per": per},
               os.path.join(out_dir, f"{rank}.pt"))


def test_balance_state_is_global_across_ranks(tmp_path):
    """The Balancer's one reduction: global-batch counts and the loss-free bias's loads are
    summed over ranks, so the bias moves identically everywhere and equals the single-process
    bias, and the mean of the ranks' global-batch aux losses is the whole batch's."""
    world, T = 2, 24
    run_ranks(_balance_worker, world, T, str(tmp_path))
    res = [torch.load(tmp_path / f"{r}.pt") for r in range(world)]
    ref = _balance_layer()
    x_all, _ = _inputs(T)
    ref.begin_step()
    ref_aux = [ref(mb).stats.losses["aux_loss"] for mb in (x_all[:T // 2], x_all[T // 2:])]
    ref.update_balancers()
    for rr in res:
        torch.testing.assert_close(rr["bias"], ref.selection_bias_E, rtol=0, atol=0)
    assert float(ref.selection_bias_E.abs().sum()) > 0  # the bias did move
    for j in range(2):  # f from the step's counts so far on all ranks, P per rank: mean = whole
        mean_aux = sum(rr["aux"][j] for rr in res) / world
        torch.testing.assert_close(mean_aux.double(), ref_aux[j].double(), rtol=1e-6, atol=1e-7)
