"""divmoe generate: the KV cache against full recomputation, sampling, UTF-8 streaming, the
run-folder loader and the command's refusals. Tiny models built from configs, a few steps."""

import json

import pytest
import torch

from divmoe.cli import main
from divmoe.config import dump_yaml
from divmoe.inference import KVCache, Utf8Stream, generate, load_run, score_validation
from divmoe.inference.generate import choose_next
from divmoe.inference.run_loading import run_validation
from divmoe.models import MoETransformer
from divmoe.train import load_config
from divmoe.train.checkpoint import save_checkpoint
from divmoe.train.loop import evaluate

pytestmark = pytest.mark.usefixtures("one_thread")


TINY = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.seq_len=24",
        "moe.num_experts=4", "moe.expert_hidden=16"]

VARIANTS = {
    "topk": [],
    "sigmoid_groups_shared": ["moe.score_func=sigmoid", "moe.n_groups=2", "moe.topk_groups=1",
                              "moe.renormalize=false", "moe.num_shared_experts=1"],
    "dense_every_other": ["model.moe_every=2", "model.n_layers=3"],
    "hash": ["moe.router=hash", "moe.balance=[]"],
}


def tiny_model(extra=(), seed=0):
    cfg = load_config(None, TINY + list(extra))
    torch.manual_seed(seed)
    return MoETransformer(cfg.model, cfg.moe).eval(), cfg


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_cached_steps_give_the_logits_of_the_full_forward(variant):
    model, _ = tiny_model(VARIANTS[variant])
    tokens = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(tokens).logits
        cache = KVCache.for_model(model, 3)
        # the prompt, single tokens, then a chunk of 3 after cached positions (explicit mask)
        parts = [model(tokens[:, :6], cache=cache).logits]
        for i in range(6, 10):
            parts.append(model(tokens[:, i:i + 1], cache=cache).logits)
        parts.append(model(tokens[:, 10:13], cache=cache).logits)
        parts.append(model(tokens[:, 13:], cache=cache).logits)
    assert cache.length == 20
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=2e-5, rtol=1e-5)


def test_forward_without_a_cache_is_unchanged_by_an_earlier_cached_one():
    model, _ = tiny_model()
    tokens = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        before = model(tokens).logits
        model(tokens[:, :4], cache=KVCache.for_model(model, 2))
        after = model(tokens).logits
    assert torch.equal(before, after)


def test_cache_refuses_steps_past_the_context_or_of_another_batch():
    model, _ = tiny_model()
    cache = KVCache.for_model(model, 2)
    with torch.no_grad():
        model(torch.zeros(2, 20, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="20 cached \\+ 5 new tokens exceed the model's "
                                             "context model.seq_len=24"):
            model(torch.zeros(2, 5, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="holds 2 sequences, got a batch of 3"):
            model(torch.zeros(3, 1, dtype=torch.long), cache=cache)


@pytest.mark.parametrize("temperature,top_p", [(0.0, 1.0), (1.0, 1.0), (0.8, 0.5)])
def test_generation_with_the_cache_equals_generation_without(temperature, top_p):
    model, _ = tiny_model(VARIANTS["sigmoid_groups_shared"])
    prompt = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(2))
    kw = dict(temperature=temperature, top_p=top_p, seed=7, keep_scores=True)
    cached = generate(model, prompt, 15, **kw)
    recomputed = generate(model, prompt, 15, use_cache=False, **kw)
    assert torch.equal(cached.new_tokens, recomputed.new_tokens)
    assert torch.equal(cached.tokens[:, :5], prompt) and cached.tokens.shape == (2, 20)
    assert len(cached.step_scores) == 15
    for a, b in zip(cached.step_scores, recomputed.step_scores):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
    if temperature == 0:  # greedy: each new token is the best of the scores it came from
        best = torch.stack([s.argmax(-1) for s in cached.step_scores], 1)
        assert torch.equal(best, cached.new_tokens)


def test_sampling_follows_the_seed_and_the_nucleus():
    scores = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(4000, 1)
    draws = choose_next(scores, 1.0, 0.7, torch.Generator().manual_seed(0))
    # nucleus of 0.7: the tokens before which less than 0.7 is gathered (0.5, 0.3), renormalised
    assert set(draws.tolist()) == {0, 1}
    assert abs((draws == 0).float().mean().item() - 0.5 / 0.8) < 0.03
    again = choose_next(scores, 1.0, 0.7, torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)
    full = choose_next(scores, 1.0, 1.0, torch.Generator().manual_seed(0))
    assert abs((full == 3).float().mean().item() - 0.05) < 0.015
    assert torch.equal(choose_next(scores[:2], 0.0, 0.5, None), torch.tensor([0, 0]))
    # −inf scores (SCMoE's implausible tokens) are never drawn
    masked = scores.clone()
    masked[:, 0] = float("-inf")
    assert 0 not in choose_next(masked, 1.0, 1.0, torch.Generator().manual_seed(0)).tolist()


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=-1.0), "temperature=-1.0 is not allowed"),
    (dict(temperature=float("nan")), "temperature=nan is not allowed"),
    (dict(top_p=0.0), "top_p=0.0 is not allowed: expected a number in \\(0, 1\\]"),
    (dict(top_p=1.5), "top_p=1.5 is not allowed"),
])
def test_generate_refuses_bad_sampling_settings(kwargs, match):
    model, _ = tiny_model()
    with pytest.raises(ValueError, match=match):
        generate(model, torch.zeros(1, 3, dtype=torch.long), 2, **kwargs)


