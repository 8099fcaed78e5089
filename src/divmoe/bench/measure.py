"""Timing, peak memory and the time split of one candidate call.

* Time: wall clock of one call (``fwd``: under ``no_grad``; ``fwd+bwd``: forward, then
  ``backward`` with a fixed upstream gradient of ones, input gradient included). On CUDA the
  call is bracketed by ``torch.cuda.synchronize()``.
* Peak memory of fwd+bwd: on CUDA ``torch.cuda.max_memory_allocated`` minus what was allocated
  before the call. On CPU, torch's allocator is invisible to tracemalloc, and the RSS of a shared
  process keeps freed pages, so we use the allocation events torch itself reports:
  ``torch.profiler`` with ``profile_memory=True`` records every tensor allocation and free
  (``[memory]`` events with a signed byte count) of the CPU allocator. Their running sum in time
  order is the tensor memory alive on top of what existed before the call; its maximum is the
  peak. It counts activations, saved tensors, workspace and the new gradients (parameter
  gradients included: they are set to None first), and not the parameters or the input.
* Split: one fwd+bwd of divmoe under ``torch.profiler`` with the ``divmoe.router`` (a forward
  hook pair on ``moe.router``), ``divmoe.dispatch``, ``divmoe.experts`` and ``divmoe.combine``
  ranges (``record_function`` in ``dispatch/grouped.py`` and ``dispatch/routed_swiglu.py``).
  Forward ops are attributed to the range they run in; each backward node
  (``autograd::engine::evaluate_function: XBackward``) to the range of the forward op with the
  same autograd sequence number. The hand-written backward of ``routed_swiglu`` opens the same
  ranges itself (the recomputed row gather and the ∂x scatter-add are ``dispatch``, the gather
  of ∂out is ``combine``), and its node is created outside every range, so nothing is counted
  twice. Everything else in the layer (input check, balance losses, stats, grad accumulation,
  profiler overhead) is ``other``.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile, record_function

SPLIT_RANGES = ("divmoe.router", "divmoe.dispatch", "divmoe.experts", "divmoe.combine")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _zero_grads(module):
    for p in module.parameters():
        p.grad = None


def run_once(c, x: torch.Tensor, mode: str, grads_out: dict):
    """One call of candidate ``c``; returns nothing (the caller times it)."""
    if mode == "fwd":
        with torch.no_grad(), c.context():
            c.call(x)
        return
    xg = x.detach().requires_grad_(True)  # the layer below needs dx too
    with c.context():
        outs = c.call(xg)
        grads = [grads_out.setdefault((tuple(o.shape), o.dtype), torch.ones_like(o))
                 for o in outs]
        torch.autograd.backward(outs, grads)


def time_call(c, x: torch.Tensor, mode: str, grads_out: dict) -> float:
    """Seconds for one call."""
    _zero_grads(c.module)
    _sync(x.device)
    t0 = time.perf_counter()
    run_once(c, x, mode, grads_out)
    _sync(x.device)
    return time.perf_counter() - t0


def peak_memory(c, x: torch.Tensor, grads_out: dict) -> int:
    """Peak bytes of tensor memory allocated during one fwd+bwd, above what existed before."""
    _zero_grads(c.module)
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        base = torch.cuda.memory_allocated(x.device)
        run_once(c, x, "fwd+bwd", grads_out)
        torch.cuda.synchronize(x.device)
        peak = torch.cuda.max_memory_allocated(x.device) - base
    else:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            run_once(c, x, "fwd+bwd", grads_out)
        # CPU-only profile: every [memory] event is the CPU allocator's (signed bytes).
        events = sorted((e for e in prof.profiler.kineto_results.events()
                         if e.name() == "[memory]"), key=lambda e: e.start_ns())
        alive = peak = 0
        for e in events:
            alive += e.nbytes()
            peak = max(peak, alive)
    _zero_grads(c.module)
    return int(peak)


def _in_backward(e) -> bool:
    p = e
    while p is not None:
        if p.name.startswith("autograd::engine::evaluate_function:"):
            return True
        p = p.cpu_parent
    return False


class _RouterRange:
    """Forward pre/post hooks that open and close a ``divmoe.router`` profiler range."""

    def __init__(self, router):
        self._stack = []
        self._handles = [router.register_forward_pre_hook(self._pre),
                         router.register_forward_hook(self._post)]

    def _pre(self, module, args):
        rf = record_function("divmoe.router")
        rf.__enter__()
        self._stack.append(rf)

    def _post(self, module, args, out):
        self._stack.pop().__exit__(None, None, None)

    def remove(self):
        for h in self._handles:
            h.remove()


def split_layer(c, x: torch.Tensor, grads_out: dict, top_ops: int = 15) -> dict:
    """Split one fwd+bwd of a divmoe candidate into router / dispatch / experts / combine / other
    (profiler CPU time, µs), plus the profiler's table of the top ops by self CPU time."""
    hooks = _RouterRange(c.module.router)
    try:
        run_once(c, x, "fwd+bwd", grads_out)  # warm (first-call costs out of the profile)
        _zero_grads(c.module)
        _sync(x.device)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if x.device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            t0 = time.perf_counter()
            with record_function("divmoe.layer"):
                run_once(c, x, "fwd+bwd", grads_out)
            _sync(x.device)
            wall = time.perf_counter() - t0
    finally:
        hooks.remove()
        _zero_grads(c.module)
    events = prof.events()
    layer = next(e for e in events if e.name == "divmoe.layer")
    fwd_us = defaultdict(float)
    seq_range = {}
    for e in events:
        if e.name in SPLIT_RANGES:
            fwd_us[e.name] += e.cpu_time_total
    # Every forward op carries the autograd sequence counter's current value; the op that creates
    # a backward node takes it and increments it, so the *last* forward op (in time) with number
    # N created node N: its enclosing range owns the backward node with number N.
    fwd_ops = sorted((e for e in events if e.sequence_nr is not None and e.sequence_nr >= 0
                      and not _in_backward(e)), key=lambda e: e.time_range.start)
    for e in fwd_ops:
        p = e.cpu_parent
        while p is not None and p.name not in SPLIT_RANGES:
            p = p.cpu_parent
        seq_range[e.sequence_nr] = p.name if p is not None else None
    bwd_us = defaultdict(float)
    for e in events:
        if e.name.startswith("autograd::engine::evaluate_function:") \
                and seq_range.get(e.sequence_nr) is not None:
            bwd_us[seq_range[e.sequence_nr]] += e.cpu_time_total
    total_us = layer.cpu_time_total
    parts = {r.split(".", 1)[1]: fwd_us[r] + bwd_us[r] for r in SPLIT_RANGES}
    parts["other"] = max(0.0, total_us - sum(parts.values()))
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top_ops)
    return {"wall_ms": wall * 1e3, "profiled_ms": total_us / 1e3,
            "parts_ms": {k: v / 1e3 for k, v in parts.items()},
            "share": {k: v / total_us for k, v in parts.items()} if total_us else {},
            "fwd_ms": {r.split(".", 1)[1]: fwd_us[r] / 1e3 for r in SPLIT_RANGES},
            "bwd_ms": {r.split(".", 1)[1]: bwd_us[r] / 1e3 for r in SPLIT_RANGES},
            "top_ops": table}


def profile_top_ops(c, x: torch.Tensor, grads_out: dict, top_ops: int = 12) -> str:
    """torch.profiler table (top ops by self CPU time) of one fwd+bwd of any candidate."""
    run_once(c, x, "fwd+bwd", grads_out)
    _zero_grads(c.module)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run_once(c, x, "fwd+bwd", grads_out)
    _zero_grads(c.module)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top_ops)


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 5) -> float:
    """This device's dense matmul rate (n×n by n×n, median of ``repeats`` after one warm-up):
    the bench's yardstick for what fraction of the chip an MoE layer's useful FLOPs reach."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device, dtype)
    b = torch.randn(n, n, generator=gen).to(device, dtype)
    times = []
    for i in range(repeats + 1):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        if i:
            times.append(time.perf_counter() - t0)
    return 2.0 * n ** 3 / statistics.median(times) / 1e12
