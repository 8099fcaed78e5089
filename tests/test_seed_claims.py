"""The seed-claims study: its definition, the paired intervals and decisions, paired
initialisation, and the whole study end to end at --quick (resumable, records, report)."""

import json
import math

import pytest
import torch

from divmoe.cli import main
from divmoe.compare import claims_stats as ST
from divmoe.compare import seed_claims as SC
from divmoe.compare.claims_report import log2_speedup, steps_to
from divmoe.compare.claims_study import jobs
from divmoe.models import MoETransformer
from divmoe.train.config import load_config


def test_t_quantiles_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in [1, 2, 4, 9, 13, 20, 45, 200]:
        assert ST.t975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=6e-3)


def test_interval_hand_computed():
    iv = ST.Interval.of([1.0, 2.0, 3.0])  # mean 2, sd 1, half-width 4.303 / sqrt(3)
    assert (iv.mean, iv.sd, iv.n) == (2.0, 1.0, 3)
    assert iv.high - iv.mean == pytest.approx(4.303 / math.sqrt(3))


def _iv(mean, half):
    return ST.Interval(mean, mean - half, mean + half, 0.0, 5)


def test_better_by_delta_decisions():
    lower = SC.Part("val_bpb", "better", 0.01)          # A − B, lower is better
    assert ST.decide(lower, _iv(-0.03, 0.01)) == "yes"
    assert ST.decide(lower, _iv(-0.005, 0.004)) == "no"  # excludes every gain ≥ 0.01
    assert ST.decide(lower, _iv(+0.02, 0.005)) == "no"   # worse
    assert ST.decide(lower, _iv(-0.02, 0.03)) == "unclear"
    assert ST.decide(lower, _iv(-0.008, 0.005)) == "unclear"  # significant but below δ, could reach it
    higher = SC.Part("mi", "better", 0.10, lower=False, ratio=True)  # log(A / B), +10 %
    assert ST.decide(higher, _iv(math.log(1.3), 0.1)) == "yes"
    assert ST.decide(higher, _iv(math.log(1.02), 0.03)) == "no"
    fewer = SC.Part("activated_params", "better", 0.10, ratio=True)   # A / B ≤ 0.9
    assert ST.decide(fewer, _iv(math.log(0.8), 0.05)) == "yes"
    assert ST.decide(fewer, _iv(math.log(0.95), 0.02)) == "no"


def test_no_worse_and_equal_decisions():
    nw = SC.Part("val_bpb", "no_worse", 0.02)
    assert ST.decide(nw, _iv(0.005, 0.01)) == "holds"
    assert ST.decide(nw, _iv(0.05, 0.01)) == "fails"
    assert ST.decide(nw, _iv(0.015, 0.01)) == "unclear"
    fewer = SC.Part("activated_params", "no_worse", 0.0, ratio=True)  # strictly fewer
    assert ST.decide(fewer, _iv(math.log(0.97), 0.01)) == "holds"
    assert ST.decide(fewer, _iv(math.log(0.99), 0.02)) == "unclear"
    eq = SC.Part("train_max_vio", "equal", 0.1)
    assert ST.decide(eq, _iv(0.02, 0.05)) == "holds"
    assert ST.decide(eq, _iv(0.3, 0.1)) == "fails"
    assert ST.decide(eq, _iv(0.08, 0.05)) == "unclear"


def test_judge_pairs_seeds_and_combines_parts():
    claim = SC.Claim(0, "t", "s", "q", "d", ("a", "b"),
                     (SC.Part("x", "better", 0.01), SC.Part("val_bpb", "no_worse", 0.02)))
    values = {"x": {"a": [1.0, 1.1, 0.9], "b": [1.5, 1.62, 1.41]},
              "val_bpb": {"a": [2.0, 2.1, 2.2], "b": [2.0, 2.1, 2.2]}}
    r = ST.judge(claim, values)
    assert [p["paired"] for p in r["parts"]][0] == pytest.approx([-0.5, -0.52, -0.51])
    assert r["verdict"] == "reproduced"
    values["val_bpb"]["a"] = [2.1, 2.2, 2.3]        # worse by 0.1 on every seed
    assert ST.judge(claim, values)["verdict"] == "not reproduced"
    values["val_bpb"]["a"] = [2.0, 2.1, 2.35]       # one seed much worse: undecided
    assert ST.judge(claim, values)["verdict"] == "inconclusive"
    values["x"]["a"] = [1.0, 1.1]
    with pytest.raises(ValueError, match="the pairs must match"):
        ST.judge(claim, values)
    with pytest.raises(ValueError, match="at least 2"):
        ST.Interval.of([1.0])


def test_steps_to_interpolates_and_speedup_is_censored():
    curve = [(100, 3.0), (200, 2.5), (300, 2.0)]
    assert steps_to(curve, 2.75) == pytest.approx(150)
    assert steps_to(curve, 3.5) == 100
    assert math.isinf(steps_to(curve, 1.0))
    b = [(100, 3.0), (200, 2.6), (300, 2.4)]           # B's final 2.4 at step 300
    a = [(100, 2.4), (200, 2.2), (300, 2.1)]           # A is there at step 100: 3×
    assert log2_speedup(a, b, 300, 100) == pytest.approx(math.log2(3))
    never = [(100, 3.0), (200, 2.9), (300, 2.8)]       # counted as one evaluation past the end
    assert log2_speedup(never, b, 300, 100) == pytest.approx(math.log2(300 / 400))


