"""What ``divmoe generate`` and ``divmoe evaluate`` do, behind their argument parsing."""

from __future__ import annotations

import json
import sys

import torch

from ..files import atomic_write_text
from .generate import check_sampling, generate
from .methods import Plain
from .roe import parse_roe
from .run_loading import load_run, run_validation
from .scmoe import parse_scmoe
from .streaming import Utf8Stream
from .validation import score_validation


def method_from(scmoe: str | None, roe: str | None, seed: int = 0):
    """The decoding method of ``--scmoe`` / ``--roe`` (at most one), else plain."""
    if scmoe and roe:
        raise ValueError("--scmoe and --roe cannot be combined: choose one")
    if scmoe:
        return parse_scmoe(scmoe)
    if roe:
        return parse_roe(roe, seed)
    return Plain()


def run_generate(args, out=None, err=None) -> int:
    out, err = out or sys.stdout, err or sys.stderr
    check_sampling(args.temperature, args.top_p)  # before the checkpoint is read
    method = method_from(args.scmoe, args.roe, args.seed)
    run = load_run(args.run, args.set)
    for note in run.notes:
        print(f"divmoe: {note}", file=err)
    if not args.prompt:
        raise ValueError("--prompt is empty: give at least one character to continue")
    tokenizer = run.tokenizer
    unit = "bytes" if tokenizer.name == "bytes" else "tokens"
    prompt = tokenizer.encode_tensor(args.prompt).long()
    context = run.config.model.seq_len
    if len(prompt) > context:
        raise ValueError(f"--prompt is {len(prompt)} {unit}, longer than the model's context "
                         f"model.seq_len={context}")
    max_new = context - len(prompt) if args.max_new is None else args.max_new
    stream = Utf8Stream()  # a BPE token may end mid-character, like a byte
    out.write(args.prompt)
    out.flush()

    def show(next_B: torch.Tensor) -> None:
        out.write(stream.feed(tokenizer.bytes_of([int(next_B[0])])))
        out.flush()

    result = generate(run.model, prompt[None], max_new,
                      temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                      method=method, use_cache=not args.no_cache, on_token=show)
    out.write(stream.finish() + "\n")
    out.flush()
    print(f"divmoe: {result.new_tokens.shape[1]} {unit} in {result.seconds:.2f} s "
          f"({result.tokens_per_s:.1f} tokens/s; {method.describe()}, "
          f"{'no ' if args.no_cache else ''}KV cache)", file=err)
    return 0


def run_evaluate(args, out=None) -> int:
    out = out or sys.stdout
    method = method_from(args.scmoe, args.roe, args.seed)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size} is not allowed: expected an int >= 1")
    run = load_run(args.run, args.set)
    val = run_validation(run.config, run.tokenizer, args.max_bytes, args.split)
    row = score_validation(run.model, val, args.batch_size, method, run.tokenizer.token_bytes)
    row.update(run=str(run.path), checkpoint=str(run.checkpoint), split=args.split,
               overrides=list(args.set))
    if row["bpb"] is not None:
        by = ", ".join(f"{d} {v:.4f}" for d, v in row["bpb_by_domain"].items())
        print(f"{args.split}_bpb {row['bpb']:.4f} ({by})", file=out)
    else:
        print(f"{args.split}_bpb n/a: {method.describe()} scores are not calibrated "
              f"probabilities", file=out)
    by = ", ".join(f"{d} {v:.4f}" for d, v in row["accuracy_by_domain"].items())
    print(f"greedy next-token accuracy {row['accuracy']:.4f} ({by}); {row['tokens']} tokens "
          f"({row['bytes']} bytes), {method.describe()}", file=out)
    if args.json:
        atomic_write_text(args.json, json.dumps(row, indent=1))
    return 0
