"""Shared by the tests that compare the fast path with the reference loop."""

import torch

from divmoe.layer import MoE, MoEConfig


def pair(d, dtype=None, **kw):
    """The same layer twice, identical weights: fast (grouped) and reference dispatch."""
    fast = MoE(d, MoEConfig(dispatch="grouped", **kw))
    ref = MoE(d, MoEConfig(dispatch="reference", **kw))
    if dtype is not None:
        fast, ref = fast.to(dtype), ref.to(dtype)
    ref.load_state_dict(fast.state_dict())
    return fast, ref


def grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def assert_same_forward_backward(fast, ref, x, atol, rtol, token_ids=None, all_grads=True):
    """Outputs, aux loss, chosen experts, and gradients to the input and every parameter agree.
    ``all_grads``: every trainable parameter must receive a gradient (off for routers whose
    parameters may legitimately get none, e.g. a hash router)."""
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    o1, o2 = fast(x1, token_ids=token_ids), ref(x2, token_ids=token_ids)
    torch.testing.assert_close(o1.output, o2.output, atol=atol, rtol=rtol)
    torch.testing.assert_close(o1.aux_loss, o2.aux_loss, atol=atol, rtol=rtol)
    assert torch.equal(o1.stats.expert_ids, o2.stats.expert_ids)
    g = torch.randn_like(o1.output)
    ((o1.output * g).sum() + o1.aux_loss).backward()
    ((o2.output * g).sum() + o2.aux_loss).backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=atol, rtol=rtol)
    g1, g2 = grads(fast), grads(ref)
    trainable = {n for n, p in fast.named_parameters() if p.requires_grad}
    assert g1.keys() == g2.keys() and set(g1) <= trainable
    if all_grads:
        assert set(g1) == trainable
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], atol=atol, rtol=rtol, msg=name)
    return o1


def force_expert(moe, expert):
    """Make every token route to ``expert`` first (gate dominated by one column)."""
    with torch.no_grad():
        moe.router.gate.weight.zero_()
        moe.router.gate.weight[expert] = 10.0
