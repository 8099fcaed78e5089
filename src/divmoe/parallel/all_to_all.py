"""The token exchange of expert parallelism: ``torch.distributed.all_to_all_single`` with
uneven (and zero) splits, differentiable.

Backward is the same exchange with the splits swapped: the gradient of the rows a rank
received goes back to the rank that sent them. Every rank of the group must call it, with
any number of rows (zero included), in the same order as the others — forward and backward.

:func:`count_bytes` measures what the exchange moves: inside ``with count_bytes() as moved``,
every :func:`exchange` (forward and backward) adds to ``moved.sent`` / ``moved.received`` the
bytes of the rows this rank sent to / received from *other* ranks (its rows to itself cross
no link). The per-expert count exchange (:func:`exchange_counts`, W·E/W integers per layer
call) is control traffic and is not counted.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class ByteCount:
    """Bytes of token rows this rank exchanged with other ranks, and the exchanges counted."""
    sent: int = 0
    received: int = 0
    exchanges: int = 0


_active: list[ByteCount] = []  # the open count_bytes() contexts of this process


@contextlib.contextmanager
def count_bytes():
    """``with count_bytes() as moved: ...``: the :class:`ByteCount` of the exchanges inside
    (contexts nest; each counts everything inside it)."""
    moved = ByteCount()
    _active.append(moved)
    try:
        yield moved
    finally:
        _active.remove(moved)


def _record(x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group) -> None:
    if not _active:
        return
    me = dist.get_rank(group)
    row = math.prod(x.shape[1:]) * x.element_size()
    sent = (sum(send_splits) - send_splits[me]) * row
    received = (sum(recv_splits) - recv_splits[me]) * row
    for moved in _active:
        moved.sent += sent
        moved.received += received
        moved.exchanges += 1


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
    dist.all_to_all_single(out, counts.contiguous(), group=group)
    return out


class _Exchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND, send_splits, recv_splits, group):
        ctx.splits, ctx.group = (send_splits, recv_splits), group
        out = x_ND.new_empty((sum(recv_splits), *x_ND.shape[1:]))
        _record(x_ND, send_splits, recv_splits, group)
        dist.all_to_all_single(out, x_ND.contiguous(), output_split_sizes=recv_splits,
                               input_split_sizes=send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        send_splits, recv_splits = ctx.splits
        grad_in = grad_out.new_empty((sum(send_splits), *grad_out.shape[1:]))
        _record(grad_out, recv_splits, send_splits, ctx.group)
        dist.all_to_all_single(grad_in, grad_out.contiguous(), output_split_sizes=send_splits,
                               input_split_sizes=recv_splits, group=ctx.group)
        return grad_in, None, None, None
