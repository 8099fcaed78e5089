"""The fused gather → SwiGLU experts → scatter node (hand-written backward) against autograd
of the plain per-expert loop: gradcheck, native kernel vs loop fallback, partial gradients,
bf16, one chunk per bucket vs many."""

import pytest
import torch

from divmoe.dispatch import dispatch_combine, reference_dispatch_combine
from divmoe.dispatch import grouped as dispatch_grouped
from divmoe.dispatch.grouped import plan_chunks
from divmoe.experts import HeteroSwiGLU, StackedSwiGLU
from divmoe.experts import grouped_mm as gmm_module
from divmoe.routing import RoutingPlan

# Empty slots, a token with both slots on one expert, an expert nobody chose (1 of 4 / 5).
IDS = torch.tensor([[0, -1], [2, 3], [-1, -1], [3, 3], [0, 2], [2, 0]])


def plan_for(ids, weights, E=5):
    T = ids.shape[0]
    return RoutingPlan(ids, weights, torch.full((T, E), 1 / E, dtype=weights.dtype),
                       torch.zeros(T, E, dtype=weights.dtype))


def layouts(dtype, d=4):
    torch.manual_seed(0)
    return {"stacked": StackedSwiGLU(5, d, 3).to(dtype),
            "hetero": HeteroSwiGLU([3, 1, 3, 2, 1], d).to(dtype)}  # buckets interleaved in id


class _Layer(torch.nn.Module):
    """dispatch_combine as a module, so functional_call can swap the experts' parameters."""

    def __init__(self, experts):
        super().__init__()
        self.experts = experts

    def forward(self, x, w):
        return dispatch_combine(x, plan_for(IDS, w), self.experts)


@pytest.fixture(params=["one_chunk", "many_chunks"])
def chunking(request, monkeypatch):
    """Every test here runs with one chunk per bucket and with (nearly) one expert per chunk."""
    monkeypatch.setattr(dispatch_grouped, "CPU_CHUNK_BYTES",
                        1 << 40 if request.param == "one_chunk" else 1)
    return request.param


@pytest.mark.parametrize("layout", ["stacked", "hetero"])
def test_gradcheck_input_weights_and_parameters(layout, chunking):
    layer = _Layer(layouts(torch.float64)[layout])
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in layer.parameters()]
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    w = torch.rand(6, 2, dtype=torch.float64, requires_grad=True)
    f = lambda x, w, *ps: torch.func.functional_call(layer, dict(zip(names, ps)), (x, w))  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, w, *params))


