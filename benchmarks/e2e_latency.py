"""Does pruning for measured latency give a faster network than pruning for FLOPs? Measure it.

On one device, end to end (every stage is cached in OUT, so a re-run resumes):

1. profile the model (default ResNet-18, 64 px, batch 8, 10 classes; ``--model``,
   ``--input-size``, ``--batch-size``, ``--device``) on this device, or reuse ``--table``
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
   with its range, val acc) and ``pareto.png`` (val acc vs measured latency ratio), after
   every budget (each budget's pair is cached in ``OUT/budgets/``, so a cut run keeps them).

    python benchmarks/e2e_latency.py --out runs/e2e_latency [--table T.csv] [--epochs 12]
        [--backend onnxruntime]   # profile, calibrate and bench in ONNX Runtime
    python benchmarks/e2e_latency.py --model resnet50 --input-size 224 --batch-size 32 \
        --device cuda --amp bfloat16 --table profiles/h200/resnet50_b32_float32.csv
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

CLASSES = 10


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _threads(a) -> int | None:
    """Timing threads: one on a CPU (a 2-core host shared with other work), the default on
    CUDA (host threads matter little there)."""
    return 1 if a.device == "cpu" else None


def num_classes(a) -> int:
    """Classes of ``a.data`` (the digits' 10 unless the run names another task)."""
    from gator_hw.train.digitmax import DIGITMAX_CLASSES

    return DIGITMAX_CLASSES if getattr(a, "data", "digits") == "digitmax" else CLASSES


def profile_table(out: Path, a) -> Path:
    path = out / "profile" / f"{a.model}_{a.input_size}px_b{a.batch_size}_float32.csv"
    req = ProfileRequest.create(a.model, device=a.device, batch=a.batch_size,
                                input_size=a.input_size, widths="0.125,0.25,0.5,0.75",
                                random_nets=a.random_nets, random_min_keep=0.05, rounds=3,
                                threads=_threads(a), num_classes=CLASSES, backend=a.backend)
    return run(req, path, progress=False).table_path


def configs(out: Path, table: Path, a) -> tuple[Path, Path]:
    lat, flops = out / "cfg" / "latency.json", out / "cfg" / "flops.json"
    template = GatingConfig(gradient_multiplier=a.gamma)
    if not lat.exists():
        res = make_config([table], method="model", template=template)
        write_config(res.config, lat)
        log(f"latency config: cost model {res.cost_model.method} "
            f"(grouped-CV MAPE {res.cost_model.cv_mape})")
    if not flops.exists():
        write_config(factor_config("flops", a.model, input_size=a.input_size,
                                   num_classes=num_classes(a), template=template), flops)
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
            a.model, config=cfg, data=a.data, out=folder, epochs=a.epochs, lr=a.lr,
            batch_size=64, target=target, weights=weights, input_size=a.input_size,
            seed=a.seed, device=a.device, round_to=a.round_to, budget_at=a.budget_at,
            hold_epochs=getattr(a, "hold_epochs", 1.0),
            importance_power=a.importance_power, importance_norm=a.importance_norm,
            gate_norm=a.gate_norm, calibrate=a.calibrate, amp=a.amp is not None,
            amp_dtype=a.amp or "float16",
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
              a) -> dict[str, list[float]]:
    spec = make_spec(a.model, device=a.device, batch=a.batch_size, input_size=a.input_size,
                     threads=_threads(a), backend=a.backend)
    ratios: dict[str, list[float]] = {k: [] for k in models}
    for r in range(a.repeats):
        names = list(models) if r % 2 == 0 else list(reversed(models))
        for name in names:
            res = compare_latency(full, models[name], spec, flops_ratio=flops[name],
                                  rounds=a.rounds)
            ratios[name].append(res.latency_ratio)
            log(f"bench {r + 1}/{a.repeats} {name}: {res}")
    return ratios


