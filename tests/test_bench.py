"""Smoke test of benchmarks/bench_layer.py in --quick mode: structure of its JSON, no timing claims."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_layer.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_layer", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def has_transformers():
    try:
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock  # noqa: F401
    except Exception:
        return False
    return True


@pytest.fixture(scope="module")
def quick_result(tmp_path_factory):
    bench = load_bench()
    out = tmp_path_factory.mktemp("bench") / "quick.json"
    bench.main(["--quick", "--threads", "1", "--json", str(out)])
    return bench, json.loads(out.read_text())


def test_quick_rows_cover_every_shape_mode_and_candidate(quick_result):
    bench, result = quick_result
    rows = result["rows"]
    shapes = {(r["shape"]["d"], r["shape"]["F"], r["shape"]["E"], r["shape"]["k"]) for r in rows}
    assert shapes == set(bench.QUICK_SHAPES)
    assert result["meta"]["tokens"] == 64 and result["meta"]["repeats"] == 1
    expected = {"dense", "divmoe", "divmoe+aux+z", "divmoe[native]"}
    if has_transformers():
        expected |= {"hf:eager", "hf:grouped_mm"}
    for shape in shapes:
        for mode in bench.MODES:
            names = {r["name"] for r in rows if r["mode"] == mode and
                     (r["shape"]["d"], r["shape"]["F"], r["shape"]["E"], r["shape"]["k"]) == shape}
            assert expected <= names, (shape, mode, names)


def test_quick_times_are_finite_and_positive(quick_result):
    _, result = quick_result
    for r in result["rows"]:
        assert len(r["times_ms"]) == 1
        for t in r["times_ms"] + [r["median_ms"], r["ratio_to_dense"]]:
            assert math.isfinite(t) and t > 0, r
        for ratio in r.get("ratio_to_hf", {}).values():
            assert math.isfinite(ratio) and ratio > 0, r
        if r["name"] == "dense":
            assert r["ratio_to_dense"] == pytest.approx(1.0)


def test_quick_divmoe_matches_mixtral_block(quick_result):
    _, result = quick_result
    if not has_transformers():
        pytest.skip("transformers not importable: no Mixtral comparison")
    checks = [c for c in result["checks"] if c["name"].startswith("divmoe")]
    assert checks and all(c["against"] == "hf:eager" for c in checks)
    for c in result["checks"]:
        assert c["ok"] and c["max_abs_diff"] < 1e-4, c


def test_skips_are_explained(quick_result):
    _, result = quick_result
    for s in result["skipped"]:
        assert s["reason"]
