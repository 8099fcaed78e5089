"""Layer benchmark: a thin wrapper around ``divmoe bench`` (the logic lives in ``divmoe.bench``).

    python benchmarks/bench_layer.py --tokens 4096 --threads 2 --repeats 3 --json out.json
    python benchmarks/bench_layer.py --quick            # tiny shapes, 1 repeat: a smoke test

Same arguments as ``divmoe bench --help``; results and method: docs/benchmarks.md.
"""

import sys

from divmoe.bench import main

if __name__ == "__main__":
    main(sys.argv[1:])
