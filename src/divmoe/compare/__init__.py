"""Compare configurations trained on the same data, seed and budget (``divmoe compare``).

* :mod:`.runner` — :func:`run_compare` over :class:`Variant` s (YAML files or ``--set``
  overrides), ``summary.md`` and ``report.html`` across variants.
* :mod:`.seed_claims` — the built-in ``seed-claims`` study re-running ALGORITHMS.md's claims.
"""

from .runner import Variant, load_study, run_compare, specialization_mi, variant_summary
from .seed_claims import CLAIMS, run_seed_claims

__all__ = ["Variant", "load_study", "run_compare", "specialization_mi", "variant_summary",
           "CLAIMS", "run_seed_claims"]
