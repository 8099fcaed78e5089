"""Roster of experts (RoE; Zibakhsh et al., "MoEs Are Stronger than You Think:
Hyper-Parallel Inference Scaling with RoE", 2025).

Definition implemented:
  1. The batch is replicated N times (one forward over N·B sequences, not a loop over N).
  2. In every MoE layer, each token of each replica chooses its k experts by Gumbel-top-k on
     the router logits: TopK(logits + τ·G, k) with G i.i.d. Gumbel(0, 1), which samples k
     experts without replacement from softmax(logits / τ). The perturbed logits pass through
     the router's own rule (score function, loss-free bias, expert groups) to rank the experts;
     the combine weights are the router's unperturbed scores of the sampled experts,
     renormalised as it would. τ = 0 is the router's deterministic choice, bit for bit.
  3. The N replicas' next-token distributions are averaged:
     log p = logsumexp_n log p_n − log N (a mixture, so bits per byte stay a likelihood).

The paper's efficient KV caching ("clean cache": replicas share the deterministic path's
keys and values) is not implemented: each replica has its own cache, which is exact and costs
N times the memory. The paper tunes τ per layer; here one τ serves every layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .methods import Pass
from .rerouting import check_reroutable


@dataclass
class Roster:
    samples: int
    tau: float
    seed: int = 0
    _generators: dict = field(default_factory=dict, repr=False, compare=False)

    calibrated = True

    def __post_init__(self):
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) \
                or self.samples < 1:
            raise ValueError(f"RoE N={self.samples!r} is not allowed: expected an int >= 1 "
                             f"(routings sampled per token)")
        if not (math.isfinite(self.tau) and self.tau >= 0):
            raise ValueError(f"RoE tau={self.tau} is not allowed: expected a number >= 0 "
                             f"(0 = deterministic routing)")

    def _generator(self, device: torch.device) -> torch.Generator:
        """One generator per device, seeded on first use: the draws depend only on the seed."""
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[key]

    def pick(self, router, logits_TE: torch.Tensor, selection_bias_E) -> torch.Tensor:
        """Step 2: k experts per token by Gumbel-top-k at temperature τ."""
        exp_TE = torch.empty(logits_TE.shape, dtype=torch.float32, device=logits_TE.device)
        exp_TE.exponential_(generator=self._generator(logits_TE.device))
        gumbel_TE = -exp_TE.clamp_min(1e-30).log()  # finite, so τ = 0 adds exactly 0
        noisy_TE = logits_TE.float() + self.tau * gumbel_TE
        select_TE = router.selection(router.scores(noisy_TE)[0], selection_bias_E)
        return select_TE.topk(router.top_k, dim=-1).indices

    def check(self, model) -> None:
        check_reroutable(model, "RoE")

    def passes(self) -> list[Pass]:
        return [Pass(self.pick, replicas=self.samples)]

    def combine(self, logits: list[torch.Tensor]) -> torch.Tensor:
        logp_NBSV = logits[0].float().log_softmax(-1)
        logp_NBSV = logp_NBSV.view(self.samples, -1, *logp_NBSV.shape[1:])
        return torch.logsumexp(logp_NBSV, dim=0) - math.log(self.samples)

    def describe(self) -> str:
        return f"RoE N={self.samples}, τ={self.tau:g}"


def parse_roe(spec: str, seed: int = 0) -> Roster:
    """``"N,tau"`` (e.g. ``"4,0.5"``) → :class:`Roster`."""
    parts = spec.split(",")
    try:
        if len(parts) != 2:
            raise ValueError
        samples, tau = int(parts[0]), float(parts[1])
    except ValueError:
        raise ValueError(f"--roe {spec!r} is not allowed: expected N,tau, e.g. --roe 4,0.5"
                         ) from None
    return Roster(samples, tau, seed)
