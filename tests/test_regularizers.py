"""Expert-diversity regularisers (moe.diversity) and the expert-output Vendi probe."""

import math

import pytest
import torch

from divmoe.config import ConfigError
from divmoe.diagnostics import expert_output_vendi
from divmoe.diversity import regularizers as R
from divmoe.experts import every_expert
from divmoe.layer import MoE, MoEConfig
from divmoe.train import load_config


def tiny_moe(**kw):
    torch.manual_seed(0)
    cfg = dict(num_experts=4, top_k=2, expert_hidden=16)
    cfg.update(kw)
    return MoE(16, MoEConfig(**cfg))


def make_identical(moe):
    with torch.no_grad():
        moe.experts.w_in_EDH2[:] = moe.experts.w_in_EDH2[0]
        moe.experts.w_out_EHD[:] = moe.experts.w_out_EHD[0]


def test_identical_experts_get_the_maximal_penalty():
    moe = tiny_moe(diversity=["exclusivity", "divergence"], balance=[])
    make_identical(moe)
    out = moe(torch.randn(3, 10, 16))
    assert out.stats.losses["exclusivity"] == pytest.approx(1.0, abs=1e-5)
    assert out.stats.losses["divergence"] == pytest.approx(0.0, abs=1e-6)  # −JS, JS = 0
    expected = 0.1 * float(out.stats.losses["exclusivity"]) + 0.1 * float(out.stats.losses["divergence"])
    assert float(out.aux_loss.detach()) == pytest.approx(expected, rel=1e-5)


def test_orthogonal_outputs_get_the_minimal_penalty():
    E, P, D = 4, 5, 8
    y_EPD = torch.zeros(E, P, D)
    for e in range(E):
        y_EPD[e, :, e] = 1.0 + torch.rand(P)   # expert e writes only coordinate e
    assert float(R.exclusivity(y_EPD)) == pytest.approx(0.0, abs=1e-7)
    # Disjoint-support output distributions: softmax of a large spike in different coordinates.
    ids_PK = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0], [0, 2]])
    div = float(R.output_divergence(60.0 * y_EPD, ids_PK))
    assert div == pytest.approx(-math.log(2.0), abs=1e-4)
    # Identical outputs: no divergence at all.
    assert float(R.output_divergence(y_EPD[:1].expand(E, P, D), ids_PK)) == pytest.approx(0.0, abs=1e-7)


def test_divergence_skips_tokens_with_fewer_than_two_experts():
    y_EPD = torch.randn(3, 4, 6)
    ids_PK = torch.tensor([[0, -1], [1, 1], [-1, -1], [2, -1]])
    assert float(R.output_divergence(y_EPD, ids_PK)) == 0.0
    one = float(R.output_divergence(y_EPD, torch.tensor([[0, 1], [2, -1], [-1, -1], [2, 2]])))
    lp, lq = torch.log_softmax(y_EPD[0, 0], -1), torch.log_softmax(y_EPD[1, 0], -1)
    m = 0.5 * (lp.exp() + lq.exp())
    js = 0.5 * float((lp.exp() * (lp - m.log())).sum() + (lq.exp() * (lq - m.log())).sum())
    assert one == pytest.approx(-js, rel=1e-5)


@pytest.mark.parametrize("name", ["exclusivity", "divergence"])
def test_gradients_reach_the_experts(name):
    moe = tiny_moe(diversity=[name], balance=[])
    out = moe(torch.randn(2, 12, 16))
    out.aux_loss.backward()
    grad = moe.experts.w_in_EDH2.grad
    assert grad is not None and float(grad.abs().sum()) > 0
    assert name in out.stats.losses


def test_probe_limits_the_extra_expert_rows():
    moe = tiny_moe(diversity=["exclusivity"], diversity_probe_tokens=5)
    seen = []
    orig = moe.experts.expert
    moe.experts.expert = lambda e, x: (seen.append(x.shape[0]), orig(e, x))[1]
    moe.config.dispatch = "grouped"
    moe(torch.randn(4, 10, 16))
    assert seen == [5] * 4   # every expert, on the 5 probe tokens only


def test_off_by_default_costs_nothing(monkeypatch):
    assert MoEConfig().diversity == []
    calls = []
    monkeypatch.setattr("divmoe.diversity.regularizers.diversity_losses", lambda *a, **k: calls.append(1) or {})
    moe = tiny_moe()
    out = moe(torch.randn(2, 8, 16))
    assert calls == [] and set(out.stats.losses) == {"aux_loss", "z_loss"}
    # Switched on, the regularisers run in training only (evaluation is untouched).
    moe_on = tiny_moe(diversity=["exclusivity"])
    moe_on.eval()
    x = torch.randn(2, 8, 16)
    state = torch.get_rng_state()
    moe_on(x)
    assert calls == [] and torch.equal(state, torch.get_rng_state())


def test_unknown_regulariser_is_a_config_error():
    with pytest.raises(ConfigError, match="moe.diversity"):
        load_config(None, ["moe.diversity=[orthogonality]"])
    cfg = load_config(None, ["moe.diversity=[exclusivity, divergence]", "moe.exclusivity_weight=0.5"])
    assert cfg.moe.diversity == ["exclusivity", "divergence"] and cfg.moe.exclusivity_weight == 0.5


def test_expert_output_vendi_ranges_from_one_to_E():
    moe = tiny_moe()
    x = torch.randn(64, 16)
    v = expert_output_vendi(every_expert(moe.experts, x))
    assert 1.0 < v <= 4.0 + 1e-9
    make_identical(moe)
    assert expert_output_vendi(every_expert(moe.experts, x)) == pytest.approx(1.0, abs=1e-6)


def test_exclusivity_training_raises_expert_vendi():
    """A few steps on the exclusivity penalty alone make the experts' outputs more diverse."""
    moe = tiny_moe(diversity=["exclusivity"], balance=[], exclusivity_weight=1.0)
    make_identical(moe)
    with torch.no_grad():
        moe.experts.w_in_EDH2.add_(0.01 * torch.randn_like(moe.experts.w_in_EDH2))
    x = torch.randn(64, 16)
    before = expert_output_vendi(every_expert(moe.experts, x))
    opt = torch.optim.Adam(moe.experts.parameters(), lr=1e-2)
    for _ in range(30):
        opt.zero_grad()
        moe(x).aux_loss.backward()
        opt.step()
    assert expert_output_vendi(every_expert(moe.experts, x)) > before + 0.5
