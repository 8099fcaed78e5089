"""After training: generate from a divmoe run (KV cache, streaming), and decode or evaluate it
with other routings: self-contrast decoding (SCMoE) and a roster of sampled routings (RoE).

- :mod:`.kv_cache` — the attention KV cache ``MoETransformer.forward(..., cache=)`` fills
- :mod:`.rerouting` — run a model's MoE layers with other experts chosen at inference
- :mod:`.methods` — decoding methods as passes of the model + a combination of their logits
- :mod:`.scmoe`, :mod:`.roe` — the two papers' methods
- :mod:`.generate` — sampling loop; :mod:`.streaming` — UTF-8 as bytes arrive
- :mod:`.run_loading` — open a run folder; :mod:`.validation` — per-domain bpb and accuracy
"""

from .generate import Generation, generate
from .kv_cache import KVCache
from .methods import Plain, next_token_scores
from .rerouting import rerouted
from .roe import Roster, parse_roe
from .run_loading import LoadedRun, load_run, run_validation
from .scmoe import SelfContrast, parse_scmoe
from .streaming import Utf8Stream
from .validation import score_validation

__all__ = ["Generation", "generate", "KVCache", "Plain", "next_token_scores", "rerouted",
           "Roster", "parse_roe", "LoadedRun", "load_run", "run_validation", "SelfContrast",
           "parse_scmoe", "Utf8Stream", "score_validation"]
