"""The loop fallback of ``grouped_mm`` (custom autograd Function) against autograd of the plain loop."""

import pytest
import torch

from divmoe.experts import grouped_mm as gmm_module


def plain_loop(x_SD, w_EDH, offs_E):
    bounds = [0] + offs_E.tolist()
    return torch.cat([x_SD[bounds[e]:bounds[e + 1]] @ w_EDH[e] for e in range(w_EDH.shape[0])])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("counts", [[3, 0, 5, 1], [0, 0, 4, 0], [2, 2, 2, 2], [0, 0, 0, 0]])
@pytest.mark.parametrize("need", ["both", "x", "w"])
def test_fallback_forward_and_backward_match_plain_loop(dtype, counts, need, monkeypatch):
    monkeypatch.setattr(gmm_module, "_NATIVE_GROUPED_MM", False)
    g = torch.Generator().manual_seed(sum(counts) + len(need))
    S, D, H = sum(counts), 6, 5  # unaligned widths: the native kernel could not take them
    x0 = torch.randn(S, D, dtype=dtype, generator=g)
    w0 = torch.randn(len(counts), D, H, dtype=dtype, generator=g)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    gy = torch.randn(S, H, dtype=dtype, generator=g)
    outs = []
    for fn in (gmm_module.grouped_mm, plain_loop):
        x = x0.clone().requires_grad_(need in ("both", "x"))
        w = w0.clone().requires_grad_(need in ("both", "w"))
        y = fn(x, w, offs)
        if S:
            y.backward(gy)
        outs.append((y.detach(), x.grad, w.grad))
    (y1, gx1, gw1), (y2, gx2, gw2) = outs
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y1, y2, **tol)
    for a, b in ((gx1, gx2), (gw1, gw2)):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, **tol)


def test_fallback_gradcheck(monkeypatch):
    monkeypatch.setattr(gmm_module, "_NATIVE_GROUPED_MM", False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(3, 3, 2, dtype=torch.float64, generator=g, requires_grad=True)
    offs = torch.tensor([2, 2, 7], dtype=torch.int32)
    assert torch.autograd.gradcheck(lambda a, b: gmm_module.grouped_mm(a, b, offs), (x, w))
