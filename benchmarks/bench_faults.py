"""The kill-anywhere sweep, counted: each stage of the real `wsip` CLI SIGKILLed at N points spread over its
own progress events, rerun without --force, and checked against an uninterrupted reference run
(docs/reliability.md). Prints kills, clean recoveries and divergences per stage; exit 1 on any divergence.

Run: `.venv/bin/python benchmarks/bench_faults.py [--points 24] [--stages patch,extract] [--fresh]`.
`--fresh` starts a new interpreter for every run (slower: torch's import per run) instead of forking runs
from one interpreter that imported everything once.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from common import machine

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from support.launch import ForkedWsip, run_wsip  # noqa: E402  (the tests' machinery, not shipped in the package)
from support.sweep import STAGES, Sweep  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=24, help="kill points per stage (default 24)")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated (default: all four)")
    parser.add_argument("--fresh", action="store_true", help="a new interpreter per run instead of forks")
    args = parser.parse_args()
    forked = None if args.fresh else ForkedWsip()
    failures = []
    try:
        with tempfile.TemporaryDirectory(prefix="wsip-faults-") as root:
            start = time.perf_counter()
            sweep = Sweep.prepare(Path(root), run_wsip if forked is None else forked)
            print(f"kill-anywhere sweep, up to {args.points} points per stage (at most one per event), runs "
                  f"{'in fresh interpreters' if args.fresh else 'forked from one interpreter'}; {machine()}")
            print(f"references (one uninterrupted run per stage): {time.perf_counter() - start:.0f} s; events per "
                  "run: " + ", ".join(f"{stage} {len(trace)}" for stage, trace in sweep.traces.items()))
            for stage in args.stages.split(","):
                start = time.perf_counter()
                counts = sweep.run(stage, args.points)
                print(f"{counts.line()}  ({time.perf_counter() - start:.0f} s)", flush=True)
                failures += counts.failures()
    finally:
        if forked is not None:
            forked.close()
    for failure in failures:
        print("DIVERGED:", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