def test_generate_refuses_prompts_past_the_context():
    model, _ = tiny_model()
    with pytest.raises(ValueError, match="the prompt is 30 tokens, longer than the model's "
                                         "context model.seq_len=24"):
        generate(model, torch.zeros(1, 30, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="at most 4 new tokens"):
        generate(model, torch.zeros(1, 20, dtype=torch.long), 5)
    with pytest.raises(ValueError, match="length >= 1"):
        generate(model, torch.zeros(1, 0, dtype=torch.long), 1)


def test_utf8_stream_waits_for_the_rest_of_a_character_and_never_raises():
    s = Utf8Stream()
    text = "é€😀"
    got = [s.feed(bytes([b])) for b in text.encode("utf-8")]
    assert got == ["", "é", "", "", "€", "", "", "", "😀"]
    assert s.feed(b"\xff") == "\ufffd"             # not UTF-8 at all
    assert s.feed("x".encode()) == "x"
    assert s.feed("😀".encode()[:2]) == ""          # cut off mid-character at the end
    assert s.finish() == "\ufffd"


# ------------------------------------------------------------------ run folders and the CLI
def write_run(folder, extra=()):
    """A run folder as divmoe train leaves it (config + checkpoint), without training."""
    model, cfg = tiny_model(extra)
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(dump_yaml(cfg))
    save_checkpoint(folder, model.state_dict(), {"step": 0, "optimizer": {}, "rng": None})
    return model, cfg


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gen") / "run"
    write_run(folder, ["data.val_bytes_per_domain=200"])
    return folder


def test_load_run_restores_the_weights_and_applies_inference_overrides(tmp_path):
    model, _ = write_run(tmp_path / "run")
    run = load_run(tmp_path / "run", ["moe.top_k=1"])
    assert run.config.moe.top_k == 1 and not run.model.training
    for (k, a), b in zip(model.state_dict().items(), run.model.state_dict().values()):
        assert torch.equal(a, b), k
    stats = run.model(torch.zeros(1, 4, dtype=torch.long)).stats
    assert stats[0].expert_ids.shape == (4, 1)  # top_k=1 applied at inference


def test_plain_validation_scores_reproduce_the_training_evaluation(run_dir):
    run = load_run(run_dir)
    val = run_validation(run.config, run.tokenizer)
    row = score_validation(run.model, val, batch_size=2)
    expected = evaluate(run.model, val, 2, probe_tokens_per_domain=0).row
    assert row["bpb_by_domain"].keys() == expected["val_bpb_by_domain"].keys()
    for d, v in expected["val_bpb_by_domain"].items():
        assert row["bpb_by_domain"][d] == pytest.approx(v, rel=1e-5)
    assert row["bpb"] == pytest.approx(expected["val_bpb"], rel=1e-5)
    assert 0 <= row["accuracy"] <= 1


def test_cli_generate_streams_the_prompt_and_its_continuation(run_dir, capsys):
    assert main(["generate", str(run_dir), "--prompt", "héllo", "--max-new", "6",
                 "--temperature", "0"]) == 0
    cap = capsys.readouterr()
    assert cap.out.startswith("héllo") and cap.out.endswith("\n")
    assert "6 bytes in" in cap.err and "tokens/s" in cap.err
    model = load_run(run_dir).model
    want = generate(model, torch.tensor([list("héllo".encode())]), 6, temperature=0)
    text = bytes(want.new_tokens[0].tolist()).decode("utf-8", errors="replace")
    assert cap.out == "héllo" + text + "\n"


def test_cli_evaluate_writes_its_numbers(run_dir, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["evaluate", str(run_dir), "--scmoe", "0.5,0.1,2", "--json", str(out)]) == 0
    assert "val_bpb n/a" in capsys.readouterr().out
    row = json.loads(out.read_text())
    assert row["bpb"] is None and row["method"].startswith("SCMoE") and row["tokens"] > 0


def test_cli_evaluate_scores_the_training_split_on_request(run_dir, capsys):
    assert main(["evaluate", str(run_dir), "--split", "train", "--max-bytes", "100",
                 "--roe", "2,0.5"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("train_bpb ") and "RoE N=2, τ=0.5" in out
    run = load_run(run_dir)
    train_rows = run_validation(run.config, run.tokenizer, 100, "train")
    assert not all(torch.equal(train_rows[d], v) for d, v in
                   run_validation(run.config, run.tokenizer, 100).items() if d in train_rows)


def one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("divmoe: error: "), err
    for n in needles:
        assert n in err, (n, err)


@pytest.mark.parametrize("args,needles", [
    (["--prompt", "x" * 30], ["--prompt is 30 bytes, longer than", "model.seq_len=24"]),
    (["--prompt", "hi", "--max-new", "40"], ["at most 22 new tokens"]),
    (["--prompt", ""], ["--prompt is empty"]),
    (["--prompt", "hi", "--temperature", "-0.5"], ["temperature=-0.5 is not allowed"]),
    (["--prompt", "hi", "--top-p", "2"], ["top_p=2.0 is not allowed"]),
    (["--prompt", "hi", "--scmoe", "0.5,0.1"], ["--scmoe '0.5,0.1' is not allowed",
                                                "beta,alpha,weak_rank"]),
    (["--prompt", "hi", "--scmoe", "0.5,2,1"], ["alpha=2.0 is not allowed"]),
    (["--prompt", "hi", "--scmoe", "0.5,0.1,5"], ["weak_rank=5 is not allowed",
                                                  "moe.num_experts=4"]),
    (["--prompt", "hi", "--roe", "x,1"], ["--roe 'x,1' is not allowed", "N,tau"]),
    (["--prompt", "hi", "--roe", "0,1"], ["N=0 is not allowed"]),
    (["--prompt", "hi", "--roe", "2,-1"], ["tau=-1.0 is not allowed"]),
    (["--prompt", "hi", "--roe", "2,1", "--scmoe", "0.5,0.1,2"], ["cannot be combined"]),
    (["--prompt", "hi", "--set", "moe.top_k=9"], ["moe.top_k=9 is not allowed"]),
    (["--prompt", "hi", "--set", "moe.num_experts=6"], ["another configuration"]),
])
def test_cli_generate_names_what_is_wrong(run_dir, capsys, args, needles):
    assert main(["generate", str(run_dir)] + args) == 2
    one_line_error(capsys, *needles)


def test_cli_names_missing_runs_and_checkpoints(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "nope"), "--prompt", "a"]) == 2
    one_line_error(capsys, "nope is not a run folder: it does not exist")
    assert main(["evaluate", str(tmp_path)]) == 2
    one_line_error(capsys, "is not a divmoe run folder (no config.yaml)")
    _, cfg = tiny_model()
    (tmp_path / "config.yaml").write_text(dump_yaml(cfg))
    assert main(["generate", str(tmp_path), "--prompt", "a"]) == 2
    one_line_error(capsys, "has no checkpoint yet")


def test_cli_evaluate_names_bad_sizes(run_dir, capsys):
    assert main(["evaluate", str(run_dir), "--batch-size", "0"]) == 2
    one_line_error(capsys, "--batch-size 0 is not allowed")
    assert main(["evaluate", str(run_dir), "--max-bytes", "10"]) == 2
    one_line_error(capsys, "max_bytes_per_domain (10) must be >= seq_len + 1 (25)")


def test_rerouting_methods_refuse_other_routers(tmp_path, capsys):
    write_run(tmp_path / "run", VARIANTS["hash"])
    assert main(["generate", str(tmp_path / "run"), "--prompt", "a", "--roe", "2,1"]) == 2
    one_line_error(capsys, "RoE reroutes top-k routers only", "moe.router=hash")
