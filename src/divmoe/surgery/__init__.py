"""After training: merge, prune and upcycle experts of a trained model.

Each transform reads a divmoe run folder and writes a new one that ``divmoe train --resume``
continues and ``divmoe analyze`` reads (:mod:`divmoe.surgery.run_io`); the per-layer
functions work on any :class:`divmoe.layer.MoE`, including the ones
:func:`divmoe.hf.swap_moe_blocks` puts into a Hugging Face model.

- :mod:`~divmoe.surgery.merge`: MC-SMoE (Li et al. 2024): group experts around the most-used
  ones, align hidden units by permutation, average weighted by usage.
- :mod:`~divmoe.surgery.prune`: keep K experts by routing frequency, or by output
  reconstruction on calibration text (NAEE, Lu et al. 2024).
- :mod:`~divmoe.surgery.upcycle`: a dense checkpoint becomes an MoE (sparse upcycling,
  with Drop-Upcycling's partial re-initialisation as an option).
"""

from .calibrate import LayerCalibration, calibrate
from .merge import merge_moe, merge_run
from .prune import prune_moe, prune_run
from .upcycle import upcycle_model, upcycle_run

__all__ = ["LayerCalibration", "calibrate", "merge_moe", "merge_run", "prune_moe", "prune_run",
           "upcycle_model", "upcycle_run"]
