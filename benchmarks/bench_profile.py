"""Benchmark of ``gator-hw profile``: wall time and noise floor of whole profiles.

CPU (default)::

    python benchmarks/bench_profile.py
    # ResNet-18 at 112x112, batch 8, fp32, every edge at half width + baseline, 3 rounds,
    # into a temporary folder (goal: < 5 minutes on a 2-core CPU)

CUDA::

    python benchmarks/bench_profile.py --device cuda
    # ResNet-50 at 224x224, batch 32, fp32 and bf16 channels-last, CUDA-graph replay:
    # 37 edges at half width + baseline, 3 rounds, plus 40 random nets, written to
    # profiles/<gpu>/ (profiles/h100/ on an H100). Goal: the edge + baseline cells in < 3 min
    # per table with baseline IQR / median <= 2 %.

On CPU each case starts fresh (an old resume file of the same table is deleted first), so
the wall time is the whole profile's. On CUDA a case resumes from its resume file unless
``--fresh``: on a lent GPU with a time limit, run it under ``timeout`` with ``--out-dir`` in the
folder that comes back, e.g. ``timeout 540 python benchmarks/bench_profile.py --device cuda
--out-dir $OUT/h100``; every finished cell is already on disk when the limit hits, and the same
command with that folder's files put back under ``--out-dir`` times only what is left.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from gator_hw.profile.runner import ProfileRequest, ProfileResult, cells_path, default_out, run


def _case(request: ProfileRequest, out: Path, *, fresh: bool = True) -> ProfileResult:
    if fresh:
        cells_path(out).unlink(missing_ok=True)
    t0 = time.perf_counter()
    result = run(request, out, progress=True)
    wall = time.perf_counter() - t0
    meta = result.metadata
    cell_s = meta["cell_wall_s"]
    spec = request.spec
    print(
        f"{spec.model} b{spec.batch} {spec.input_size}px {spec.dtype}"
        f"{' channels-last' if spec.channels_last else ''} on {spec.device_name} "
        f"({meta['regime_note']})"
    )
    print(f"  wall time                 {wall:8.1f} s ({len(result.table)} cells)")
    print(f"  baseline + edge cells     {cell_s['baseline'] + cell_s['edge']:8.1f} s")
    if request.random_nets:
        print(f"  random-net cells          {cell_s['random']:8.1f} s")
    print(f"  baseline median           {meta['baseline_median_ms']:8.3f} ms")
    print(f"  noise floor (median)      {100 * result.noise_floor:8.2f} % IQR/median")
    print(f"  noise floor (worst round) {100 * meta['noise_floor_max']:8.2f} %")
    print(f"  baseline drift (rounds)   {100 * meta['baseline_drift']:8.2f} %")
    print(f"  noisy / re-measured cells {meta['noisy_cells']} / {meta['remeasured_cells']}")
    for w in result.warnings:
        print(f"  warning: {w}")
    print(f"  table: {result.table_path}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda / cuda:N")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out-dir", type=Path, default=None, help="where tables go")
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads (default torch's; 1 on a shared box)"
    )
    parser.add_argument(
        "--fresh", action="store_true", help="on CUDA, delete resume files first (CPU always does)"
    )
    args = parser.parse_args()

    if args.device == "cpu":
        request = ProfileRequest.create(
            "resnet18",
            device="cpu",
            batch=8,
            input_size=112,
            rounds=args.rounds,
            threads=args.threads,
        )
        out_dir = args.out_dir or Path(tempfile.mkdtemp(prefix="bench_profile_"))
        _case(request, out_dir / default_out(request.spec).name)
        return

    for dtype, channels_last in (("float32", False), ("bfloat16", True)):
        request = ProfileRequest.create(
            "resnet50",
            device=args.device,
            batch=32,
            input_size=224,
            dtype=dtype,
            channels_last=channels_last,
            random_nets=40,
            rounds=args.rounds,
        )
        out = default_out(request.spec)
        if args.out_dir is not None:
            out = args.out_dir / out.name
        _case(request, out, fresh=args.fresh)


if __name__ == "__main__":
    main()
