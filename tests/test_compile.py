"""The default MoETransformer trains under torch.compile (inductor, CPU) and matches eager.

The only graph breaks are the dropless dispatch, run eagerly by design (see
``divmoe.dispatch.grouped.dispatch_combine``); docs/architecture.md lists them.
"""

import copy

import torch
import torch._dynamo

from divmoe.models import MoETransformer
from divmoe.train import load_config, train_step

TINY = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.seq_len=16",
        "moe.expert_hidden=16", "moe.num_experts=4"]


def test_compiled_model_trains_like_eager():
    torch.manual_seed(0)
    torch._dynamo.reset()
    cfg = load_config(None, TINY)  # the default model and layer (topk, aux + z loss), small
    eager = MoETransformer(cfg.model, cfg.moe)
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin)
    opt_e = torch.optim.AdamW(eager.parameters(), lr=1e-2)
    opt_c = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        tokens = torch.randint(0, cfg.model.vocab_size, (2, 17), generator=gen)
        loss_e = train_step(eager, opt_e, [tokens], grad_clip=1.0).loss
        loss_c = train_step(compiled, opt_c, [tokens], grad_clip=1.0).loss
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    for (name, p_e), p_c in zip(eager.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p_c, p_e, rtol=1e-4, atol=1e-5, msg=name)
    torch.testing.assert_close(twin.blocks[0].mlp.selection_bias_E,
                               eager.blocks[0].mlp.selection_bias_E)


def test_graph_breaks_are_only_the_dispatch():
    torch._dynamo.reset()
    cfg = load_config(None, TINY)
    model = MoETransformer(cfg.model, cfg.moe)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 17))
    explained = torch._dynamo.explain(model)(tokens[:, :-1], tokens[:, 1:])
    assert explained.break_reasons, "expected the dispatch graph break"
    for brk in explained.break_reasons:
        assert "dropless dispatch: data-dependent row counts" in brk.reason, brk.reason