@pytest.mark.parametrize("need", ["x", "weights", "params", "all"])
def test_partial_gradients_match_reference(need, chunking):
    experts = layouts(torch.float64)["hetero"]
    for p in experts.parameters():
        p.requires_grad_(need in ("params", "all"))
    results = []
    for fn in (dispatch_combine, reference_dispatch_combine):
        x = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        w = torch.rand(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        x.requires_grad_(need in ("x", "all"))
        w.requires_grad_(need in ("weights", "all"))
        experts.zero_grad(set_to_none=True)
        y = fn(x, plan_for(IDS, w), experts)
        if y.requires_grad:
            (y * torch.arange(y.numel(), dtype=y.dtype).view_as(y).sin()).sum().backward()
        results.append((y.detach(), x.grad, w.grad,
                        [None if p.grad is None else p.grad.clone() for p in experts.parameters()]))
    (y1, gx1, gw1, gp1), (y2, gx2, gw2, gp2) = results
    torch.testing.assert_close(y1, y2, atol=1e-12, rtol=1e-12)
    for a, b in [(gx1, gx2), (gw1, gw2), *zip(gp1, gp2)]:
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("layout", ["stacked", "hetero"])
def test_native_kernel_equals_loop_fallback(layout, monkeypatch, chunking):
    if not gmm_module._NATIVE_GROUPED_MM:
        pytest.skip("this torch build has no usable torch._grouped_mm")
    experts = layouts(torch.float32, d=8)[layout]  # d = 8 floats: 16-byte rows, but H = 3
    if layout == "stacked":  # make the stacked widths aligned too, so the kernel really runs
        experts = StackedSwiGLU(5, 8, 4)
    torch.manual_seed(3)
    ids = torch.randint(-1, 5, (40, 3))
    x0, w0 = torch.randn(40, 8), torch.rand(40, 3)
    outs = []
    for native in (True, False):
        monkeypatch.setattr(gmm_module, "_NATIVE_GROUPED_MM", native)
        experts.zero_grad(set_to_none=True)
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        y = dispatch_combine(x, plan_for(ids, w), experts)
        y.pow(2).sum().backward()
        outs.append([y.detach(), x.grad, w.grad] + [p.grad for p in experts.parameters()])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_bf16_close_to_float64_reference(chunking):
    experts = StackedSwiGLU(5, 16, 8)
    ids = torch.randint(0, 5, (64, 2), generator=torch.Generator().manual_seed(4))
    x = torch.randn(64, 16)
    w = torch.rand(64, 2)
    ref = reference_dispatch_combine(x.double(), plan_for(ids, w.double()), experts.double())
    y = dispatch_combine(x.bfloat16(), plan_for(ids, w.bfloat16()), experts.bfloat16())
    assert y.dtype == torch.bfloat16
    err = (y.double() - ref).abs().max() / ref.abs().max()
    assert err < 2e-2, err


def test_rows_of_no_token_and_all_empty_plan():
    experts = layouts(torch.float64)["stacked"]
    ids = torch.full((3, 2), -1)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    y = dispatch_combine(x, plan_for(ids, torch.zeros(3, 2, dtype=torch.float64)), experts)
    assert torch.equal(y, torch.zeros(3, 4, dtype=torch.float64))


def test_second_backward_through_a_retained_graph_recomputes_what_the_first_freed(chunking):
    experts = layouts(torch.float64)["hetero"]
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    w = torch.rand(6, 2, dtype=torch.float64, requires_grad=True)
    y = dispatch_combine(x, plan_for(IDS, w), experts)
    y.sum().backward(retain_graph=True)
    leaves = [t for t in (x, w, *experts.parameters()) if t.grad is not None]
    assert len(leaves) == 6  # x, w, w_in and w_out of the width-2 and -3 buckets (1: unused)
    first = [t.grad.clone() for t in leaves]
    y.sum().backward()
    for a, t in zip(first, leaves):
        torch.testing.assert_close(t.grad, 2 * a, atol=1e-12, rtol=1e-12)


def test_chunks_cover_rows_and_experts_once_in_order():
    experts = HeteroSwiGLU([4, 2, 4, 4, 2, 4], 8)  # buckets: width 2 (2 experts), 4 (4 experts)
    x = torch.randn(3, 8)
    counts = [0, 5, 3, 0, 9, 0]  # row order: bucket 0's experts, then bucket 1's
    # Widest temporary of a row: max(d, 2H) = 8 floats = 32 bytes; budget 10 rows = 320 bytes.
    chunks = plan_chunks(counts, experts.buckets(), x, chunk_bytes=320)
    got = [(c.bucket, c.e0, c.e1, c.r0, c.r1, c.offs.tolist()) for c in chunks]
    assert got == [(0, 0, 2, 0, 5, [0, 5]),             # the empty expert joins its neighbour
                   (1, 0, 2, 5, 8, [3, 3]),             # 3 + 9 rows > 10: the 9 start a chunk
                   (1, 2, 4, 8, 17, [9, 9])]            # trailing empty expert: same chunk
    assert all(c.offs.dtype == torch.int32 for c in chunks)
    one = plan_chunks(counts, experts.buckets(), x, chunk_bytes=1 << 40)  # no real limit
    assert [(c.bucket, c.e0, c.e1, c.r0, c.r1) for c in one] == [(0, 0, 2, 0, 5), (1, 0, 4, 5, 17)]
    big = plan_chunks([0, 0, 30, 1, 0, 0], experts.buckets(), x, chunk_bytes=320)
    # An expert above the budget is a chunk of its own; a bucket with no rows has no chunk.
    assert [(c.bucket, c.e0, c.e1, c.r0, c.r1) for c in big] == [(1, 0, 1, 0, 30), (1, 1, 4, 30, 31)]


def test_many_chunks_equal_one_chunk_at_a_realistic_size(monkeypatch):
    """A layer big enough that the default CPU budget cuts it into several chunks."""
    torch.manual_seed(7)
    experts = StackedSwiGLU(16, 64, 96)
    ids = torch.randint(0, 16, (4096, 4))
    x0, w0 = torch.randn(4096, 64), torch.rand(4096, 4)
    outs = []
    for budget in (1 << 40, dispatch_grouped.CPU_CHUNK_BYTES // 16):
        monkeypatch.setattr(dispatch_grouped, "CPU_CHUNK_BYTES", budget)
        experts.zero_grad(set_to_none=True)
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        y = dispatch_combine(x, plan_for(ids, w, E=16), experts)
        y.pow(2).sum().backward()
        outs.append([y.detach(), x.grad, w.grad] + [p.grad for p in experts.parameters()])
    assert len(plan_chunks(torch.bincount(ids.flatten(), minlength=16).tolist(),
                           experts.buckets(), x0, chunk_bytes=budget)) > 4
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("widths", [None, [6, 2, 6, 4, 2, 4]])
def test_recompute_hidden_matches_reference(widths, chunking):
    from equivalence import assert_same_forward_backward, pair
    torch.manual_seed(8)
    fast, ref = pair(8, torch.float64, num_experts=6, top_k=2, expert_hidden=4,
                     expert_widths=widths, recompute_hidden=True)
    assert_same_forward_backward(fast, ref, torch.randn(3, 17, 8, dtype=torch.float64),
                                 atol=1e-12, rtol=1e-12)


def test_recompute_hidden_saves_no_hidden_and_is_refused_where_it_cannot_apply():
    from divmoe.config import ConfigError
    from divmoe.layer import MoE
    experts = StackedSwiGLU(5, 4, 3).double()
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    y = dispatch_combine(x, plan_for(IDS, torch.rand(6, 2, dtype=torch.float64)), experts,
                         recompute_hidden=True)
    assert y.grad_fn.acts == [None] * len(y.grad_fn.chunks)
    with pytest.raises(ConfigError, match="recompute_hidden=True is not allowed"):
        MoE(8, expert_layout="lora", recompute_hidden=True)
