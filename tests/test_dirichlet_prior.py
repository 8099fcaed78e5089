"""DPSL (balance/dirichlet.py): the Beta CDF against scipy, the loss against hand-computed
cases, and the direction its gradient moves routing."""

import math

import pytest
import torch

from divmoe.balance import BalanceContext, dirichlet_prior
from divmoe.balance.dirichlet import beta_cdf, cf_steps
from divmoe.layer import MoE, MoEConfig
from divmoe.routing import RoutingPlan

scipy_special = pytest.importorskip("scipy.special")


def plan_of_probs(probs):
    probs = torch.as_tensor(probs, dtype=torch.float64)
    T = probs.shape[0]
    return RoutingPlan(torch.zeros(T, 1, dtype=torch.long), torch.ones(T, 1, dtype=torch.float64),
                       probs, probs.log())


def ctx_of(alpha):
    return BalanceContext(dirichlet_alpha_E=torch.as_tensor(alpha, dtype=torch.float64))


@pytest.mark.parametrize("E", [2, 8, 64])
@pytest.mark.parametrize("alpha", [0.05, 0.5, 2.0, 20.0])
def test_beta_cdf_value_and_density_match_scipy(E, alpha):
    x = torch.linspace(1e-5, 1 - 1e-5, 501, dtype=torch.float64)[:, None].requires_grad_()
    a = torch.tensor([alpha], dtype=torch.float64)
    b = torch.tensor([alpha * (E - 1)], dtype=torch.float64)
    value = beta_cdf(x, a, b, cf_steps([alpha] * E))
    ref = scipy_special.betainc(alpha, alpha * (E - 1), x.detach().numpy())
    assert float((value.detach() - torch.from_numpy(ref)).abs().max()) < 1e-10
    value.sum().backward()
    log_pdf = ((alpha - 1) * x.detach().log() + (alpha * (E - 1) - 1) * torch.log1p(-x.detach())
               - math.log(scipy_special.beta(alpha, alpha * (E - 1))))
    torch.testing.assert_close(x.grad, log_pdf.exp(), rtol=1e-9, atol=0)


def test_dirichlet_prior_hand_computed():
    # Three tokens, two experts: p_0 = (0.1, 0.5, 0.7), p_1 = 1 − p_0; ECDF i/4 = ¼, ½, ¾.
    probs = [[0.1, 0.9], [0.5, 0.5], [0.7, 0.3]]
    # α = (1, 1): both marginals Beta(1, 1), F(x) = x.
    # expert 0 sorted (.1, .5, .7): .15² + 0 + .05² = .025; expert 1 (.3, .5, .9): the same.
    assert math.isclose(float(dirichlet_prior(plan_of_probs(probs), ctx_of([1.0, 1.0]))),
                        0.025 / 3, rel_tol=1e-9)
    # α = (2, 1), A = 3: expert 0 Beta(2, 1), F = x²: (.01, .25, .49) − (¼, ½, ¾) → .24² + .25²
    # + .26² = .1877; expert 1 Beta(1, 2), F = 1 − (1 − x)²: (.51, .75, .99) → the same .1877.
    assert math.isclose(float(dirichlet_prior(plan_of_probs(probs), ctx_of([2.0, 1.0]))),
                        0.1877 / 3, rel_tol=1e-9)
    # The order of the tokens does not matter (the loss sorts each expert's column).
    assert math.isclose(float(dirichlet_prior(plan_of_probs(probs[::-1]), ctx_of([2.0, 1.0]))),
                        0.1877 / 3, rel_tol=1e-9)


def entropy(probs_TE):
    return float(-(probs_TE * probs_TE.clamp_min(1e-12).log()).sum(-1).mean())


def descend(logits_TE, alpha, steps, lr):
    logits = logits_TE.clone().requires_grad_()
    opt = torch.optim.Adam([logits], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        dirichlet_prior(plan_of_probs(logits.softmax(-1)), ctx_of(alpha)).backward()
        opt.step()
    return logits.detach().softmax(-1)


def test_default_alpha_sharpens_flat_routing_and_softens_collapsed_routing():
    """The paper's direction: upcycled routers are flat ("low-confidence"); DPSL at the default
    symmetric α = 2 must make them more confident, not flatter (a per-token Dirichlet
    log-density with α > 1 does the opposite), and must pull over-confident routing back."""
    E, T = 8, 256
    alpha = [MoEConfig().dirichlet_alpha] * E
    torch.manual_seed(0)
    flat = 0.01 * torch.randn(T, E, dtype=torch.float64)
    sharpened = descend(flat, alpha, steps=5, lr=0.05)
    assert entropy(sharpened) < entropy(flat.softmax(-1)) - 0.01
    collapsed = 20 * torch.randn(T, E, dtype=torch.float64)
    softened = descend(collapsed, alpha, steps=5, lr=0.5)
    assert entropy(softened) > entropy(collapsed.softmax(-1)) + 0.01


def test_minimising_matches_the_beta_marginals():
    """Driven to its minimum, each expert's probabilities over the batch follow
    Beta(α_k, A − α_k), asymmetric α included: mean α_k/A, and the Kolmogorov–Smirnov distance
    to the Beta CDF (scipy's) small."""
    alpha = [4.0, 1.0, 1.0, 1.0]
    A, T = sum(alpha), 256
    torch.manual_seed(1)
    probs = descend(0.01 * torch.randn(T, 4, dtype=torch.float64), alpha, steps=200, lr=0.05)
    ecdf = torch.arange(1, T + 1, dtype=torch.float64) / (T + 1)
    for k, a in enumerate(alpha):
        assert float(probs[:, k].mean()) == pytest.approx(a / A, abs=0.02)
        cdf = scipy_special.betainc(a, A - a, probs[:, k].sort().values.numpy())
        assert float((torch.from_numpy(cdf) - ecdf).abs().max()) < 0.05
    # ... where the flat start is far from it
    start = torch.full((T,), 0.25, dtype=torch.float64).numpy()
    assert float((torch.from_numpy(scipy_special.betainc(1.0, 6.0, start)) - ecdf).abs().max()) > 0.4


def test_dirichlet_prior_in_layer_is_the_loss_of_the_router_plan():
    torch.manual_seed(0)
    alpha = [1.5, 2.0, 4.0]
    moe = MoE(8, MoEConfig(num_experts=3, top_k=1, balance=["dirichlet_prior"],
                           dirichlet_alpha_per_expert=alpha)).double()
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    out = moe(x)
    ref = dirichlet_prior(moe.router(x.reshape(-1, 8)), ctx_of(alpha))
    assert math.isclose(out.stats.losses["dirichlet_prior"], float(ref.detach()), rel_tol=1e-9)
    out.aux_loss.backward()
    assert float(moe.router.gate.weight.grad.abs().sum()) > 0


def test_dirichlet_prior_rejects_a_concentration_of_the_wrong_length():
    with pytest.raises(ValueError, match=r"concentration has shape \(2,\), expected \(3,\)"):
        dirichlet_prior(plan_of_probs([[0.2, 0.3, 0.5]]), ctx_of([1.0, 1.0]))
