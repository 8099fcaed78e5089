"""``divmoe analyze PATH --out DIR``: routing and expert diagnostics of a trained MoE model.

PATH is a divmoe run folder (or its ``checkpoint/`` folder) or a Hugging Face MoE causal-LM
folder on disk. The embedded validation corpus runs through the model; every sparse layer's
routing is recorded per token with its domain, and :mod:`divmoe.diagnostics` turns it into
load, specialisation, local routing consistency (SRP/SCH), redundancy and diversity
measures, written to ``DIR/analysis.json`` and the self-contained ``DIR/analysis.html``.

>>> from divmoe.analyze import analyze
>>> result = analyze("runs/default", "runs/default/analysis")   # doctest: +SKIP
"""

from .core import DEFAULT_MAX_BYTES, analyze
from .source import AnalyzeError, load_source

__all__ = ["analyze", "load_source", "AnalyzeError", "DEFAULT_MAX_BYTES"]