@pytest.mark.parametrize("preset", sorted(SC.PRESETS))
def test_variants_are_valid_and_keep_what_their_claim_needs(preset):
    names = {v.name for v in SC.variants(preset)}
    assert {n for c in SC.CLAIMS for n in c.variants} <= names
    configs = {n.rsplit("-s", 1)[0]: load_config(None, o) for n, o in jobs(preset, 1)}
    base = configs["topk"]
    for cfg in configs.values():  # every step sees the same number of sequences
        assert cfg.train.grad_accum * cfg.train.batch_size == base.train.batch_size
        assert cfg.data.tokenizer == "bpe" and cfg.model.paired_init
    E, k = base.moe.num_experts, base.moe.top_k
    null = configs["null_experts"].moe     # k raised, 2 real experts per token on average
    assert null.top_k > k and null.top_k * E / (E + null.num_null_experts) == k
    het = configs["hetero"].moe
    assert sum(het.expert_widths) == E * base.moe.expert_hidden and len(set(het.expert_widths)) > 1
    assert "small_expert_bias" in het.balance
    dyn = configs["dynamic_topp"].moe
    assert dyn.top_k == E and "routing_entropy" in dyn.balance
    assert configs["loss_free"].moe.score_func == configs["sigmoid_aux"].moe.score_func == "sigmoid"
    ga = configs["ga_global"]
    assert ga.train.grad_accum > 1 and ga.data.batch_domains == "single"
    assert ga.moe.aux_loss_global_counts == "counting_pass"
    assert {c.moe.aux_loss_scope for c in (configs["ga_micro"], ga)} == {"micro_batch", "global_batch"}


def test_paired_init_shares_every_part_whose_shape_a_variant_keeps():
    def params(*overrides):
        cfg = load_config(None, ["model.paired_init=true", "model.d_model=16", "model.n_layers=2",
                                 "model.n_heads=2", "moe.num_experts=4", "moe.expert_hidden=16",
                                 *overrides])
        torch.manual_seed(3)
        return dict(MoETransformer(cfg.model, cfg.moe).named_parameters())

    base = params()
    hetero = params("moe.expert_widths=[8,24,12,20]")
    null = params("moe.router=null_experts", "moe.num_null_experts=2")
    for name, p in base.items():
        if "experts" not in name:
            assert torch.equal(p, hetero[name]), name            # attention, router, embeddings
        if "router" not in name:
            assert torch.equal(p, null[name]), name              # its experts too
    # the null router's extra rows come after the real experts' rows, which stay the same
    assert null["blocks.0.mlp.router.gate.weight"].shape[0] == 6
    assert torch.equal(base["blocks.0.mlp.router.gate.weight"],
                       null["blocks.0.mlp.router.gate.weight"][:4])
    torch.manual_seed(4)
    other_seed = dict(MoETransformer(*(lambda c: (c.model, c.moe))(load_config(
        None, ["model.paired_init=true", "model.d_model=16", "model.n_layers=2", "model.n_heads=2",
               "moe.num_experts=4", "moe.expert_hidden=16"]))).named_parameters())
    assert not torch.equal(base["embed.weight"], other_seed["embed.weight"])
    assert base["embed.weight"].std().item() == pytest.approx(0.02, rel=0.1)


def test_quick_study_end_to_end_resumable_with_records(tmp_path, capsys):
    out, records = tmp_path / "claims", tmp_path / "records"
    common = ["compare", "--study", "seed-claims", "--quick", "--quiet", "--records", str(records)]
    assert main(common + ["--out", str(out), "--budget", "0"]) == 0  # starts nothing
    printed = capsys.readouterr().out
    assert "not complete" in printed and not records.exists()
    docs = tmp_path / "seed_claims.md"
    docs.write_text("# old\n\nstale\n\n## Implementation fidelity\n\nkept table\n")
    assert main(common + ["--out", str(out), "--docs", str(docs)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("claim ") == len(SC.CLAIMS) and "\ncomplete;" in printed
    assert len(list(records.iterdir())) == 2 * len(SC.variants("quick"))
    text = (out / "summary.md").read_text()
    assert "22 of 22 runs complete" in text and "[95% CI]" in text
    page = docs.read_text()
    assert "stale" not in page and page.endswith("kept table\n") and "## Verdicts" in page
    assert (tmp_path / "seed_claims_curves.png").stat().st_size > 10_000
    results = json.loads((out / "results.json").read_text())
    assert [c["number"] for c in results["claims"]] == [c.number for c in SC.CLAIMS]
    final = json.loads((out / "topk-s0" / "final_eval.json").read_text())
    assert final["steps"] == [8, 4] and final["val_bytes"] > final["val_tokens"]  # BPE tokens
    # A fresh machine continues from the records alone: nothing is trained again.
    again = tmp_path / "again"
    assert main(common + ["--out", str(again), "--report-only"]) == 0
    assert "\ncomplete;" in capsys.readouterr().out
    assert json.loads((again / "results.json").read_text())["claims"] == results["claims"]


def test_study_refuses_bad_settings(tmp_path, capsys):
    for args, message in [(["--quick", "--seeds", "1"], "at least 2 seeds"),
                          (["--set", "train.steps=3"], "no --set"),
                          (["--quick", "--workers", "0"], "workers=0")]:
        assert main(["compare", "--study", "seed-claims", "--out", str(tmp_path / "x")] + args) == 2
        assert message in capsys.readouterr().err
    assert main(["compare", "--out", str(tmp_path / "x"), "--report-only"]) == 2
    assert "apply to --study seed-claims only" in capsys.readouterr().err
