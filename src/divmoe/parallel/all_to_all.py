"""The token exchange of expert parallelism: ``torch.distributed.all_to_all_single`` with
uneven (and zero) splits, differentiable.

Backward is the same exchange with the splits swapped: the gradient of the rows a rank
received goes back to the rank that sent them. Every rank of the group must call it, with
any number of rows (zero included), in the same order as the others — forward and backward.

Inside ``with metered() as m:`` every exchange of this process is counted into ``m``
(``divmoe bench --distributed``, ``divmoe train``'s ``all_to_all_bytes_per_token``, the placement
measurements); meters nest, and outside them nothing is counted.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class ExchangeMeter:
    """What this rank's exchanges did while :func:`metered` was active."""
    calls: int = 0            # all-to-alls: token rows forward and backward, and the counts
    bytes_sent: int = 0       # token rows sent to other ranks (rows to itself cross no link)
    bytes_received: int = 0   # token rows received from other ranks
    seconds: float = 0.0      # wall time inside all_to_all_single (gloo on CPU blocks in it)


_meters: list[ExchangeMeter] = []  # the open metered() contexts of this process


@contextlib.contextmanager
def metered():
    """``with metered() as m: ...`` — the :class:`ExchangeMeter` of the exchanges inside."""
    meter = ExchangeMeter()
    _meters.append(meter)
    try:
        yield meter
    finally:
        _meters.remove(meter)


def _all_to_all(out, inp, recv_splits, send_splits, group, rows: bool = True) -> None:
    """``all_to_all_single``, counted by the open meters; ``rows=False``: control traffic
    (the per-expert counts, W·E/W integers) adds to calls and seconds, not to the bytes."""
    t0 = time.perf_counter()
    dist.all_to_all_single(out, inp, output_split_sizes=recv_splits,
                           input_split_sizes=send_splits, group=group)
    if not _meters:
        return
    seconds = time.perf_counter() - t0
    sent = received = 0
    if rows:
        me = dist.get_rank(group)
        row = math.prod(inp.shape[1:]) * inp.element_size()
        sent, received = row * (sum(send_splits) - send_splits[me]), row * (sum(recv_splits) - recv_splits[me])
    for m in _meters:
        m.calls += 1
        m.seconds += seconds
        m.bytes_sent += sent
        m.bytes_received += received


def exchange(x_ND: torch.Tensor, send_splits: list[int], recv_splits: list[int],
             group=None) -> torch.Tensor:
    """Rows [send_splits[0] | send_splits[1] | ...] of ``x_ND`` go to ranks 0, 1, ...; the
    result holds the rows received, ``recv_splits[r]`` from rank r, in rank order."""
    if sum(send_splits) != x_ND.shape[0]:
        raise ValueError(f"send_splits {send_splits} sum to {sum(send_splits)} but x has "
                         f"{x_ND.shape[0]} rows")
    return _Exchange.apply(x_ND, list(send_splits), list(recv_splits), group)


def exchange_counts(counts: torch.Tensor, group=None) -> torch.Tensor:
    """Equal-sized exchange without autograd: ``counts`` [W, n] → row r of the result is what
    rank r sent to this rank (e.g. its per-expert row counts for this rank's experts)."""
    out = torch.empty_like(counts)
    _all_to_all(out, counts.contiguous(), None, None, group, rows=False)
    return out


class _Exchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND, send_splits, recv_splits, group):
        ctx.splits, ctx.group = (send_splits, recv_splits), group
        out = x_ND.new_empty((sum(recv_splits), *x_ND.shape[1:]))
        _all_to_all(out, x_ND.contiguous(), recv_splits, send_splits, group)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        send_splits, recv_splits = ctx.splits
        grad_in = grad_out.new_empty((sum(send_splits), *grad_out.shape[1:]))
        _all_to_all(grad_in, grad_out.contiguous(), send_splits, recv_splits, ctx.group)
        return grad_in, None, None, None
