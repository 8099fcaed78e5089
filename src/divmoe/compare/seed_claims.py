"""The ``seed-claims`` study: what it trains and how each claim of ALGORITHMS.md is decided.

Everything here is fixed before the runs: the presets, the variants, the metric each claim is
judged by, the smallest effect that counts as reproducing it and the non-inferiority margins.
:mod:`.claims_study` runs it, :mod:`.claims_stats` computes the paired intervals and
:mod:`.claims_report` writes the page.

Pairing: every variant of seed s trains with ``train.seed=s`` (the same data order) and
``model.paired_init=true`` (every part whose shape a variant leaves alone starts from the same
weights). The two gradient-accumulation variants are paired with each other (their batches are
built differently from everybody else's).

Final numbers of a run: the full validation split (every validation byte of every domain)
evaluated at the last two checkpoints (the last two evaluations) and averaged; MaxVio on
training batches from the last two metrics rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .runner import Variant

# The model and budget. CPU: 3–5 min per run on one core (training and the final
# evaluation); 11 variants × 5 seeds in two single-thread processes took 1.77 h on a 2-core
# machine.
PRESETS: dict[str, list[str]] = {
    "cpu": ["data.tokenizer=bpe", "data.bpe_vocab=2048", "model.d_model=128",
            "model.n_layers=4", "model.n_heads=4", "model.seq_len=64", "model.paired_init=true",
            "moe.num_experts=8", "moe.top_k=2", "moe.expert_hidden=128",
            "train.steps=900", "train.batch_size=16", "train.eval_every=100",
            "train.warmup_steps=30", "train.eval_batch_size=64",
            "data.val_bytes_per_domain=8192", "train.threads=1"],
    # One GPU, one run at a time (--workers 1): 4× the width, 6 layers, twice the context,
    # ~10× the tokens per run. Not run yet: no GPU was available when it was written.
    "cuda": ["data.tokenizer=bpe", "data.bpe_vocab=4096", "model.d_model=512",
             "model.n_layers=6", "model.n_heads=8", "model.seq_len=128", "model.paired_init=true",
             "moe.num_experts=8", "moe.top_k=2", "moe.expert_hidden=512",
             "train.steps=3000", "train.batch_size=32", "train.eval_every=300",
             "train.warmup_steps=100", "train.eval_batch_size=64",
             "data.val_bytes_per_domain=16384", "parallel.device=cuda"],
    # Plumbing for the tests: a few steps of a tiny model, verdicts mean nothing.
    "quick": ["data.tokenizer=bpe", "data.bpe_vocab=320", "model.d_model=16",
              "model.n_layers=1", "model.n_heads=2", "model.seq_len=16", "model.paired_init=true",
              "moe.num_experts=4", "moe.top_k=2", "moe.expert_hidden=16",
              "train.steps=8", "train.batch_size=4", "train.eval_every=4",
              "train.warmup_steps=2", "train.eval_batch_size=32",
              "data.val_bytes_per_domain=512", "train.threads=1"],
}
DEFAULT_SEEDS = {"cpu": 5, "cuda": 5, "quick": 2}
#: validation bytes per domain of the final evaluation: more than any domain holds (all of it)
FULL_VALIDATION_BYTES = {"cpu": 1 << 30, "cuda": 1 << 30, "quick": 2048}


def _settings(preset: str) -> dict[str, str]:
    return dict(kv.split("=", 1) for kv in PRESETS[preset])


def hetero_widths(E: int, h: int) -> list[int]:
    """Widths with mean h (the same parameter count as the homogeneous pool): pairs
    (h/2, 3h/2), (3h/4, 5h/4) repeated."""
    pattern = [h // 2, 3 * h // 2, 3 * h // 4, 5 * h // 4]
    widths = [pattern[i % 4] for i in range(E)]
    widths[-1] += E * h - sum(widths)
    return widths


def variants(preset: str = "cpu") -> list[Variant]:
    s = _settings(preset)
    E, h, bs = int(s["moe.num_experts"]), int(s["moe.expert_hidden"]), int(s["train.batch_size"])
    accum = 4 if bs % 4 == 0 else 2
    ga = [f"train.grad_accum={accum}", f"train.batch_size={bs // accum}",
          "data.batch_domains=single"]
    return [
        Variant("topk", []),   # softmax top-2, aux_loss + z_loss: the library default
        Variant("sigmoid_aux", ["moe.score_func=sigmoid"]),
        Variant("loss_free", ["moe.score_func=sigmoid", "moe.balance=[z_loss,loss_free_bias]"]),
        Variant("ga_micro", ga + ["moe.aux_loss_scope=micro_batch"]),
        Variant("ga_global", ga + ["moe.aux_loss_scope=global_batch",
                                   "moe.aux_loss_global_counts=counting_pass"]),
        Variant("expert_choice", ["moe.router=expert_choice", "moe.balance=[z_loss]"]),
        Variant("dynamic_topp", ["moe.router=dynamic_topp", "moe.top_p=0.4", f"moe.top_k={E}",
                                 "moe.balance=[aux_loss,z_loss,routing_entropy]"]),
        # k raised from 2 to 3 with N = E/2 null experts: AdaMoE's null target N/(E+N) = 1/3
        # of the slots leaves 2 real experts per token on average, the baseline's expert FLOPs
        Variant("null_experts", ["moe.router=null_experts", f"moe.num_null_experts={E // 2}",
                                 "moe.top_k=3", "moe.balance=[aux_loss,z_loss,null_usage]"]),
        Variant("hetero", ["moe.expert_widths=[" + ",".join(map(str, hetero_widths(E, h))) + "]",
                           "moe.balance=[aux_loss,z_loss,small_expert_bias]"]),
        Variant("diversity", ["moe.diversity=[exclusivity]"]),
        Variant("dpsl", ["moe.balance=[aux_loss,z_loss,dirichlet_prior]"]),
    ]


@dataclass(frozen=True)
class Part:
    """One decided quantity of a claim, as a paired difference A − B per seed (or the log of
    the ratio A / B with ``ratio``, or the log2 speed-up for ``speedup``).

    ``kind``:
      * ``better``: the claim is that A is better by at least ``delta`` (``lower`` says which
        way is better). yes = 95% interval excludes 0 on the claimed side and the mean is at
        least ``delta``; no = the interval excludes every effect ≥ ``delta``; else unclear;
      * ``no_worse``: non-inferiority with margin ``delta``. holds = the whole interval is
        within ``delta`` of no difference on the worse side; fails = the whole interval is
        beyond it; else unclear;
      * ``equal``: equivalence within ±``delta``. holds = the interval lies inside; fails =
        it lies wholly outside; else unclear.
    """
    metric: str
    kind: str
    delta: float
    lower: bool = True
    ratio: bool = False
    label: str = ""


@dataclass(frozen=True)
class Claim:
    number: int
    title: str
    source: str
    quote: str                    # the claim as ALGORITHMS.md gives it
    design: str                   # how this study can show it
    variants: tuple[str, str]     # (A: the method, B: its baseline)
    parts: tuple[Part, ...] = field(default_factory=tuple)


BPB_MARGIN = 0.02       # non-inferiority margin on val bpb (about 1% of the final bpb)
BPB_GAIN = 0.01         # the smallest val-bpb improvement that counts as "better loss"
REL_GAIN = 0.10         # specialisation: the smallest gain, 10% of the baseline's mean
MAXVIO_GAIN = 0.05      # MaxVio: the smallest reduction that counts as "better balance"
MAXVIO_EQUAL = 0.10     # "at equal balance": MaxVio within ±0.10 of the baseline's

_bpb_no_worse = Part("val_bpb", "no_worse", BPB_MARGIN, label="val bpb")
_bpb_better = Part("val_bpb", "better", BPB_GAIN, label="val bpb")
_spec_better = Part("mi_given_token_bits", "better", REL_GAIN, lower=False, ratio=True,
                    label="I(expert; domain | token)")

CLAIMS = [
    Claim(1, "Loss-free balancing vs aux loss", "Auxiliary-Loss-Free Load Balancing",
          "better performance and better load balance than aux loss",
          "sigmoid gating in both arms (the paper's setting); MaxVio on training batches",
          ("loss_free", "sigmoid_aux"),
          (Part("train_max_vio", "better", MAXVIO_GAIN, label="MaxVio (training batches)"),
           _bpb_no_worse)),
    Claim(2, "Global-batch vs micro-batch aux loss", "Demons in the Detail",
          "greatly improves the domain specialization of MoE experts (and perplexity)",
          "4 micro-batches of one domain each per step (data.batch_domains=single); global "
          "counts from a counting pass over the step",
          ("ga_global", "ga_micro"), (_spec_better, _bpb_no_worse)),
    Claim(3, "Expert choice vs top-2", "Expert Choice Routing",
          "improves training convergence time by more than 2x",
          "causal evaluation (each token routed from its own scores, val_bpb_causal); speed-up "
          "= steps top-2 took to its final causal bpb / steps expert choice took to reach it",
          ("expert_choice", "topk"),
          (Part("speedup", "better", 1.0, lower=False, label="log2 convergence speed-up"),)),
    Claim(4, "Dynamic top-p vs top-2", "Harder Tasks Need More Experts",
          "average improvement of 0.7% with less than 90% activated parameters",
          "p = 0.4 without a cap (top_k = E) and its entropy loss",
          ("dynamic_topp", "topk"),
          (Part("activated_params", "better", 0.10, ratio=True, label="activated params"),
           _bpb_no_worse)),
    Claim(5, "Null experts (k raised) vs top-2", "AdaMoE",
          "reduce FLOPs by 14.5% while increasing accuracy by 1.69%",
          "k = 3 over 8 real + 4 null experts: 2 real experts per token on average, matched "
          "expert FLOPs with top-2; the claim at matched FLOPs is the better loss",
          ("null_experts", "topk"),
          (_bpb_better, Part("activated_params", "no_worse", 0.02, ratio=True,
                             label="activated params"))),
    Claim(6, "Heterogeneous experts vs homogeneous", "HMoE",
          "lower loss with fewer activated parameters",
          "widths with the homogeneous mean (equal total parameters) and HMoE's parameter "
          "penalty (small_expert_bias)",
          ("hetero", "topk"),
          (_bpb_better, Part("activated_params", "no_worse", 0.0, ratio=True,
                             label="activated params"))),
    Claim(7, "Diversity regulariser on vs off", "MMoEEx",
          "induce more diversity among experts",
          "exclusivity at weight 0.1, judged by loss and specialisation (not by the quantity "
          "it optimises)",
          ("diversity", "topk"), (_spec_better, _bpb_no_worse)),
    Claim(8, "DPSL vs aux loss", "DPSL",
          "controls balance vs. specialisation",
          "aux_loss + dirichlet_prior against aux_loss alone: more specialisation at equal "
          "balance",
          ("dpsl", "topk"),
          (_spec_better, Part("train_max_vio", "equal", MAXVIO_EQUAL,
                              label="MaxVio (training batches)"), _bpb_no_worse)),
]


def rules_text() -> str:
    """The verdict rules, as the study page states them."""
    return (
        "Each claim is decided from the paired differences A − B over the seeds (A the method, "
        "B its baseline, same seed = same data order and the same initial weights of every "
        "shared part), through their mean and two-sided 95% Student-t interval. Ratios "
        "(activated parameters, specialisation) are compared as log ratios, the convergence "
        "speed-up as log2. Fixed before the runs:\n\n"
        f"- *better by δ*: yes when the interval excludes 0 on the claimed side and the mean "
        f"is at least δ; no when the interval excludes every effect of δ or more; else "
        f"unclear. δ: {BPB_GAIN} bpb for a lower loss, {MAXVIO_GAIN} for a lower MaxVio, "
        f"{REL_GAIN:.0%} of the baseline for specialisation, 10% for activated parameters "
        f"(\"less than 90%\"), a factor 2 (log2 = 1) for the convergence speed-up;\n"
        f"- *no worse within m* (non-inferiority): holds when the whole interval is below m, "
        f"fails when the whole interval is above m, else unclear. m: {BPB_MARGIN} bpb for the "
        f"loss, 2% (null experts) or 0% (HMoE) for activated parameters;\n"
        f"- *equal within ±m*: holds when the interval lies inside ±m, fails when it lies "
        f"wholly outside; m = {MAXVIO_EQUAL} for MaxVio.\n\n"
        "A claim is **reproduced** when every part is yes/holds, **not reproduced** when any "
        "part is no/fails, **inconclusive** otherwise.\n")
