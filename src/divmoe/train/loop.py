"""`divmoe train`: train the small MoE LM on the embedded (or the user's) corpus, evaluate, checkpoint, report.

A run folder holds ``config.yaml``, ``metrics.jsonl`` (one row per evaluation),
``routing.json`` (expert × domain routing counts of the latest evaluation),
``summary.json``, ``checkpoint/`` and ``report.html``.

Determinism: micro-batch j of step i is sampler batch ``i · grad_accum + j``, a pure
function of (seed, i, j), and the checkpoint carries the
optimizer, RNG and running-loss state, so a resumed run reproduces an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ..config import ConfigError, dump_yaml, to_dict
from ..data.dynamic_mix import DynamicMixer
from ..data.mixture import MixtureSampler, unigram_entropy_bits, validation_set
from ..data.tokenizer import run_tokenizer
from ..data.user_corpus import load_splits
from ..diagnostics import expert_output_vendi
from ..diagnostics.specialization import conditional_mutual_information_bits
from ..experts import every_expert
from ..files import atomic_write_text, check_output_folder
from ..models import MoETransformer
from ..parallel.expert_shards import (full_model_state, full_optimizer_named,
                                      named_optimizer_state, optimizer_state_from_named,
                                      shard_optimizer_named)
from ..parallel.all_to_all import metered
from ..parallel.placement import load_placement
from ..parallel.ranks import check_run_parallel, init_ranks, launched_distributed
from ..balance.loss_free import max_vio
from ..routing import Router, causal_routing
from ..routing.plan import count_per_expert
from .checkpoint import checkpoint_candidates, load_latest, save_checkpoint
from .config import ParallelConfig, RunConfig, load_config, same_run
from .run_folder import RunError, locked_run
from .step import batch_max_vio, train_step
from .tensorboard import ScalarLog, tensorboard_available

LN2 = math.log(2.0)


def lr_at(step: int, cfg) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio · lr`` at the last step."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def optimizer_param_names(model: torch.nn.Module) -> list[list[str]]:
    """The parameter names of each optimizer group: matrices (weight decay), then the rest."""
    named = list(model.named_parameters())
    return [[n for n, p in named if p.dim() >= 2 and "embed" not in n],
            [n for n, p in named if p.dim() < 2 or "embed" in n]]


def build_optimizer(model: torch.nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    params = dict(model.named_parameters())
    decay, no_decay = optimizer_param_names(model)
    groups = [{"params": [params[n] for n in decay], "weight_decay": cfg.train.weight_decay},
              {"params": [params[n] for n in no_decay], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=(0.9, 0.95))


@dataclass
class Evaluation:
    row: dict
    routing: dict | None = None


def probe_batch(val: dict[str, torch.Tensor], tokens_per_domain: int = 256) -> torch.Tensor:
    """The fixed expert-diversity probe: the first ⌈tokens_per_domain / seq_len⌉ validation
    windows of every domain (inputs only), stacked [N, seq_len]. Deterministic."""
    parts = []
    for d in sorted(val):
        seq_len = val[d].shape[1] - 1
        parts.append(val[d][: -(-tokens_per_domain // seq_len), :-1])
    return torch.cat(parts)


@torch.no_grad()
def expert_vendi_by_layer(model: MoETransformer, probe_BS: torch.Tensor, ranks=None) -> list[float]:
    """Vendi score across each MoE layer's experts of their outputs on the probe's hidden states
    entering that layer (captured by forward pre-hooks during one extra eval-mode forward);
    see :func:`divmoe.diagnostics.expert_output_vendi` (the one ``divmoe analyze`` reports).
    With experts sharded over ``ranks``, every rank runs the same probe and the outputs of all
    experts are gathered (the score does not depend on the experts' order)."""
    moes = [model.blocks[i].mlp for i in model.moe_layers]
    captured: dict[int, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(
        lambda mod, args, li=li: captured.__setitem__(li, args[0].detach()))
        for li, m in enumerate(moes)]
    try:
        model(probe_BS.to(model.embed.weight.device))
    finally:
        for h in hooks:
            h.remove()
    scores = []
    for li, m in enumerate(moes):
        out_ETD = every_expert(m.experts, captured[li].reshape(-1, m.d_model))
        if m.shard is not None:
            parts = [torch.empty_like(out_ETD) for _ in range(ranks.expert)]
            dist.all_gather(parts, out_ETD.contiguous(), group=ranks.expert_group)
            out_ETD = torch.cat(parts)
        scores.append(expert_output_vendi(out_ETD.cpu()))
    return scores


def _token_expert_counts(tokens_BS: torch.Tensor, expert_ids_TK: torch.Tensor, V: int,
                         E: int) -> torch.Tensor:
    """Routed slots per (input token id, expert), flattened to [V · E] int64."""
    tok_TK = tokens_BS.reshape(-1, 1).expand_as(expert_ids_TK)
    ok = expert_ids_TK >= 0
    return torch.bincount(tok_TK[ok] * E + expert_ids_TK[ok], minlength=V * E)


def _target_bytes(chunk: torch.Tensor, token_bytes: torch.Tensor | None) -> int:
    """Bytes the window batch's targets stand for (one per token without a table: bytes)."""
    targets = chunk[:, 1:]
    return targets.numel() if token_bytes is None else int(token_bytes[targets].sum())


@torch.no_grad()
def _causal_bpb(model: MoETransformer, val: dict[str, torch.Tensor], batch_size: int, ranks,
                batch_row: dict, token_bytes: torch.Tensor | None) -> dict:
    """``val_bpb_causal`` (and per domain): validation bpb with every token routed from
    itself and its prefix (:func:`~divmoe.routing.causal_routing`). Batch-dependent routers
    (expert choice, Sinkhorn, soft merging) need this second pass; for every other model it
    is the batch evaluation's number (routing is per token)."""
    if not any(isinstance(m, Router) and m.batch_dependent for m in model.modules()):
        return {"val_bpb_causal": batch_row["val_bpb"],
                "val_bpb_causal_by_domain": dict(batch_row["val_bpb_by_domain"])}
    model.eval()
    device = model.embed.weight.device
    domains = sorted(val)
    sums = torch.zeros(len(domains), 2, dtype=torch.float64)  # (loss · tokens, bytes)
    with causal_routing(model):
        for di, d in enumerate(domains):
            for chunk in val[d].split(batch_size):
                if ranks is not None:
                    chunk = chunk.tensor_split(ranks.world)[ranks.rank]
                on = chunk.to(device)
                out = model(on[:, :-1], on[:, 1:])  # every rank runs (expert all-to-all)
                if chunk.shape[0]:  # a rank may hold none of a short batch (its mean is NaN)
                    sums[di] += torch.tensor([float(out.loss) * chunk[:, 1:].numel(),
                                              _target_bytes(chunk, token_bytes)],
                                             dtype=torch.float64)
    model.train()
    if ranks is not None:
        sums = ranks.sum(sums)
    return {"val_bpb_causal": float(sums[:, 0].sum() / sums[:, 1].sum()) / LN2,
            "val_bpb_causal_by_domain": {d: float(sums[i, 0] / sums[i, 1]) / LN2
                                         for i, d in enumerate(domains)}}


@torch.no_grad()
def evaluate(model: MoETransformer, val: dict[str, torch.Tensor], batch_size: int,
             probe_tokens_per_domain: int = 256, ranks=None,
             token_bytes: torch.Tensor | None = None) -> Evaluation:
    """Validation loss per domain (``val_loss`` in nats per token; ``val_bpb`` in bits per
    byte of the text, each target token counting the bytes ``token_bytes[id]`` it stands for,
    one without the table: bytes) with the
    routers' batch rule and with causal routing (``val_bpb_causal``), MaxVio (mean
    over the single-domain validation batches, and ``max_vio_pooled`` over the whole set),
    loads, ``mi_given_token_bits`` (I(expert; domain | token),
    :func:`~divmoe.diagnostics.specialization.conditional_mutual_information_bits`) and the
    expert-output Vendi score on the fixed probe (``probe_tokens_per_domain``;
    0 = off).

    With ``ranks`` (a distributed run) every rank scores its share of each validation batch's
    sequences and the sums are reduced, so every rank returns the whole validation set's
    numbers; a batch's MaxVio comes from its counts summed over the ranks."""
    model.eval()
    device = model.embed.weight.device  # windows stay on the CPU, counts come back to it
    domains = sorted(val)
    moe_layers = model.moe_layers
    L, E = len(moe_layers), model.moe_config.num_experts
    loss_sum = {d: 0.0 for d in domains}
    tokens = {d: 0 for d in domains}
    nbytes = {d: 0 for d in domains}
    counts_LED = torch.zeros(L, E, len(domains), dtype=torch.int64)
    V = model.config.vocab_size
    counts_LVED = torch.zeros(L, V * E, len(domains), dtype=torch.int64)  # by input token id
    vio_sum, vio_batches = torch.zeros(L, dtype=torch.float64), 0
    act_sum, act_tokens = torch.zeros(L, dtype=torch.float64), torch.zeros(L, dtype=torch.float64)
    for di, d in enumerate(domains):
        for chunk in val[d].split(batch_size):
            if ranks is not None:
                chunk = chunk.tensor_split(ranks.world)[ranks.rank]
            on = chunk.to(device)
            out = model(on[:, :-1], on[:, 1:])
            if chunk.shape[0]:  # a rank may hold none of a short batch (its mean is NaN)
                loss_sum[d] += float(out.loss) * chunk[:, 1:].numel()
                tokens[d] += chunk[:, 1:].numel()
                nbytes[d] += _target_bytes(chunk, token_bytes)
            load_LE = torch.zeros(L, E, dtype=torch.float64)
            for li, s in enumerate(out.stats):
                ids = s.expert_ids.cpu()
                counts_LED[li, :, di] += count_per_expert(ids, E)  # chosen experts
                counts_LVED[li, :, di] += _token_expert_counts(chunk[:, :-1], ids, V, E)
                load_LE[li] = s.tokens_per_expert.double().cpu()
                act_sum[li] += float(s.activated_params_mean) * s.num_tokens
                act_tokens[li] += s.num_tokens
            if ranks is not None and L:
                load_LE = ranks.sum(load_LE)
            for li in range(L):
                vio_sum[li] += float(max_vio(load_LE[li]))
            vio_batches += 1
    model.train()
    if ranks is not None:
        sums = ranks.sum(torch.tensor([[loss_sum[d], tokens[d], nbytes[d]] for d in domains],
                                      dtype=torch.float64))
        loss_sum = {d: float(sums[i, 0]) for i, d in enumerate(domains)}
        tokens = {d: int(sums[i, 1]) for i, d in enumerate(domains)}
        nbytes = {d: int(sums[i, 2]) for i, d in enumerate(domains)}
        counts_LED = ranks.sum(counts_LED)
        if L:
            counts_LVED = ranks.sum(counts_LVED)
        act_sum, act_tokens = ranks.sum(act_sum), ranks.sum(act_tokens)
    bpb = {d: loss_sum[d] / nbytes[d] / LN2 for d in domains}
    val_loss = sum(loss_sum.values()) / sum(tokens.values())
    row = {"val_loss": val_loss, "val_bpb": sum(loss_sum.values()) / sum(nbytes.values()) / LN2,
           "val_bpb_by_domain": bpb}
    row.update(_causal_bpb(model, val, batch_size, ranks, row, token_bytes))
    if not L:
        row["max_vio"] = None
        return Evaluation(row)
    vio_L = vio_sum / max(vio_batches, 1)
    load_LE = counts_LED.sum(-1).double()
    # MaxVio_global of Loss-Free Balancing: the loads of the whole validation set, all domains
    # pooled (``max_vio`` averages single-domain batches, where specialisation reads as
    # imbalance)
    pooled_L = torch.stack([max_vio(load_E) for load_E in load_LE])
    load_LE = load_LE / load_LE.sum(-1, keepdim=True).clamp_min(1)
    mi_token_L = [conditional_mutual_information_bits(c.view(V, E, -1)) for c in counts_LVED]
    row.update(max_vio=float(vio_L.mean()), max_vio_by_layer=vio_L.tolist(),
               mi_given_token_bits=sum(mi_token_L) / L, mi_given_token_bits_by_layer=mi_token_L,
               max_vio_pooled=float(pooled_L.mean()), max_vio_pooled_by_layer=pooled_L.tolist(),
               expert_load=load_LE.tolist(),
               # parameters each token touched, token-weighted per layer, mean over MoE layers
               activated_params_mean=float((act_sum / act_tokens.clamp_min(1)).mean()))
    if probe_tokens_per_domain:
        model.eval()
        vendi_L = expert_vendi_by_layer(model, probe_batch(val, probe_tokens_per_domain), ranks)
        model.train()
        row.update(expert_vendi=sum(vendi_L) / len(vendi_L), expert_vendi_by_layer=vendi_L)
    routing = {"domains": domains, "layers": moe_layers, "counts": counts_LED.tolist()}
    return Evaluation(row, routing)


def _write_json_atomic(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1))


