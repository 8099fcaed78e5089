"""Run reports: turn a ``divmoe train --out RUN`` folder into ``RUN/report.html``.

>>> from divmoe.report import write_report
>>> write_report("runs/moe-small")        # doctest: +SKIP
PosixPath('runs/moe-small/report.html')

Also runnable as ``python -m divmoe.report RUN [RUN ...]``.
"""

from .html import write_report

__all__ = ["write_report"]
