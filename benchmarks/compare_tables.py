"""How far do two latency tables of one network disagree (e.g. PyTorch vs ONNX Runtime)?

Prints, as markdown, each edge's measured saving at one probe width in both tables, and the
Spearman rank correlation between them over every edge probe and over the random nets'
latency ratios (each variant's median over its round's baseline):

    python benchmarks/compare_tables.py A.csv B.csv [--width 0.5] [--names torch,onnxruntime]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from gator_hw.network import load_network
from gator_hw.profile.tables import read_table, sidecar_path, summarize


def _load(path: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    meta = json.loads(sidecar_path(path).read_text())
    net = load_network(meta["model"], input_size=meta["input_size"],
                       num_classes=meta.get("num_classes", 1000))
    table = read_table(path, net.graph)
    return table, summarize(table), meta


def _ratios(table: pd.DataFrame) -> pd.Series:
    """Per variant: median over rounds of its latency over its round's baseline."""
    t = table[table["kind"] != "baseline"]
    return (t["median_ms"] / t["baseline_ms"]).groupby(t["variant"]).median()


def compare(a: Path, b: Path, width: float, names: tuple[str, str]) -> str:
    ta, sa, ma = _load(a)
    tb, sb, mb = _load(b)
    if (ma["model"], ma["input_size"], ma["batch"]) != (mb["model"], mb["input_size"],
                                                        mb["batch"]):
        raise SystemExit("the tables measured different networks or batches")
    cols = ["variant", "edge_name", "width", "flops_saved_pct", "saving_pct"]
    j = sa[sa["kind"] == "edge"][cols].merge(
        sb[sb["kind"] == "edge"][["variant", "saving_pct"]], on="variant", suffixes=("_a", "_b"))
    rows = [f"| edge | FLOPs saved | {names[0]} saving | {names[1]} saving |", "|---|---|---|---|"]
    for _, r in j[(j["width"] - width).abs() < 1e-9].sort_values("saving_pct_a",
                                                                 ascending=False).iterrows():
        rows.append(f"| {r['edge_name']} | {r['flops_saved_pct']:.1f} % | "
                    f"{r['saving_pct_a']:.1f} % | {r['saving_pct_b']:.1f} % |")
    rho_edges = j["saving_pct_a"].corr(j["saving_pct_b"], method="spearman")
    ra, rb = _ratios(ta), _ratios(tb)
    rand = [v for v in ra.index if v.startswith("r") and v in rb.index]
    rho_rand = ra[rand].corr(rb[rand], method="spearman") if len(rand) > 2 else float("nan")
    full = (ma["baseline_median_ms"], mb["baseline_median_ms"])
    return "\n".join([
        f"{ma['model']} {ma['input_size']} px batch {ma['batch']}: full net {full[0]:.2f} ms "
        f"({names[0]}) vs {full[1]:.2f} ms ({names[1]}); edges narrowed to {width:g} of their "
        "width:", "", *rows, "",
        f"Spearman rho of the savings over all {len(j)} edge probes: {rho_edges:.3f}; of the "
        f"latency ratios of the {len(rand)} random nets: {rho_rand:.3f}.",
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--width", type=float, default=0.5)
    ap.add_argument("--names", default="A,B")
    args = ap.parse_args()
    names = tuple(args.names.split(",", 1)) if "," in args.names else ("A", "B")
    print(compare(args.a, args.b, args.width, names))


if __name__ == "__main__":
    main()
