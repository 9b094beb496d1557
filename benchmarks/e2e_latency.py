"""Does pruning for measured latency give a faster network than pruning for FLOPs? Measure it.

On one device, end to end (every stage is cached in OUT, so a re-run resumes):

1. profile ResNet-18 (64 px, batch 8, 10 classes) on this device, or reuse ``--table``
   (edges probed down to 1/8 of their width, random nets down to 5 %: the cost model must know
   the deeply pruned nets that small budgets give);
2. make the latency config (cost model embedded) and a plain FLOPs config;
3. train the unpruned network on scikit-learn's digits (or reuse ``--base-weights``);
4. for each budget b: prune with the latency config to ``latency=b``, then with the FLOPs
   config to the FLOPs the latency run reached (same seed, epochs and schedule), so the two
   nets have equal FLOPs;
5. convert every run; the cost model's own optimum at the same FLOPs (greedy search, random
   weights) is a reference point;
6. time every converted net against the full one (``bench``'s protocol: interleaved blocks,
   paired ratios), ``--repeats`` times in round-robin order;
7. write ``results.json``, ``results.md`` (FLOPs ratio, predicted and measured latency ratio
   with its range, val acc) and ``pareto.png`` (val acc vs measured latency ratio).

    python benchmarks/e2e_latency.py --out runs/e2e_latency [--table T.csv] [--epochs 12]
        [--backend onnxruntime]   # profile, calibrate and bench in ONNX Runtime
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from e2e_digits import base_accuracy, train_base

from gator_hw.atomic import write_json, write_text
from gator_hw.config import GatingConfig, read_config, write_config
from gator_hw.costmodel.differentiable import LatencyFunction
from gator_hw.costmodel.embedded import embedded_cost_model
from gator_hw.costmodel.make import factor_config, make_config
from gator_hw.evaluate import compare_latency
from gator_hw.gated import convert_checkpoint
from gator_hw.network import load_network
from gator_hw.profile.runner import ProfileRequest, run
from gator_hw.profile.tables import sidecar_path
from gator_hw.profile.timing import make_spec
from gator_hw.slim import slim
from gator_hw.train import TrainSettings, train

MODEL, SIZE, BATCH, CLASSES = "resnet18", 64, 8, 10


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def profile_table(out: Path, random_nets: int, backend: str = "torch") -> Path:
    path = out / "profile" / f"{MODEL}_{SIZE}px_b{BATCH}_float32.csv"
    req = ProfileRequest.create(MODEL, device="cpu", batch=BATCH, input_size=SIZE,
                                widths="0.125,0.25,0.5,0.75", random_nets=random_nets,
                                random_min_keep=0.05, rounds=3, threads=1,
                                num_classes=CLASSES, backend=backend)
    return run(req, path, progress=False).table_path


def configs(out: Path, table: Path, gamma: float) -> tuple[Path, Path]:
    lat, flops = out / "cfg" / "latency.json", out / "cfg" / "flops.json"
    template = GatingConfig(gradient_multiplier=gamma)
    if not lat.exists():
        res = make_config([table], method="model", template=template)
        write_config(res.config, lat)
        log(f"latency config: cost model {res.cost_model.method} "
            f"(grouped-CV MAPE {res.cost_model.cv_mape})")
    if not flops.exists():
        write_config(factor_config("flops", MODEL, input_size=SIZE, num_classes=CLASSES,
                                   template=template), flops)
    return lat, flops


def _check_backend(table: Path, backend: str) -> None:
    """A reused table must have been timed in the runtime the nets are benched in."""
    meta = json.loads(sidecar_path(table).read_text())
    if meta.get("backend", "torch") != backend:
        raise SystemExit(f"{table} was timed in {meta.get('backend', 'torch')}, not {backend}; "
                         "pass --backend to match or another --table")


def prune(out: Path, name: str, cfg: Path, target: str, weights: Path, a) -> dict:
    folder = out / "runs" / name
    plan = folder / "plan.json"
    if not plan.exists():
        if folder.exists():
            import shutil

            shutil.rmtree(folder)
        log(f"prune {name}: {target}")
        settings = TrainSettings(
            MODEL, config=cfg, data="digits", out=folder, epochs=a.epochs, lr=a.lr,
            batch_size=64, target=target, weights=weights, input_size=SIZE, seed=a.seed,
            device="cpu", round_to=a.round_to, budget_at=a.budget_at,
            importance_power=a.importance_power, importance_norm=a.importance_norm,
            gate_norm=a.gate_norm, calibrate=a.calibrate,
        )  # fmt: skip
        train(settings, log=lambda m: log(f"  {name} {m}"))
    doc = json.loads(plan.read_text())
    rows = (folder / "log.csv").read_text().splitlines()
    import csv

    log_rows = list(csv.DictReader(rows))
    gate_rows = [r for r in log_rows if r["gates"] == "training"]
    return {
        "name": name, "target": target, "fractions": doc["fractions"],
        "kept": doc["kept_channels"], "val_acc": float(log_rows[-1]["val_acc"]),
        "worst_gate_epoch_acc": min((float(r["val_acc"]) for r in gate_rows), default=None),
        "budget_epoch": next((int(r["epoch"]) for r in log_rows
                              if r["budget_met"] == "True"), None),
        "folder": str(folder),
        "calibrations": doc.get("calibrations", []),
        "trainer_measured": (doc.get("measured_latency") or {}).get("measured"),
    }


def greedy_optimum(lat: LatencyFunction, net, flops_fraction: float) -> list[int]:
    """Widths the cost model predicts fastest at FLOPs <= ``flops_fraction`` of the full net:
    repeatedly narrow the edge (to its next multiple of 8, 16, 32 or 64) that saves the most
    predicted ms per FLOP saved."""
    fmap = lat.cost_model.fmap
    w = np.array([e.channels for e in net.graph.edges], dtype=float)
    f_full = fmap.flops(w[None])[0]
    while fmap.flops(w[None])[0] > flops_fraction * f_full:
        probes = []
        for e in range(len(w)):
            for m in (8, 16, 32, 64):
                p = w.copy()
                p[e] = max(8.0, p[e] - (p[e] % m or m))
                probes.append(p)
        probes = np.stack(probes)
        dt = lat.predict(w[None])[0] - lat.predict(probes)
        df = fmap.flops(w[None])[0] - fmap.flops(probes)
        score = np.where(df > 0, dt / np.maximum(df, 1e-9), -np.inf)
        w = probes[int(np.argmax(score))]
    return [int(x) for x in w]


def bench_all(models: dict[str, torch.nn.Module], full: torch.nn.Module, flops: dict,
              repeats: int, rounds: int, backend: str = "torch") -> dict[str, list[float]]:
    spec = make_spec(MODEL, device="cpu", batch=BATCH, input_size=SIZE, threads=1,
                     backend=backend)
    torch.set_num_threads(1)
    ratios: dict[str, list[float]] = {k: [] for k in models}
    for r in range(repeats):
        names = list(models) if r % 2 == 0 else list(reversed(models))
        for name in names:
            res = compare_latency(full, models[name], spec, flops_ratio=flops[name],
                                  rounds=rounds)
            ratios[name].append(res.latency_ratio)
            log(f"bench {r + 1}/{repeats} {name}: {res}")
    return ratios


def pareto_plot(rows: list[dict], ref: dict | None, path: Path, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for kind, color, marker in (("latency", "tab:red", "o"), ("flops", "tab:blue", "s")):
        rs = [r for r in rows if r["config"] == kind]
        x = [r["measured"] for r in rs]
        lo = [r["measured"] - r["measured_min"] for r in rs]
        hi = [r["measured_max"] - r["measured"] for r in rs]
        y = [100 * r["val_acc"] for r in rs]
        ax.errorbar(x, y, xerr=[lo, hi], fmt=marker, color=color, capsize=3,
                    label=f"{kind} config")
        for r in rs:
            ax.annotate(f"b={r['budget']:g}", (r["measured"], 100 * r["val_acc"]),
                        textcoords="offset points", xytext=(4, 4), fontsize=7)
    if ref:
        for b, v in ref.items():
            ax.axvline(v["measured"], color="gray", ls=":", lw=1)
            ax.annotate(f"cost-model optimum\n(FLOPs of b={b})", (v["measured"], ax.get_ylim()[0]),
                        fontsize=6, color="gray", rotation=90, va="bottom")
    ax.set_xlabel("measured latency ratio (converted / full)")
    ax.set_ylabel("val acc (%)")
    ax.set_title(f"ResNet-18 {SIZE}px batch {BATCH} on {device}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/e2e_latency"))
    ap.add_argument("--table", type=Path, default=None, help="reuse a profile table")
    ap.add_argument("--random-nets", type=int, default=48)
    ap.add_argument("--budgets", default="0.7,0.5,0.35")
    ap.add_argument("--base-epochs", type=int, default=15)
    ap.add_argument("--base-weights", type=Path, default=None)
    ap.add_argument("--epochs", type=int, default=12, help="pruning + fine-tuning epochs")
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--gamma", type=float, default=0.2, help="gradient_multiplier")
    ap.add_argument("--budget-at", type=float, default=0.5)
    ap.add_argument("--round-to", type=int, default=1)
    ap.add_argument("--importance-power", type=float, default=1.0)
    ap.add_argument("--importance-norm", type=float, default=0.0,
                    help="both configs: 1 divides each edge's importances by their mean, "
                    "0 keeps raw Taylor scores")
    ap.add_argument("--gate-norm", default="none", choices=("none", "edge"),
                    help="both configs: how gate gradients compare between edges")
    ap.add_argument("--calibrate", default="auto", choices=("auto", "on", "off"),
                    help="latency runs: correct the ceiling by measuring the kept network")
    ap.add_argument("--repeats", type=int, default=3, help="bench runs per net")
    ap.add_argument("--rounds", type=int, default=5, help="rounds per bench run")
    ap.add_argument("--train-threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--backend", default="torch", choices=("torch", "onnxruntime"),
                    help="runtime of the profile, the calibrations and the bench")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    table = a.table or profile_table(a.out, a.random_nets, a.backend)
    _check_backend(table, a.backend)
    lat_cfg, flops_cfg = configs(a.out, table, a.gamma)
    torch.set_num_threads(a.train_threads)
    weights = a.base_weights or a.out / "base.safetensors"
    if not weights.exists():
        train_base(a.out, a.base_epochs, a.seed, model_name=MODEL, size=SIZE, lr=0.05, log=log)
    base_acc = base_accuracy(weights, a.seed, model_name=MODEL, size=SIZE)
    log(f"unpruned val acc {100 * base_acc:.2f}%")
    runs = []
    for b in [float(x) for x in a.budgets.split(",")]:
        lr_ = prune(a.out, f"latency_b{b:g}", lat_cfg, f"latency={b:g}", weights, a)
        f = lr_["fractions"]["flops"]
        fr_ = prune(a.out, f"flops_b{b:g}", flops_cfg, f"flops={f:.4f}", weights, a)
        runs += [{**lr_, "config": "latency", "budget": b}, {**fr_, "config": "flops",
                                                              "budget": b}]
    net = load_network(MODEL, input_size=SIZE, num_classes=CLASSES)
    cfg = read_config(lat_cfg)
    latfn = LatencyFunction(embedded_cost_model(cfg.cost_model, net.graph))
    full_ms = latfn.full_ms
    models, flops = {}, {}
    for r in runs:
        conv = convert_checkpoint(r["folder"])
        models[r["name"]] = conv.model
        flops[r["name"]] = r["fractions"]["flops"]
        r["predicted"] = float(latfn.predict(np.array([r["kept"]]))[0] / full_ms)
        r["convert_rel_error"] = conv.rel_error
    ref = {}
    for b in sorted({r["budget"] for r in runs}):
        lat_run = next(r for r in runs if r["config"] == "latency" and r["budget"] == b)
        w = greedy_optimum(latfn, net, lat_run["fractions"]["flops"])
        name = f"optimum_b{b:g}"
        models[name] = slim(net.model, net.graph, net.graph.first_channels_plan(
            dict(enumerate(w))))
        fw = latfn.cost_model.fmap.flops(np.array([w]))[0]
        flops[name] = float(fw / latfn.cost_model.fmap.flops(latfn.full.numpy()[None])[0])
        ref[b] = {"widths": w, "flops": flops[name],
                  "predicted": float(latfn.predict(np.array([w]))[0] / full_ms)}
    device = str(latfn.cost_model.context.get("device_name"))
    device += " in ONNX Runtime" if a.backend == "onnxruntime" else ""
    result = {"device": device, "backend": a.backend, "base_acc": base_acc,
              "runs": runs, "reference": ref, "settings": {k: str(v) for k, v in vars(a).items()}}
    if not a.skip_bench:
        ratios = bench_all(models, net.model, flops, a.repeats, a.rounds, a.backend)
        for r in runs:
            r["measured_all"] = ratios[r["name"]]
        for b, v in ref.items():
            v["measured_all"] = ratios[f"optimum_b{b:g}"]
        for r in [*runs, *ref.values()]:
            m = sorted(r["measured_all"])
            r["measured"], r["measured_min"], r["measured_max"] = m[len(m) // 2], m[0], m[-1]
    result["wall_s"] = time.perf_counter() - t0
    write_json(a.out / "results.json", result)
    write_text(a.out / "results.md", table_md(result))
    if not a.skip_bench:
        pareto_plot(runs, ref, a.out / "pareto.png", str(result["device"]))
    print(table_md(result))


def table_md(res: dict) -> str:
    lines = [f"device: {res['device']}; unpruned val acc {100 * res['base_acc']:.2f} %", ""]
    for r in res["runs"]:
        for c in r.get("calibrations", []):
            lines.append(f"- {r['name']} step {c['step']}: measured {c['measured']:.3f}, "
                         f"predicted {c['predicted']:.3f} -> ceiling x{c['scale']:.3f}")
    lines += ["",
             "| budget | config | FLOPs | predicted latency | measured latency (range) | "
             "val acc | worst gate-epoch acc | budget met at epoch |",
             "|---|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        meas = (f"{r['measured']:.3f} ({r['measured_min']:.3f}-{r['measured_max']:.3f})"
                if "measured" in r else "-")
        worst = r["worst_gate_epoch_acc"]
        lines.append(
            f"| {r['budget']:g} | {r['config']} | {r['fractions']['flops']:.3f} | "
            f"{r['predicted']:.3f} | {meas} | {100 * r['val_acc']:.2f} % | "
            f"{'-' if worst is None else f'{100 * worst:.2f} %'} | {r['budget_epoch']} |")
    for b, v in res["reference"].items():
        meas = (f"{v['measured']:.3f} ({v['measured_min']:.3f}-{v['measured_max']:.3f})"
                if "measured" in v else "-")
        lines.append(f"| {b:g} | cost-model optimum | {v['flops']:.3f} | {v['predicted']:.3f} | "
                     f"{meas} | - | - | - |")
    by = {}
    for r in res["runs"]:
        if "measured" in r:
            by.setdefault(r["budget"], {})[r["config"]] = r
    if by:
        lines += ["", "| budget | latency / FLOPs-config measured latency (median) | range of "
                  "per-run ratios | FLOPs difference (points) | val acc difference (points) |",
                  "|---|---|---|---|---|"]
        for b, d in by.items():
            if len(d) < 2:
                continue
            lat, fl = d["latency"], d["flops"]
            per = sorted(x / y for x, y in zip(lat["measured_all"], fl["measured_all"],
                                               strict=True))
            lines.append(
                f"| {b:g} | {lat['measured'] / fl['measured']:.3f} | {per[0]:.3f}-{per[-1]:.3f} "
                f"| {100 * (lat['fractions']['flops'] - fl['fractions']['flops']):+.2f} | "
                f"{100 * (lat['val_acc'] - fl['val_acc']):+.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
