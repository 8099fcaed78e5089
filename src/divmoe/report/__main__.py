"""``python -m divmoe.report RUN [RUN ...]``: write RUN/report.html for each run folder."""

from __future__ import annotations

import argparse
import sys

from .html import write_report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m divmoe.report",
                                 description="Render a divmoe training run folder to report.html")
    ap.add_argument("run_dirs", nargs="+", help="run folder(s) written by `divmoe train --out`")
    args = ap.parse_args(argv)
    status = 0
    for d in args.run_dirs:
        try:
            print(write_report(d))
        except (FileNotFoundError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
