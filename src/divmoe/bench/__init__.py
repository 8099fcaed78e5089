"""Benchmarks of the MoE layer (``divmoe bench``): speed, memory and time split against the
dense equivalent and peer implementations, plus training throughput. See docs/benchmarks.md."""

from .runner import DEFAULT_SHAPES, MODES, QUICK_SHAPES, add_arguments, format_tables, main, run

__all__ = ["DEFAULT_SHAPES", "MODES", "QUICK_SHAPES", "add_arguments", "format_tables", "main", "run"]
