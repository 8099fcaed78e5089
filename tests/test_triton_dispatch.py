"""dispatch=triton against the reference loop: outputs and every gradient (input, routing
weights, each expert weight), across edge cases, widths and dtypes.

Without a GPU the kernels run under Triton's CPU interpreter (tests/conftest.py sets
TRITON_INTERPRET=1): that checks the indexing, masking, fusion and the backward's algebra
at small shapes; it does not check GPU compilation, bf16 tensor-core rounding (the kernels
widen bf16 to fp32 there, the interpreter's bf16 ``tl.dot`` being wrong) or the GPU's
autotuning configs. tests/test_cuda.py runs the same layer on a GPU.
"""

import copy
import importlib
import os

import pytest
import torch

if os.environ.get("CI") == "true":  # .ci/run installs the dev extra: no triton must fail there
    importlib.import_module("triton")
else:
    pytest.importorskip("triton", reason="dispatch=triton needs the triton package (the dev "
                                         "extra installs it)")

from divmoe import dispatch as dispatch_pkg  # noqa: E402
from divmoe.config import ConfigError  # noqa: E402
from divmoe.dispatch import dispatch_combine, reference_dispatch_combine  # noqa: E402
from divmoe.dispatch import triton_kernels  # noqa: E402
from divmoe.dispatch.triton_swiglu import triton_dispatch_combine  # noqa: E402
from divmoe.experts import HeteroSwiGLU, StackedSwiGLU  # noqa: E402
from divmoe.layer import MoE, MoEConfig  # noqa: E402
from divmoe.routing import RoutingPlan  # noqa: E402
from equivalence import assert_same_forward_backward  # noqa: E402
from host_reads import count_host_reads  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def plan_for(ids, weights, E):
    T = ids.shape[0]
    return RoutingPlan(ids, weights, torch.full((T, E), 1 / E, device=ids.device),
                       torch.zeros(T, E, device=ids.device))


def run(fn, experts, ids, x, w, **kw):
    """fn's output and the gradients of a fixed random projection of it: input, routing
    weights, then each expert parameter (None where it got none)."""
    experts.to(DEVICE).zero_grad(set_to_none=True)
    x, w = x.to(DEVICE).clone().requires_grad_(), w.to(DEVICE).clone().requires_grad_()
    y = fn(x, plan_for(ids.to(DEVICE), w, len(experts.expert_sizes())), experts, **kw)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(y)
    (y * g).sum().backward()
    return [y.detach(), x.grad, w.grad] + [p.grad for p in experts.parameters()]


