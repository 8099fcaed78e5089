"""`divmoe list`: every registered router, balancer, expert layout and dispatch kind, with a
description and the MoEConfig settings it reads."""

import dataclasses

from divmoe.balance import BALANCERS
from divmoe.cli import main
from divmoe.dispatch import DISPATCHERS
from divmoe.diversity.regularizers import DIVERSITY_REGULARIZERS
from divmoe.experts import EXPERT_LAYOUTS
from divmoe.layer import MoEConfig
from divmoe.registry import components, first_sentence, readers
from divmoe.routing import ROUTERS


def test_every_registered_name_is_listed_with_a_description():
    rows = components()
    by_kind = {}
    for r in rows:
        by_kind.setdefault(r.kind, []).append(r.name)
        assert r.description and "\n" not in r.description, r
    assert set(by_kind["router"]) == set(ROUTERS)
    assert set(by_kind["balancer"]) == set(BALANCERS)
    assert set(by_kind["expert_layout"]) == set(EXPERT_LAYOUTS)
    assert set(by_kind["dispatch"]) == set(DISPATCHERS)


def test_settings_are_real_fields_and_specific():
    fields = {f.name for f in dataclasses.fields(MoEConfig)}
    rows = {(r.kind, r.name): r.settings for r in components()}
    for key, settings in rows.items():
        assert set(settings) <= fields, key
    assert {"top_k", "top_p"} <= set(rows["router", "dynamic_topp"])
    assert {"sinkhorn_iters", "sinkhorn_tol"} <= set(rows["router", "sinkhorn"])
    assert {"router_dim", "router_temperature"} <= set(rows["router", "hypersphere"])
    assert {"num_null_experts", "null_target"} <= set(rows["router", "null_experts"])
    assert "null_usage_weight" in rows["balancer", "null_usage"]
    assert "top_k" not in rows["router", "soft_merge"]      # one merged expert, k unused
    assert {"aux_loss_weight", "aux_loss_scope", "aux_loss_global_counts"} == \
        set(rows["balancer", "aux_loss"])
    assert {"capacity_factor", "capacity_overflow", "capacity_priority", "capacity_expand"} == \
        set(rows["balancer", "capacity"])
    assert rows["balancer", "loss_free_bias"] == ["bias_update_rate"]
    assert "lora_rank" in rows["expert_layout", "lora"]
    # a component's settings never include another router's options
    assert "top_p" not in rows["router", "topk"] and "sinkhorn_iters" not in rows["router", "topk"]


def test_every_setting_has_a_reader():
    """Every MoEConfig field is declared by the layer or by a component that reads it."""
    rows = components()
    for f in dataclasses.fields(MoEConfig):
        assert readers(f.name, rows), f.name
    assert readers("top_p", rows) == ["router dynamic_topp"]
    assert readers("router", rows) == ["layer"]
    assert "balancer capacity" in readers("capacity_factor", rows) and \
        "router expert_choice" in readers("capacity_factor", rows)


def test_cli_config_names_the_readers(capsys):
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("moe.sinkhorn_iters "))
    assert "[read by: router sinkhorn]" in line


def test_first_sentence():
    assert first_sentence("One thing. Two things.\n\nMore.") == "One thing."
    assert first_sentence("Zhou et al., 2022. Rest") == "Zhou et al., 2022."
    assert first_sentence("Uses ``x`` here\n  and there.") == "Uses x here and there."
    assert first_sentence(None) == ""
    assert first_sentence("a" * 300).endswith("…")


def test_cli_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for header in ("routers (moe.router):", "balancers (moe.balance, a list):",
                   "diversity regularisers (moe.diversity, a list):",
                   "expert layouts (moe.expert_layout):", "dispatch kinds (moe.dispatch):"):
        assert header in out
    for name in [*ROUTERS, *BALANCERS, *EXPERT_LAYOUTS, *DIVERSITY_REGULARIZERS, *DISPATCHERS]:
        assert f"\n  {name} " in out, name
    assert "soft_merge" in out and "SMEAR" in out
    assert "settings: moe.top_k, moe.renormalize, moe.routed_scaling, moe.jitter, moe.top_p" in out