def pareto_plot(rows: list[dict], ref: dict | None, path: Path, device: str, a) -> None:
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
    ax.set_title(f"{a.model} {a.input_size}px batch {a.batch_size} on {device}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def run_budget(b: float, a, lat_cfg: Path, flops_cfg: Path, weights: Path, net,
               latfn: LatencyFunction) -> dict:
    """Prune both ways to budget ``b``, convert, find the cost model's optimum at the same
    FLOPs and bench the three; cached in ``OUT/budgets/`` so a re-run skips a done budget."""
    cache = a.out / "budgets" / f"b{b:g}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    lr_ = prune(a.out, f"latency_b{b:g}", lat_cfg, f"latency={b:g}", weights, a)
    f = lr_["fractions"]["flops"]
    fr_ = prune(a.out, f"flops_b{b:g}", flops_cfg, f"flops={f:.4f}", weights, a)
    runs = [{**lr_, "config": "latency", "budget": b}, {**fr_, "config": "flops", "budget": b}]
    full_ms = latfn.full_ms
    models, flops = {}, {}
    for r in runs:
        conv = convert_checkpoint(r["folder"])
        models[r["name"]] = conv.model
        flops[r["name"]] = r["fractions"]["flops"]
        r["predicted"] = float(latfn.predict(np.array([r["kept"]]))[0] / full_ms)
        r["convert_rel_error"] = conv.rel_error
    w = greedy_optimum(latfn, net, f)
    name = f"optimum_b{b:g}"
    models[name] = slim(net.model, net.graph, net.graph.first_channels_plan(dict(enumerate(w))))
    fw = latfn.cost_model.fmap.flops(np.array([w]))[0]
    flops[name] = float(fw / latfn.cost_model.fmap.flops(latfn.full.numpy()[None])[0])
    ref = {"widths": w, "flops": flops[name],
           "predicted": float(latfn.predict(np.array([w]))[0] / full_ms)}
    if not a.skip_bench:
        ratios = bench_all(models, net.model, flops, a)
        for r in [*runs, ref]:
            r["measured_all"] = ratios[r.get("name", name)]
            m = sorted(r["measured_all"])
            r["measured"], r["measured_min"], r["measured_max"] = m[len(m) // 2], m[0], m[-1]
    entry = {"budget": b, "runs": runs, "reference": ref}
    write_json(cache, entry)
    return entry


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/e2e_latency"))
    ap.add_argument("--table", type=Path, default=None, help="reuse a profile table")
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--input-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8, help="the profile's and bench's batch")
    ap.add_argument("--device", default="cpu", help="cpu or cuda: profile, train and bench")
    ap.add_argument("--amp", default=None, choices=("bfloat16", "float16"),
                    help="training autocast dtype on CUDA (timing stays in the table's dtype)")
    ap.add_argument("--data", default="digits", help="digits or digitmax (a task where "
                    "accuracy is at stake)")
    ap.add_argument("--random-nets", type=int, default=48)
    ap.add_argument("--budgets", default="0.7,0.5,0.35")
    ap.add_argument("--base-epochs", type=int, default=15)
    ap.add_argument("--base-optimizer", default="sgd", choices=("sgd", "adamw"),
                    help="the unpruned net's training: sgd (lr 0.05, cosine) or adamw (lr 2e-3, "
                    "one cycle; ResNet-50 needs it)")
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
    table = a.table or profile_table(a.out, a)
    _check_backend(table, a.backend)
    lat_cfg, flops_cfg = configs(a.out, table, a)
    torch.set_num_threads(a.train_threads)
    weights = a.base_weights or a.out / "base.safetensors"
    if not weights.exists():
        train_base(a.out, a.base_epochs, a.seed, model_name=a.model, size=a.input_size,
                   lr=0.05 if a.base_optimizer == "sgd" else 2e-3, device=a.device, amp=a.amp,
                   optimizer=a.base_optimizer, data_name=a.data, log=log)
    base_acc = base_accuracy(weights, a.seed, model_name=a.model, size=a.input_size,
                             device=a.device, data_name=a.data)
    log(f"unpruned val acc {100 * base_acc:.2f}%")
    net = load_network(a.model, input_size=a.input_size, num_classes=num_classes(a))
    cfg = read_config(lat_cfg)
    latfn = LatencyFunction(embedded_cost_model(cfg.cost_model, net.graph))
    device = str(latfn.cost_model.context.get("device_name"))
    device += " in ONNX Runtime" if a.backend == "onnxruntime" else ""
    runs, ref = [], {}
    for b in [float(x) for x in a.budgets.split(",")]:
        entry = run_budget(b, a, lat_cfg, flops_cfg, weights, net, latfn)
        runs += entry["runs"]
        ref[b] = entry["reference"]
        result = {"device": device, "backend": a.backend, "base_acc": base_acc, "runs": runs,
                  "reference": ref, "settings": {k: str(v) for k, v in vars(a).items()},
                  "wall_s": time.perf_counter() - t0}
        write_json(a.out / "results.json", result)
        write_text(a.out / "results.md", table_md(result))
        if not a.skip_bench:
            pareto_plot(runs, ref, a.out / "pareto.png", device, a)
        log(f"budget {b:g} done ({result['wall_s']:.0f} s so far)")
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
