"""Cost-model accuracy over repeated random holdouts of one profile table.

``validate`` scores one split (the half of the random nets a config was not fitted on). One split
of 20-30 nets is noisy, so this refits the whole procedure (candidate selection included) on
``--splits`` seeded halves and reports, per predictor, the mean of every metric and the mean
absolute signed error, with how often the cost model beat each baseline on every metric
(``gator-hw validate --splits N`` prints the same next to the single split).

Run: ``python benchmarks/bench_costmodel.py TABLE.csv --splits 10``, e.g. TABLE
``profiles/cpu-amd-epyc/resnet18_b8_float32.csv``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from gator_hw.commands.costmodel import print_repeated
from gator_hw.costmodel.validate import repeated_holdout
from gator_hw.network import load_network
from gator_hw.profile.tables import sidecar_path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("table", type=Path)
    ap.add_argument("--splits", type=int, default=10)
    args = ap.parse_args()
    meta = json.loads(sidecar_path(args.table).read_text())
    net = load_network(meta["model"], input_size=meta["input_size"],
                       num_classes=meta.get("num_classes", 1000))
    t0 = time.perf_counter()
    rep = repeated_holdout([args.table], net.graph, splits=args.splits)
    print(f"{args.table.name}: {args.splits} fits in {time.perf_counter() - t0:.1f} s")
    print_repeated(rep)


if __name__ == "__main__":
    main()
