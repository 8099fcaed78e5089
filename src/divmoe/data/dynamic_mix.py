"""Routing-driven dynamic data mixing (``data.mixing=dynamic``; seed 002, "Dynamic Data
Mixing Maximizes Instruction Tuning for Mixture-of-Experts").

Our reading of the rule (the abstract says only "dataset-level representations" from
"token routing preference" and "adjust the sampling weight of datasets by their
inter-redundancies"; the details follow the authors' released code, Spico197/MoE-SFT):

1. Every ``mix_every`` steps, route a fixed probe of training windows of each domain
   through the model and count, per MoE layer, how many of the domain's routed slots
   each expert received. A domain's *routing profile* is the concatenation over layers
   of these counts, each layer normalised to sum 1: a vector of length L·E.
2. Redundancy: cosine similarity ``S[d, j]`` between the profiles of domains d and j;
   ``δ_d = 1 − mean_j S[d, j]`` (the mean includes j = d). A domain whose tokens the
   experts treat unlike the others' has a large δ.
3. Update in log space and smooth towards uniform:
   ``α = softmax(log w + η·δ)``, ``w ← (1 − c)·α + c / D``  (η = ``mix_eta``,
   c = ``mix_smoothing``). Domains the experts see as different are sampled more.

The update starts from the static mixture the configuration gives (proportional by
default).
"""
from __future__ import annotations

import torch

__all__ = ["DynamicMixer", "routing_profiles", "redundancy_delta", "dynamic_update",
           "probe_routing_counts"]


def routing_profiles(counts_LED: torch.Tensor) -> torch.Tensor:
    """[L, E, D] routed-slot counts → [D, L·E] profiles, each layer's block summing to 1."""
    counts = counts_LED.double()
    per_layer = counts / counts.sum(1, keepdim=True).clamp_min(1e-12)   # normalise over experts
    L, E, D = counts.shape
    return per_layer.permute(2, 0, 1).reshape(D, L * E)


def redundancy_delta(profiles_DF: torch.Tensor) -> torch.Tensor:
    """δ_d = 1 − mean_j cos(profile_d, profile_j) over all j (itself included)."""
    unit = profiles_DF / profiles_DF.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return 1.0 - (unit @ unit.T).mean(1)


def dynamic_update(weights_D: torch.Tensor, profiles_DF: torch.Tensor, eta: float,
                   smoothing: float) -> torch.Tensor:
    """One step of the rule above; returns new weights (sum 1)."""
    delta = redundancy_delta(profiles_DF)
    alpha = torch.softmax(torch.log(weights_D.double().clamp_min(1e-300)) + eta * delta, 0)
    new = (1.0 - smoothing) * alpha + smoothing / weights_D.numel()
    return new / new.sum()


@torch.no_grad()
def probe_routing_counts(model, probes: dict[str, torch.Tensor], batch_size: int = 32) -> torch.Tensor:
    """[L, E, D] routed-slot counts of the probe windows (``{domain: [N, S]}``, sorted domain
    order) through every MoE layer of ``model``, read by forward hooks on the layers."""
    moes = [model.blocks[i].mlp for i in model.moe_layers]
    E = model.moe_config.num_experts
    domains = sorted(probes)
    counts = torch.zeros(len(moes), E, len(domains), dtype=torch.int64)
    current = {"d": 0}

    def hook(li):
        def fn(module, args, output):
            ids = output.stats.expert_ids.reshape(-1)
            counts[li, :, current["d"]] += torch.bincount(ids[ids >= 0], minlength=E).cpu()
        return fn

    handles = [m.register_forward_hook(hook(li)) for li, m in enumerate(moes)]
    device = model.embed.weight.device
    was_training = model.training
    model.eval()
    try:
        for di, d in enumerate(domains):
            current["d"] = di
            for chunk in probes[d].split(batch_size):
                model(chunk.to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return counts


class DynamicMixer:
    """Applies :func:`dynamic_update` to a :class:`~divmoe.data.mixture.MixtureSampler`
    from the routing of its fixed probe windows (``PROBE_WINDOWS`` per domain)."""

    PROBE_WINDOWS = 8

    def __init__(self, sampler, data_cfg, model):
        if not model.moe_layers:
            raise ValueError("data.mixing=dynamic is not allowed for a dense model (model.moe=false): "
                             "it re-weights from expert routing; use data.mixing=static")
        self.sampler = sampler
        self.eta, self.smoothing = data_cfg.mix_eta, data_cfg.mix_smoothing
        self.probes = sampler.probe_windows(self.PROBE_WINDOWS)
        if sorted(self.probes) != sorted(sampler.domain_names):
            raise ValueError("data.mixing=dynamic needs every domain to hold at least one window")

    def update(self, model) -> dict[str, float]:
        """Route the probes, update the sampler's weights in place, return them."""
        names = sorted(self.probes)
        profiles = routing_profiles(probe_routing_counts(model, self.probes))
        w = torch.tensor([self.sampler.weights[d] for d in names], dtype=torch.float64)
        new = dynamic_update(w, profiles, self.eta, self.smoothing)
        self.sampler.set_weights({d: float(x) for d, x in zip(names, new)})
        return dict(self.sampler.weights)
