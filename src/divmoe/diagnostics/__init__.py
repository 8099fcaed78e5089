"""Routing diagnostics: plain functions over recorded routing statistics.

Tensors in, floats or tensors out; usable outside training (``divmoe analyze`` builds on them).

* :mod:`.load` — per-expert load, MaxVio, coefficient of variation, entropy, trajectories,
  drops/reroutes/null slots and activated parameters from :class:`~divmoe.layer.RoutingStats`.
* :mod:`.specialization` — expert × domain routing matrix, I(expert; domain), normalised MI,
  per-domain JS divergence from the domain-agnostic routing.
* :mod:`.consistency` — local routing consistency SRP and SCH (Liang et al. 2025).
* :mod:`.redundancy` — :func:`probe_experts`, pairwise output cosine and CKA, merge candidates.
* :mod:`.diversity` — Vendi score of the experts' outputs.
"""

from .consistency import (cache_gain_at, sch_curve, segment_cache_hit_rate, segment_counts,
                          segment_routing_best_performance, srp_curve)
from .diversity import expert_output_vendi
from .load import (coefficient_of_variation, load_counts, load_entropy, load_over_tokens,
                   load_summary, load_trajectory, max_vio, routing_totals)
from .redundancy import (merge_candidates, output_cka, output_cosine_similarity, probe_experts,
                         redundancy_summary)
from .specialization import (domain_js_bits, expert_domain_counts, mutual_information_bits,
                             normalized_mutual_information, specialization_summary)

__all__ = ["max_vio", "coefficient_of_variation", "load_entropy", "load_counts", "load_summary",
           "load_trajectory", "load_over_tokens", "routing_totals",
           "expert_domain_counts", "mutual_information_bits", "normalized_mutual_information",
           "domain_js_bits", "specialization_summary",
           "segment_counts", "segment_routing_best_performance", "srp_curve",
           "segment_cache_hit_rate", "sch_curve", "cache_gain_at",
           "probe_experts", "output_cosine_similarity", "output_cka", "merge_candidates",
           "redundancy_summary", "expert_output_vendi"]
