"""Write the demo cohort: procedural H&E slides in two classes + labels.csv (see `make_demo_cohort`).

    python examples/make_demo_cohort.py demo_out/slides --n-slides 16 --seed 0
"""

from __future__ import annotations

import argparse

from wsi_pipeline.testing.synthetic import make_demo_cohort


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="where the slides go (labels.csv and holdout.svs go beside it)")
    parser.add_argument("--n-slides", type=int, default=16)
    parser.add_argument("--width", type=int, default=6144)
    parser.add_argument("--height", type=int, default=4096)
    parser.add_argument("--hotspots", type=int, default=5, help="tumour clusters per tumour slide")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    labels = make_demo_cohort(args.folder, n_slides=args.n_slides, size=(args.height, args.width),
                              hotspots=args.hotspots, seed=args.seed)
    print(f"cohort in {args.folder}, labels in {labels}")


if __name__ == "__main__":
    main()