def _rewrite_metrics(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def _read_metrics(path: Path) -> list[dict]:
    """The rows of metrics.jsonl; a torn last line (the process died while appending it) is
    dropped, a bad line before it is an error naming the file and line."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            if i == len(lines) - 1:
                break
            raise RunError(f"{path}:{i + 1}: not a JSON metrics row; fix or remove that line") from None
    return rows


class _StopAtStepBoundary:
    """First Ctrl-C asks the loop to stop after the current step (then it checkpoints);
    a second one interrupts at once."""

    def __init__(self):
        self.requested = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step (Ctrl-C again to abort)", file=sys.stderr)

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


@dataclass
class TrainResult:
    run_dir: Path
    metrics: list[dict] = field(default_factory=list)
    interrupted: bool = False


def train(out: str | Path, config: RunConfig | None = None, resume: bool = False,
          progress: bool = True, stop_after: int | None = None, report: bool = True) -> TrainResult:
    """Train (or resume) a run in ``out``. ``stop_after`` ends the run early at that step as if
    interrupted (used to test resuming); ``report=False`` skips report.html (proxy runs).
    The run folder is locked while this runs.

    Under ``torchrun`` (WORLD_SIZE > 1), or with a process group already initialised, every
    rank calls this: each trains on its shard of every batch, the experts are sharded over
    ``parallel.expert`` ranks, and rank 0 writes the run folder (:mod:`divmoe.parallel.ranks`).
    """
    parallel = config.parallel if config is not None else ParallelConfig()
    ranks = None
    if launched_distributed() or (dist.is_initialized() and dist.get_world_size() > 1):
        ranks = init_ranks(parallel.expert)
    elif parallel.expert > 1:
        raise ConfigError(f"parallel.expert={parallel.expert} needs {parallel.expert} or more "
                          f"processes: launch with torchrun --nproc-per-node "
                          f"{parallel.expert} -m divmoe train ...")

    def open_run_folder(stack: contextlib.ExitStack) -> Path:
        run_dir = check_output_folder(out)
        if resume and not (run_dir / "config.yaml").is_file():
            raise RunError(f"--resume: {run_dir} holds no run (no config.yaml); start it "
                           f"without --resume")
        run_dir.mkdir(parents=True, exist_ok=True)
        stack.enter_context(locked_run(run_dir))
        return run_dir

    try:
        with contextlib.ExitStack() as stack:
            run_dir = ranks.agree(open_run_folder, stack) if ranks else open_run_folder(stack)
            return _train(run_dir, config, resume, progress, stop_after, report, ranks, parallel)
    finally:
        if ranks is not None and ranks.owns_group:
            dist.destroy_process_group()


def training_device(name: str, ranks=None) -> torch.device:
    """``parallel.device`` as a torch device; under torchrun each rank takes its local GPU."""
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("parallel.device=cuda: no CUDA device is visible "
                          "(torch.cuda.is_available() is False); use parallel.device=cpu")
    if ranks is None:
        return torch.device("cuda")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    return device


def _placement(cfg: RunConfig, model: MoETransformer, ranks) -> dict[int, list[list[int]]] | None:
    """The experts each rank holds per MoE block, from ``parallel.placement`` (None: the
    default contiguous split); refused when made for other ranks, experts or MoE blocks."""
    path = cfg.parallel.placement
    if path is None:
        return None
    placement = load_placement(path)
    placement.check_run(model.moe_layers, cfg.moe.num_experts, ranks.expert,
                        f"parallel.placement={path}")
    return placement.experts_by_rank


def _log(msg: str) -> None:
    print(f"divmoe: {msg}", file=sys.stderr, flush=True)


def _train(run_dir: Path, config: RunConfig | None, resume: bool, progress: bool,
           stop_after: int | None, report: bool, ranks, parallel: ParallelConfig) -> TrainResult:
    writer = ranks is None or ranks.is_writer
    log = _log if writer else (lambda msg: None)

    def on_writer(fn, *args):  # file writes: rank 0's, and its failure stops every rank
        return ranks.agree(fn, *args) if ranks else fn(*args)

    if resume:
        saved = load_config(run_dir / "config.yaml")
        saved.parallel = parallel  # the process layout may change on resume
        if config is not None and to_dict(config) != to_dict(saved):
            # Only the length of the run may change on resume; anything else would not be a resume.
            if not same_run(config, saved):
                raise ConfigError("--resume: the configuration differs from the saved "
                                  f"{run_dir / 'config.yaml'}; only train.steps may change "
                                  f"(and parallel.*, the process layout)")
            saved.train.steps = config.train.steps
        config = saved
    else:
        if checkpoint_candidates(run_dir) or (run_dir / "metrics.jsonl").exists():
            raise RunError(f"{run_dir} already holds a run; pass --resume to continue it, "
                           "or choose another --out")
        config = config or load_config()
    cfg = config
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)

    if ranks is not None:
        check_run_parallel(cfg, ranks)
    if cfg.parallel.placement and (ranks is None or ranks.expert == 1):
        raise ConfigError("parallel.placement applies under torchrun with parallel.expert > 1")

    device = training_device(cfg.parallel.device, ranks)
    train_docs, val_docs = load_splits(cfg.data.corpus, cfg.model.seq_len, cfg.data.val_fraction)
    tokenizer = run_tokenizer(run_dir, cfg.data, (d.text for d in train_docs), write=writer)
    if cfg.data.tokenizer != "bytes":
        cfg.model.vocab_size = tokenizer.vocab_size
    torch.manual_seed(cfg.train.seed)
    model = MoETransformer(cfg.model, cfg.moe).to(device)
    optimizer = build_optimizer(model, cfg)
    params = model.param_counts()  # of the whole model, before any sharding
    metrics_path = run_dir / "metrics.jsonl"
    state = {"step": 0, "loss_sum": 0.0, "loss_count": 0, "train_max_vio_sum": 0.0,
             "train_time": 0.0, "tokens_seen": 0, "elapsed": 0.0}
    metrics: list[dict] = []
    if resume:
        metrics = _read_metrics(metrics_path)
        loaded = load_latest(run_dir, model, optimizer, log=log)
        if loaded is None and any(r.get("step", 0) > 0 for r in metrics):
            raise RunError(f"--resume: {run_dir} has metrics up to step "
                           f"{max(r['step'] for r in metrics)} but no checkpoint (checkpoint/ "
                           f"and checkpoint.prev/ are gone), so it cannot continue; remove "
                           f"{run_dir} to start over, or choose another --out")
        if loaded is None:  # killed before its first checkpoint: nothing was done yet
            log(f"{run_dir} has no checkpoint yet: starting it from step 0")
            resume, metrics = False, []
        else:
            state = {"train_max_vio_sum": 0.0, **loaded[1]}  # checkpoints before it lack it
            if cfg.train.steps < state["step"]:
                raise ConfigError(f"--resume: train.steps={cfg.train.steps} but {loaded[0]} is "
                                  f"already at step {state['step']}; train.steps may only stay "
                                  f"or grow on resume")
    if ranks is not None and ranks.expert > 1:
        # The checkpoint holds the single-process state; each rank keeps its experts of it.
        full_names = optimizer_param_names(model)
        full_named = named_optimizer_state(optimizer, sum(full_names, []))
        model.shard_experts(ranks.expert_group, _placement(cfg, model, ranks))
        optimizer = build_optimizer(model, cfg)
        shard_names = optimizer_param_names(model)
        optimizer.load_state_dict(optimizer_state_from_named(
            shard_optimizer_named(model, full_named), optimizer, shard_names))
    if ranks is not None:
        ranks.agree(lambda: None)  # every rank has read the run folder before rank 0 writes it
    on_writer(atomic_write_text, run_dir / "config.yaml", dump_yaml(cfg))
    names = sorted({d.domain for d in train_docs})
    unknown = sorted(set(cfg.data.weights or {}) - set(names))
    if unknown:
        raise ConfigError(f"data.weights has unknown domain {unknown[0]!r}; "
                          f"allowed domains: {', '.join(names)}")
    sampler = MixtureSampler(train_docs, cfg.model.seq_len, seed=cfg.train.seed,
                             weights=cfg.data.weights, temperature=cfg.data.temperature,
                             batch_domains=cfg.data.batch_domains, tokenizer=tokenizer)
    mixer = DynamicMixer(sampler, cfg.data, model) if cfg.data.mixing == "dynamic" else None
    val = validation_set(val_docs, cfg.model.seq_len, cfg.data.val_bytes_per_domain, tokenizer)

    if resume:
        torch.set_rng_state(state.pop("rng"))  # here, where the uninterrupted run's RNG stands
        metrics = [r for r in metrics if r["step"] <= state["step"]]
        on_writer(_rewrite_metrics, metrics_path, metrics)
        if "mix_weights" in state:
            sampler.set_weights(state["mix_weights"])
    elif metrics_path.exists():
        on_writer(metrics_path.unlink, True)

    unigram = unigram_entropy_bits(train_docs)

    def checkpoint():
        full = {**state, "rng": torch.get_rng_state()}
        if ranks is not None and ranks.expert > 1:  # every rank sends its experts to rank 0
            weights = full_model_state(model, ranks)
            named = full_optimizer_named(model, optimizer, sum(optimizer_param_names(model), []),
                                         ranks)
            if writer:
                full["optimizer"] = optimizer_state_from_named(named, optimizer, full_names)
        else:
            weights = model.state_dict()
            full["optimizer"] = optimizer.state_dict()
        on_writer(save_checkpoint, run_dir, weights, full)

    def write_summary(interrupted: bool):
        _write_json_atomic(run_dir / "summary.json", {
            "model": "moe" if cfg.model.moe else "dense", "unigram_bpb": unigram,
            "wall_time_s": state["elapsed"], "steps": state["step"], "interrupted": interrupted,
            **params, "final": metrics[-1] if metrics else None})

    def record(row, routing):
        with open(metrics_path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        if scalar_log is not None:
            scalar_log.write(row)
        if routing is not None:
            _write_json_atomic(run_dir / "routing.json", routing)

    sharded = ranks is not None and ranks.expert > 1
    exchanged = {"bytes": 0, "tokens": 0}  # this rank's all-to-all bytes since the last row

    def exchange_bytes_per_token():
        if not sharded or not exchanged["tokens"]:
            return None
        total = float(ranks.sum(torch.tensor(float(exchanged["bytes"]), dtype=torch.float64)))
        per_token = total / exchanged["tokens"]
        exchanged.update(bytes=0, tokens=0)
        return per_token

    def run_eval():
        ev = evaluate(model, val, cfg.train.eval_batch_size, ranks=ranks,
                      token_bytes=tokenizer.token_bytes)
        row = {"step": state["step"],
               "train_loss": state["loss_sum"] / state["loss_count"] if state["loss_count"] else None,
               **ev.row,
               # MaxVio_batch of Loss-Free Balancing: each training step's whole batch, mean
               # over the steps since the last evaluation (and over MoE layers)
               "train_max_vio": (float(state["train_max_vio_sum"]) / state["loss_count"]
                                 if state["loss_count"] and model.moe_layers else None),
               "tokens_per_s": state["tokens_seen"] / state["train_time"] if state["train_time"] else None,
               "elapsed_s": state["elapsed"], "lr": lr_at(max(state["step"] - 1, 0), cfg),
               "mix_weights": dict(sampler.weights),
               "all_to_all_bytes_per_token": exchange_bytes_per_token()}
        metrics.append(row)
        on_writer(record, row, ev.routing)
        state.update(loss_sum=0.0, loss_count=0, train_max_vio_sum=0.0, train_time=0.0,
                     tokens_seen=0)
        checkpoint()
        return row

    scalar_log = ScalarLog(run_dir, state["step"]) if writer and tensorboard_available() else None
    steps = cfg.train.steps
    bar = tqdm(total=steps, initial=state["step"], disable=not (progress and writer), unit="step",
               dynamic_ncols=True, desc=f"train {run_dir.name}")
    interrupted = False
    t_start = time.perf_counter() - state["elapsed"]
    ctrl_c = _StopAtStepBoundary()
    try:
        if state["step"] == 0 and not metrics:
            run_eval()
        while state["step"] < steps:
            stop = ctrl_c.requested or (stop_after is not None and state["step"] >= stop_after)
            if ranks is not None:  # a Ctrl-C reaches the ranks at different steps: stop together
                stop = bool(ranks.sum(torch.tensor(float(stop))))
            if stop:
                interrupted = True
                break
            t0 = time.perf_counter()
            step = state["step"]
            accum = cfg.train.grad_accum
            batches = [sampler.batch(step * accum + j, cfg.train.batch_size)[0].to(device)
                       for j in range(accum)]
            step_tokens = sum(b[:, :-1].numel() for b in batches)
            if ranks is not None:  # this rank's equal share of every micro-batch
                batches = [b.tensor_split(ranks.world)[ranks.rank] for b in batches]
            try:
                with metered() as meter:
                    result = train_step(model, optimizer, batches, cfg.train.grad_clip,
                                        lr=lr_at(step, cfg), ranks=ranks)
            except FloatingPointError as exc:
                raise FloatingPointError(f"{exc} at step {step}; the last checkpoint in "
                                         f"{run_dir} is intact (lower train.lr?)") from None
            ce_mean = float(result.loss)
            if result.load_LE.numel():  # a tensor until the row: no host read per step
                state["train_max_vio_sum"] = state["train_max_vio_sum"] + batch_max_vio(result.load_LE)
            state["step"] += 1
            state["loss_sum"] += ce_mean
            state["loss_count"] += 1
            state["tokens_seen"] += step_tokens
            exchanged["bytes"] += meter.bytes_sent
            exchanged["tokens"] += step_tokens
            state["train_time"] += time.perf_counter() - t0
            if mixer is not None and state["step"] % cfg.data.mix_every == 0:
                state["mix_weights"] = mixer.update(model)
            state["elapsed"] = time.perf_counter() - t_start
            bar.update(1)
            bar.set_postfix(loss=f"{state['loss_sum'] / state['loss_count']:.3f}", refresh=False)
            if state["step"] % cfg.train.eval_every == 0 or state["step"] == steps:
                row = run_eval()
                bar.set_postfix(val_bpb=f"{row['val_bpb']:.3f}")
    except KeyboardInterrupt:
        # A second Ctrl-C: the step in flight may be half-applied, so keep the last checkpoint.
        bar.close()
        ctrl_c.restore()
        if writer:
            print(f"aborted; {run_dir / 'checkpoint'} holds the last complete state",
                  file=sys.stderr)
        raise
    finally:
        bar.close()
        ctrl_c.restore()
        if scalar_log is not None:
            scalar_log.close()
    if interrupted:
        checkpoint()  # nothing lost: the running-loss state is in the checkpoint too
        if ctrl_c.requested and writer:
            print(f"interrupted at step {state['step']}; continue with --resume", file=sys.stderr)
    state["elapsed"] = time.perf_counter() - t_start
    on_writer(write_summary, interrupted)
    if report:
        from ..report import write_report
        on_writer(write_report, run_dir)
    return TrainResult(run_dir, metrics, interrupted)
