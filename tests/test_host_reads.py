"""The hot path reads nothing back to the host except the row counts dropless dispatch needs
(one ``tolist`` per MoE layer call). docs/architecture.md states these numbers."""

import torch

from divmoe.layer import MoE, MoEConfig
from divmoe.models import MoETransformer
from divmoe.train.config import RunConfig
from host_reads import count_host_reads

DISPATCH_READ = "divmoe/dispatch/grouped.py"


def _only_dispatch_reads(where, calls):
    assert sum(where.values()) == calls, dict(where)
    assert all(k.startswith(DISPATCH_READ) and k.endswith("tolist") for k in where), dict(where)


def test_default_layer_forward_backward_reads_only_the_row_counts():
    torch.manual_seed(0)
    moe = MoE(64, MoEConfig()).train()
    x = torch.randn(4, 32, 64, requires_grad=True)
    moe(x)  # warm-up: first-call caches (layout kind) are not the hot path
    with count_host_reads() as where:
        out = moe(x)
        (out.output.square().mean() + out.aux_loss).backward()
        moe.update_balancers()
    _only_dispatch_reads(where, 1)


def test_counter_sees_reads():
    """The counter itself works: a float() of a tensor is seen."""
    with count_host_reads() as where:
        float(torch.ones(()))
    assert sum(where.values()) == 1


def test_default_model_forward_backward_reads_one_per_moe_layer():
    torch.manual_seed(0)
    cfg = RunConfig()
    model = MoETransformer(cfg.model, cfg.moe).train()
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 65))
    model(tokens[:, :-1])
    with count_host_reads() as where:
        out = model(tokens[:, :-1], tokens[:, 1:])
        (out.loss + out.aux_loss).backward()
    _only_dispatch_reads(where, len(model.moe_layers))
