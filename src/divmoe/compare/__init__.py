"""Compare configurations trained on the same data, seed and budget (``divmoe compare``).

* :mod:`.runner` — :func:`run_compare` over :class:`Variant` s (YAML files or ``--set``
  overrides), ``summary.md`` and ``report.html`` across variants.
* the built-in ``seed-claims`` study of ALGORITHMS.md's claims: :mod:`.seed_claims` defines it
  (variants, claims, margins), :mod:`.claims_study` runs it, :mod:`.claims_stats` holds the
  paired intervals and verdicts, :mod:`.claims_report` writes its page.
"""

from .claims_study import run_study
from .runner import Variant, load_study, run_compare, specialization_mi, variant_summary
from .seed_claims import CLAIMS

__all__ = ["Variant", "load_study", "run_compare", "specialization_mi", "variant_summary",
           "CLAIMS", "run_study"]
