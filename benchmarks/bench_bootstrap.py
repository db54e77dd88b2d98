"""The patient-stratified bootstrap: 1,000 resamples of 1,000 slides, every metric, vs scikit-learn in a loop.

(a) `evaluation.summary.bootstrap_values` on a (1000, 1000) weight matrix (AUC, balanced accuracy, accuracy,
F1, sensitivity, specificity, average precision); (b) the same metrics by scikit-learn on each resampled cohort
(a subset of the resamples, scaled to 1,000). Prints both times and b/a; the target is (a) < 5 s on 2 cores.
Run: `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_bootstrap.py [--slides 1000] [--resamples 1000]`.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from common import machine

from wsi_pipeline.evaluation.bootstrap import bootstrap_weights
from wsi_pipeline.evaluation.metrics import point_metrics
from wsi_pipeline.evaluation.summary import bootstrap_values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--slides", type=int, default=1000)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--reference-resamples", type=int, default=50, help="scikit-learn loop, scaled up")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, args.slides)
    p = 1 / (1 + np.exp(-rng.normal(1.2 * y, 1.0)))
    probs = np.c_[1 - p, p]
    cases = tuple(f"P{i // 2}" for i in range(args.slides))  # two slides per patient

    start = time.perf_counter()
    W = bootstrap_weights(cases, y, n_resamples=args.resamples, seed=0)
    values = bootstrap_values(y, probs, W, threshold=0.5)
    ours = time.perf_counter() - start

    start = time.perf_counter()
    for row in W[: args.reference_resamples]:
        idx = np.repeat(np.arange(args.slides), row.astype(int))
        reference = point_metrics(y[idx], probs[idx])
    sklearn = (time.perf_counter() - start) * args.resamples / args.reference_resamples
    last = args.reference_resamples - 1
    assert all(np.isclose(values[k][last], v) for k, v in reference.items())  # same numbers, resample by resample

    print(f"machine: {machine()}")
    print(f"{args.resamples} patient-stratified resamples of {args.slides} slides, {len(values)} metrics")
    print(f"  vectorised (ours):            {ours:6.2f} s   (target < 5 s)")
    print(f"  scikit-learn per resample:    {sklearn:6.2f} s   (measured on {args.reference_resamples}, scaled)")
    print(f"  ratio scikit-learn / ours:    {sklearn / ours:6.1f}x")


if __name__ == "__main__":
    main()
