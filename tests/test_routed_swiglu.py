"""The fused gather → SwiGLU experts → scatter node (hand-written backward) against autograd
of the plain per-expert loop: gradcheck, native kernel vs loop fallback, partial gradients,
bf16."""

import pytest
import torch

from divmoe.dispatch import dispatch_combine, reference_dispatch_combine
from divmoe.experts import HeteroSwiGLU, StackedSwiGLU
from divmoe.experts import grouped_mm as gmm_module
from divmoe.routing import RoutingPlan

# Empty slots, a token with both slots on one expert, an expert nobody chose (1 of 4 / 5).
IDS = torch.tensor([[0, -1], [2, 3], [-1, -1], [3, 3], [0, 2], [2, 0]])


def plan_for(ids, weights):
    T, E = ids.shape[0], 5
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


@pytest.mark.parametrize("layout", ["stacked", "hetero"])
def test_gradcheck_input_weights_and_parameters(layout):
    layer = _Layer(layouts(torch.float64)[layout])
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in layer.parameters()]
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    w = torch.rand(6, 2, dtype=torch.float64, requires_grad=True)
    f = lambda x, w, *ps: torch.func.functional_call(layer, dict(zip(names, ps)), (x, w))  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, w, *params))


@pytest.mark.parametrize("need", ["x", "weights", "params", "all"])
def test_partial_gradients_match_reference(need):
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
def test_native_kernel_equals_loop_fallback(layout, monkeypatch):
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


def test_bf16_close_to_float64_reference():
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


def test_second_backward_through_a_retained_graph_recomputes_what_the_first_freed():
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