def assert_matches_reference(experts, ids, d, dtype=torch.float32, atol=1e-5, rtol=1e-5, **kw):
    """Triton in ``dtype`` against the reference loop in float32 on the same (rounded) values."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(ids.shape[0], d, generator=gen).to(DEVICE, dtype)
    w = torch.rand(ids.shape, generator=gen).to(DEVICE, dtype)
    ids = ids.to(DEVICE)
    experts = experts.to(DEVICE, dtype)
    got = run(triton_dispatch_combine, experts, ids, x, w, **kw)
    ref = run(reference_dispatch_combine, copy.deepcopy(experts).float(), ids, x.float(),
              w.float())
    names = ["output", "grad x", "grad weights"] + [n for n, _ in experts.named_parameters()]
    for name, a, b in zip(names, got, ref):
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == dtype, name
            torch.testing.assert_close(a.float(), b, atol=atol, rtol=rtol, msg=name)
    return got


# Empty slots (dropped / null), a token with both slots on one expert, expert 1 unchosen.
IDS = torch.tensor([[0, -1], [2, 3], [-1, -1], [3, 3], [0, 2], [2, 0], [4, 3]])


@pytest.mark.parametrize("layout", ["stacked", "hetero"])
def test_matches_reference_with_empty_slots_and_an_unchosen_expert(layout):
    torch.manual_seed(0)
    experts = StackedSwiGLU(5, 12, 7) if layout == "stacked" else \
        HeteroSwiGLU([3, 1, 3, 2, 1], 12)  # buckets interleaved in id; bucket 1: expert 1 + 4
    got = assert_matches_reference(experts, IDS, 12)
    if layout == "stacked":  # the unchosen expert's gradient is written, and zero
        assert torch.equal(got[3][1], torch.zeros_like(got[3][1]))


def test_one_token():
    torch.manual_seed(1)
    assert_matches_reference(StackedSwiGLU(4, 8, 5), torch.tensor([[2, 0]]), 8)


def test_all_tokens_on_one_expert_over_several_row_and_column_tiles():
    """40 rows on one expert: three 16-row tiles, the last partial; H = 40: three column
    tiles of ∂s, so the routing-weight gradient sums partials; d = 33: a partial K tile."""
    torch.manual_seed(2)
    ids = torch.full((40, 1), 3)
    assert_matches_reference(StackedSwiGLU(6, 33, 40), ids, 33, atol=1e-4, rtol=1e-4)


def test_odd_widths_and_random_routing():
    torch.manual_seed(3)
    ids = torch.randint(-1, 7, (37, 3), generator=torch.Generator().manual_seed(3))
    assert_matches_reference(HeteroSwiGLU([5, 17, 5, 1, 9, 17, 3], 13), ids, 13, atol=1e-4,
                             rtol=1e-4)


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_half_precision_close_to_float32_reference(dtype, tol):
    torch.manual_seed(4)
    ids = torch.randint(0, 5, (24, 2), generator=torch.Generator().manual_seed(4))
    assert_matches_reference(StackedSwiGLU(5, 16, 12), ids, 16, dtype, atol=tol, rtol=tol)


def test_recompute_hidden_equals_saved_hidden():
    torch.manual_seed(5)
    experts = HeteroSwiGLU([3, 6, 3], 8)
    ids = torch.randint(-1, 3, (9, 2), generator=torch.Generator().manual_seed(5))
    x, w = torch.randn(9, 8), torch.rand(9, 2)
    saved = run(triton_dispatch_combine, experts, ids, x, w)
    again = run(triton_dispatch_combine, experts, ids, x, w, recompute_hidden=True)
    for a, b in zip(saved, again):
        assert torch.equal(a, b)


def test_second_backward_through_a_retained_graph():
    experts = StackedSwiGLU(5, 8, 4).to(DEVICE)
    x = torch.randn(7, 8, device=DEVICE, requires_grad=True)
    w = torch.rand(7, 2, device=DEVICE, requires_grad=True)
    y = triton_dispatch_combine(x, plan_for(IDS.to(DEVICE), w, 5), experts)
    y.sum().backward(retain_graph=True)
    first = [t.grad.clone() for t in (x, w, *experts.parameters())]
    y.sum().backward()
    for a, t in zip(first, (x, w, *experts.parameters())):
        torch.testing.assert_close(t.grad, 2 * a)


def test_frozen_experts_and_constant_weights_get_only_the_input_gradient():
    experts = StackedSwiGLU(5, 8, 4).requires_grad_(False).to(DEVICE)
    w = torch.rand(7, 2, device=DEVICE)
    grads = []
    for fn in (triton_dispatch_combine, reference_dispatch_combine):
        x = torch.randn(7, 8, generator=torch.Generator().manual_seed(9)).to(DEVICE)
        fn(x.requires_grad_(), plan_for(IDS.to(DEVICE), w, 5), experts).square().sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(*grads)
    assert all(p.grad is None for p in experts.parameters())


def test_all_slots_empty_and_no_tokens():
    experts = StackedSwiGLU(3, 4, 2).to(DEVICE)
    x = torch.randn(2, 4, device=DEVICE)
    ids = torch.full((2, 2), -1, device=DEVICE)
    zeros = torch.zeros(2, 2, device=DEVICE)
    assert torch.equal(triton_dispatch_combine(x, plan_for(ids, zeros, 3), experts),
                       torch.zeros_like(x))
    assert triton_dispatch_combine(x[:0], plan_for(ids[:0], zeros[:0], 3),
                                   experts).shape == (0, 4)


def test_other_row_tile_sizes(monkeypatch):
    """The in-kernel tile → expert lookup and the ∂w partial-sum width follow the config:
    a 32-row, 16-column tile with experts of 0..41 rows."""
    monkeypatch.setattr(triton_kernels, "_device_configs",
                        lambda device: [triton_kernels.triton.Config(
                            {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 32}, num_warps=1)])
    torch.manual_seed(6)
    ids = torch.cat([torch.full((41, 1), 1), torch.full((5, 1), 3), torch.full((33, 1), 0)])
    assert_matches_reference(StackedSwiGLU(5, 20, 24), ids, 20, atol=1e-4, rtol=1e-4)


def test_autotuning_between_configs_keeps_every_bucket_s_rows(monkeypatch):
    """Two configs: each launch is timed once per config before the pick, on outputs shared by
    the width buckets (the slot rows) and on ∂w partial sums that must restart at zero."""
    monkeypatch.setattr(triton_kernels, "_device_configs", lambda device: [
        triton_kernels.triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": 16}, num_warps=1)
        for m, n in ((16, 16), (32, 32))])
    torch.manual_seed(10)
    ids = torch.randint(0, 4, (20, 2), generator=torch.Generator().manual_seed(10))
    assert_matches_reference(HeteroSwiGLU([6, 40, 6, 40], 16), ids, 16, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kw", [
    dict(num_experts=6, top_k=2, expert_hidden=5),
    dict(num_experts=4, top_k=2, expert_widths=[3, 7, 3, 5], num_shared_experts=1),
    dict(router="null_experts", num_experts=4, num_null_experts=2, top_k=2, expert_hidden=6),
])
def test_layer_matches_reference_layer(kw):
    torch.manual_seed(7)
    fast = MoE(10, MoEConfig(dispatch="triton", **kw))
    ref = MoE(10, MoEConfig(dispatch="reference", **kw))
    ref.load_state_dict(fast.state_dict())
    fast, ref = fast.to(DEVICE), ref.to(DEVICE)
    assert_same_forward_backward(fast, ref, torch.randn(2, 9, 10, device=DEVICE), atol=1e-5,
                                 rtol=1e-5)


def test_forward_backward_read_only_the_row_counts():
    moe = MoE(10, MoEConfig(dispatch="triton", num_experts=4, expert_widths=[3, 7, 3, 5]))
    moe.to(DEVICE)
    x = torch.randn(12, 10, device=DEVICE, requires_grad=True)
    moe(x)
    with count_host_reads() as where:
        out = moe(x)
        (out.output.square().mean() + out.aux_loss).backward()
    ours = {k: n for k, n in where.items() if k.startswith("divmoe/")}  # not the interpreter's
    assert ours == {next(k for k in ours if k.startswith("divmoe/dispatch/grouped.py")): 1}, ours
    assert next(iter(ours)).endswith("tolist")


def test_refuses_what_it_cannot_run(monkeypatch):
    with pytest.raises(ConfigError, match="dispatch='triton' is not allowed.*lora"):
        MoE(4, MoEConfig(dispatch="triton", expert_layout="lora"))
    with pytest.raises(ConfigError, match="dispatch='triton' is not allowed.*soft_merge"):
        MoE(4, MoEConfig(dispatch="triton", router="soft_merge"))
    with pytest.raises(ValueError, match="float32, bfloat16 and float16.*float64"):
        triton_dispatch_combine(torch.randn(7, 4, dtype=torch.float64, device=DEVICE),
                                plan_for(IDS.to(DEVICE), torch.rand(7, 2, device=DEVICE), 5),
                                StackedSwiGLU(5, 4, 3).to(DEVICE, torch.float64))
    monkeypatch.setattr(triton_kernels, "interpreting", lambda: False)
    monkeypatch.setattr("divmoe.dispatch.triton_swiglu.interpreting", lambda: False)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="runs on CUDA tensors, got a cpu input"):
            MoE(4, MoEConfig(dispatch="triton"))(torch.randn(3, 4))


def test_missing_triton_is_a_config_error_naming_the_extra(monkeypatch):
    monkeypatch.setattr(dispatch_pkg, "triton_installed", lambda: False)
    dispatch_pkg._triton_execution.cache_clear()
    try:
        with pytest.raises(ConfigError, match=r"needs the triton package.*divmoe\[gpu\]"):
            MoE(4, MoEConfig(dispatch="triton"))
        # auto does not need it: it is the grouped path then.
        assert MoE(4, MoEConfig(dispatch="auto")).execute is dispatch_combine
    finally:
        dispatch_pkg._triton_execution.cache_clear()


@pytest.mark.parametrize("kw", [dict(), dict(expert_widths=[3, 5, 3, 5]),
                                dict(recompute_hidden=True)])
def test_auto_on_cpu_is_the_grouped_path_bit_for_bit(kw):
    x = torch.randn(2, 5, 8)
    outs = []
    for dispatch in ("grouped", "auto"):
        torch.manual_seed(8)
        moe = MoE(8, MoEConfig(dispatch=dispatch, num_experts=4, expert_hidden=5, **kw))
        xx = x.clone().requires_grad_()
        out = moe(xx)
        (out.output.square().sum() + out.aux_loss).backward()
        outs.append([out.output, xx.grad] + [p.grad for p in moe.parameters()])
    for a, b in zip(*outs):
        assert torch.equal(a, b)


EP_CASES = {"hetero": dict(expert_widths=[4, 8, 4, 8]),
            "null_experts": dict(router="null_experts", num_null_experts=2, expert_hidden=6),
            "skewed": dict(expert_hidden=6)}  # every token to experts 0 and 1: rank 1 gets none


def _ep_layer(case, group=None, dispatch="triton"):
    torch.manual_seed(0)
    moe = MoE(8, MoEConfig(num_experts=4, top_k=2, balance=[], dispatch=dispatch,
                           **EP_CASES[case]), process_group=group)
    if case == "skewed":
        with torch.no_grad():
            moe.router.gate.weight.zero_()
            moe.router.gate.weight[:2] = 5.0
    return moe


def _ep_worker(rank, world, out_dir):
    import torch.distributed as dist
    for case in EP_CASES:
        moe = _ep_layer(case, group=dist.group.WORLD)
        x_all = torch.randn(10, 8, generator=torch.Generator().manual_seed(1)).abs() + 0.1
        x = x_all[5 * rank:5 * rank + 5].clone().requires_grad_()
        out = moe(x)
        out.output.square().sum().backward()
        torch.save({"out": out.output.detach(), "grad_x": x.grad,
                    "grads": {n: p.grad for n, p in moe.named_parameters()}},
                   f"{out_dir}/{case}-{rank}.pt")


def test_triton_as_the_local_execution_under_expert_parallelism(tmp_path):
    """Two gloo ranks, two experts each, the triton kernels on each rank's received rows
    (none at all on one rank in the skewed case) against the single-process reference."""
    from spawn import run_ranks
    run_ranks(_ep_worker, 2, str(tmp_path))
    for case in EP_CASES:
        res = [torch.load(tmp_path / f"{case}-{r}.pt") for r in range(2)]
        ref = _ep_layer(case, dispatch="reference")
        x = (torch.randn(10, 8, generator=torch.Generator().manual_seed(1)).abs() + 0.1)
        x.requires_grad_()
        out = ref(x)
        out.output.square().sum().backward()
        torch.testing.assert_close(torch.cat([r["out"] for r in res]), out.output, atol=1e-5,
                                   rtol=1e-5, msg=case)
        torch.testing.assert_close(torch.cat([r["grad_x"] for r in res]), x.grad, atol=1e-5,
                                   rtol=1e-5, msg=case)
        want = _per_expert(ref.experts, {n: p.grad for n, p in ref.named_parameters()})
        for r, rr in enumerate(res):  # each expert's gradients, from the rank holding it
            shard = ref.experts.select([2 * r, 2 * r + 1])
            for e, got in enumerate(_per_expert(shard, rr["grads"])):
                for a, b in zip(got, want[2 * r + e]):
                    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=case)


def _per_expert(experts, grads):
    """(∂w_in, ∂w_out) of each expert of a layout, from the layer's parameter-name → gradient
    map (a bucket no row reached has None: zero)."""
    params = dict(experts.named_parameters(prefix="experts"))
    g = {n: grads[n] if grads[n] is not None else torch.zeros_like(p) for n, p in params.items()}
    if isinstance(experts, StackedSwiGLU):
        return [(g["experts.w_in_EDH2"][e], g["experts.w_out_EHD"][e])
                for e in range(experts.num_experts)]
    return [(g[f"experts.w_in.{b}"][j], g[f"experts.w_out.{b}"][j])
            for b, j in zip(experts.bucket_of, experts.local_of)]
