"""gator-hw against Torch-Pruning and uniform width scaling at equal *measured* latency.

On one device (default: ResNet-18, 64 px, ``digitmax``, bench batch 8, 1 timing thread), from
the same trained base weights, for each latency budget b:

1. gator-hw with the latency config (``latency=b``), and with the plain FLOPs config at the
   FLOPs the latency run kept (equal FLOPs, as ``e2e_latency.py``), both converted;
2. the latency net's measured latency ratio L (``bench``'s protocol, ``--repeats`` runs);
3. each Torch-Pruning variant (``torch_pruning_peer.VARIANTS``: global Taylor and L2 magnitude,
   ``round_to`` 1 and 8, iterative; and uniform width scaling) with its pruning ratio bisected
   until its measured latency ratio is within 2 % of L, then fine-tuned for the same total
   epochs with the same optimiser (SGD, momentum 0.9, weight decay 5e-4), cosine schedule,
   batch, data order and seed as gator-hw's run (gate phase + fine-tune);
4. every net timed again against the full one in one round-robin bench run (``--repeats``);
5. ``results.json``, ``results.md`` (method, measured latency ratio with range, FLOPs, params,
   val acc ± binomial standard error, training time) and ``pareto.png``.

Every stage is cached in OUT (a cut run resumes).

    python benchmarks/compare_peers.py --out runs/peers \
        --table profiles/cpu-amd-epyc/resnet18_64px_b8_float32.csv [--budgets 0.7,0.5,0.35]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from e2e_digits import base_accuracy, train_base
from e2e_latency import _check_backend, _threads, bench_all, configs, log, num_classes, prune
from torch.utils.data import DataLoader
from torch_pruning_peer import VARIANTS, Variant, bisect_ratio, tp_prune, tp_version

from gator_hw.accounting import flop_counter_flops
from gator_hw.atomic import write_json, write_text
from gator_hw.evaluate import accuracy, compare_latency
from gator_hw.gated import convert_checkpoint
from gator_hw.models import build_model
from gator_hw.profile.timing import make_spec
from gator_hw.train import TrainSettings, load_data
from gator_hw.train.loop import learning_rate
from gator_hw.train.order import EpochOrder


def _spec(a):
    return make_spec(a.model, device="cpu", batch=a.batch_size, input_size=a.input_size,
                     threads=_threads(a), backend=a.backend)


def _params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def finetune(model: torch.nn.Module, data, a, log_name: str) -> tuple[float, float]:
    """Train ``model`` as gator-hw's trainer trains the kept net: SGD (momentum 0.9, weight
    decay 5e-4), ``a.lr`` on a cosine over ``a.epochs`` epochs, batch 64, the trainer's data
    order for ``a.seed``. Returns the final val acc (fraction) and the seconds it took."""
    t0 = time.perf_counter()
    torch.manual_seed(a.seed)
    s = TrainSettings(a.model, config=Path("-"), epochs=a.epochs, lr=a.lr)
    order = EpochOrder(data.train, a.seed)
    loader = DataLoader(data.train, 64, sampler=order, drop_last=True,
                        generator=order.loader_generator)
    opt = torch.optim.SGD(model.parameters(), lr=a.lr, momentum=s.momentum,
                          weight_decay=s.weight_decay)
    step = 0
    for ep in range(a.epochs):
        order.set_epoch(ep)
        model.train()
        for x, y in loader:
            for g in opt.param_groups:
                g["lr"] = learning_rate(s, step, len(loader))
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
            step += 1
        if ep == a.epochs - 1 or (ep + 1) % 4 == 0:
            acc = accuracy(model, data.val, batch_size=256).top1
            log(f"  {log_name} epoch {ep + 1}: val acc {acc:.2f}%")
    model.eval()
    return accuracy(model, data.val, batch_size=256).top1 / 100, time.perf_counter() - t0


def taylor_batches(data, seed: int, n: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed training batches for Taylor importance (the same for every probe)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data.train), generator=g)[: 64 * n].tolist()
    xs = torch.stack([data.train[i][0] for i in idx])
    ys = torch.tensor([data.train[i][1] for i in idx])
    return list(zip(xs.split(64), ys.split(64), strict=True))


def gator_runs(b: float, a, lat_cfg: Path, flops_cfg: Path, weights: Path) -> list[dict]:
    """gator-hw's latency run at ``b`` and the FLOPs run at the FLOPs it kept."""
    out = []
    t0 = time.perf_counter()
    lr_ = prune(a.out, f"latency_b{b:g}", lat_cfg, f"latency={b:g}", weights, a)
    lr_["train_s"] = _train_seconds(lr_, time.perf_counter() - t0)
    t0 = time.perf_counter()
    f = lr_["fractions"]["flops"]
    fr_ = prune(a.out, f"flops_b{b:g}", flops_cfg, f"flops={f:.4f}", weights, a)
    fr_["train_s"] = _train_seconds(fr_, time.perf_counter() - t0)
    for r, method, label in ((lr_, "gator_latency", "gator-hw latency config"),
                             (fr_, "gator_flops", "gator-hw FLOPs config (equal FLOPs)")):
        out.append({"method": method, "label": label, "budget": b, "name": r["name"],
                    "val_acc": r["val_acc"], "train_s": r["train_s"], "folder": r["folder"]})
    return out


def _train_seconds(run: dict, wall: float) -> float:
    """A run's training time: this call's wall time, or the one saved with a cached run."""
    path = Path(run["folder"]) / "train_seconds.json"
    if wall > 5 or not path.exists():
        write_json(path, {"seconds": wall})
    return float(json.loads(path.read_text())["seconds"])


def peer_run(v: Variant, b: float, target: float, base: torch.nn.Module, data, batches, a,
             ) -> dict:
    """Bisect ``v``'s ratio to the measured ``target``, fine-tune, cache model and result."""
    folder = a.out / "peers" / f"b{b:g}" / v.name
    res_path, model_path = folder / "result.json", folder / "model.pt"
    if res_path.exists():
        return json.loads(res_path.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(1, 3, a.input_size, a.input_size)
    spec, ncls = _spec(a), num_classes(a)

    def prune_at(r: float) -> torch.nn.Module:
        return tp_prune(base, example, v, r, batches=batches, num_classes=ncls)

    def measure(r: float) -> float:
        torch.set_num_threads(1)
        m = compare_latency(base, prune_at(r), spec, flops_ratio=0.0,
                            rounds=a.rounds).latency_ratio
        torch.set_num_threads(a.train_threads)
        log(f"  {v.name} b={b:g}: ratio {r:.4f} -> measured {m:.4f} (target {target:.4f})")
        return m

    t0 = time.perf_counter()
    bis = bisect_ratio(measure, target)
    bisect_s = time.perf_counter() - t0
    model = prune_at(bis.ratio)
    acc, train_s = finetune(model, data, a, f"{v.name} b={b:g}")
    torch.save(model, model_path)
    res = {"method": v.name, "label": v.label, "budget": b, "name": f"{v.name}_b{b:g}",
           "val_acc": acc, "train_s": train_s, "bisect_s": bisect_s, "ratio": bis.ratio,
           "bisect_measured": bis.measured, "bisect_error": bis.error,
           "probes": bis.probes, "model_path": str(model_path)}
    write_json(res_path, res)
    return res


def structure_run(b: float, gator: dict, base: torch.nn.Module, data, a) -> dict:
    """gator-hw's latency structure (the channels its gates kept) cut from the *base* weights
    and fine-tuned as the peers are, for the whole run: its structure without its training."""
    folder = a.out / "peers" / f"b{b:g}" / "gator_structure"
    res_path, model_path = folder / "result.json", folder / "model.pt"
    if res_path.exists():
        return json.loads(res_path.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    from gator_hw.convert import convert

    run = convert_checkpoint(gator["folder"])
    model = convert(copy.deepcopy(base).eval(), run.net.graph, run.keep)
    acc, train_s = finetune(model, data, a, f"gator_structure b={b:g}")
    torch.save(model, model_path)
    res = {"method": "gator_structure", "budget": b, "name": f"gator_structure_b{b:g}",
           "label": "gator-hw latency structure, fine-tuned as the peers", "val_acc": acc,
           "train_s": train_s + gator["train_s"], "model_path": str(model_path)}
    write_json(res_path, res)
    return res


def run_budget(b: float, a, lat_cfg: Path, flops_cfg: Path, weights: Path, base, data,
               batches) -> list[dict]:
    cache = a.out / "budgets" / f"b{b:g}.json"
    if cache.exists():
        rows = json.loads(cache.read_text())
        if not a.structure or any(r["method"] == "gator_structure" for r in rows):
            return rows
    rows = gator_runs(b, a, lat_cfg, flops_cfg, weights)
    models = {r["name"]: convert_checkpoint(r["folder"]).model.eval() for r in rows}
    torch.set_num_threads(1)
    lat_name = rows[0]["name"]
    first = [compare_latency(base, models[lat_name], _spec(a), flops_ratio=0.0,
                             rounds=a.rounds).latency_ratio for _ in range(a.repeats)]
    target = float(np.median(first))
    log(f"b={b:g}: gator-hw latency net measures {target:.4f} of the full net")
    torch.set_num_threads(a.train_threads)
    for v in VARIANTS:
        if a.variants and v.name not in a.variants:
            continue
        r = peer_run(v, b, target, base, data, batches, a)
        r["target"] = target
        rows.append(r)
        models[r["name"]] = torch.load(r["model_path"], weights_only=False).eval()
    if a.structure:
        r = structure_run(b, rows[0], base, data, a)
        rows.append(r)
        models[r["name"]] = torch.load(r["model_path"], weights_only=False).eval()
    shape = (1, 3, a.input_size, a.input_size)
    full_flops, full_params = flop_counter_flops(base, shape), _params(base)
    for r in rows:
        r["flops"] = flop_counter_flops(models[r["name"]], shape) / full_flops
        r["params"] = _params(models[r["name"]]) / full_params
    ratios = bench_all(models, base, {r["name"]: r["flops"] for r in rows}, a)
    for r in rows:
        m = sorted(ratios[r["name"]])
        r["measured_all"] = m
        r["measured"], r["measured_min"], r["measured_max"] = m[len(m) // 2], m[0], m[-1]
        r["val_se"] = math.sqrt(r["val_acc"] * (1 - r["val_acc"]) / len(data.val))
    write_json(cache, rows)
    return rows


def front_speed(rows: list[dict], acc: float) -> float | None:
    """Measured latency of gator-hw's latency front at val acc ``acc``: linear between its
    budgets' points (None where the front never reaches ``acc``)."""
    pts = sorted((r["measured"], r["val_acc"]) for r in rows if r["method"] == "gator_latency")
    best = None
    for (l0, a0), (l1, a1) in zip(pts, pts[1:], strict=False):
        if min(a0, a1) <= acc <= max(a0, a1) and a1 != a0:
            lat = l0 + (l1 - l0) * (acc - a0) / (a1 - a0)
            best = lat if best is None else min(best, lat)
    for lat, ac in pts:
        if ac >= acc:
            best = lat if best is None else min(best, lat)
    return best


def summary(rows: list[dict], base_acc: float, n_val: int) -> list[dict]:
    """Per budget: gator-hw's latency net against the best Torch-Pruning variant."""
    out = []
    for b in sorted({r["budget"] for r in rows}, reverse=True):
        rs = [r for r in rows if r["budget"] == b]
        ours = next(r for r in rs if r["method"] == "gator_latency")
        tps = [r for r in rs if r["method"].startswith("tp_")]
        if not tps:
            continue
        best = max(tps, key=lambda r: r["val_acc"])
        se = math.hypot(ours["val_se"], best["val_se"])
        lat = front_speed(rows, best["val_acc"])
        uni = next((r for r in rs if r["method"] == "uniform"), None)
        out.append({
            "uniform_margin": None if uni is None else ours["val_acc"] - uni["val_acc"],
            "budget": b, "landing": ours["measured"], "best_tp": best["method"],
            "acc_margin": ours["val_acc"] - best["val_acc"], "acc_margin_se": se,
            "latency_match": best["measured"] / ours["measured"] - 1,
            "front_speedup": None if lat is None else best["measured"] / lat - 1,
        })
    return out


def table_md(res: dict) -> str:
    lines = [f"device: {res['device']}; {res['model']} {res['input_size']} px, bench batch "
             f"{res['batch_size']}, 1 timing thread; task {res['data']} "
             f"({res['n_val']} val images); unpruned val acc {100 * res['base_acc']:.2f} %; "
             f"Torch-Pruning {res['tp_version']}; seed {res['seed']}", "",
             "| budget | method | measured latency (range) | FLOPs | params | val acc ± SE | "
             "train time |", "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(
            f"| {r['budget']:g} | {r['label']} | {r['measured']:.3f} "
            f"({r['measured_min']:.3f}-{r['measured_max']:.3f}) | {r['flops']:.3f} | "
            f"{r['params']:.3f} | {100 * r['val_acc']:.2f} ± {100 * r['val_se']:.2f} % | "
            f"{r['train_s'] / 60:.1f} min |")
    if res["summary"]:
        lines += ["", "| budget | gator-hw landing | best Torch-Pruning variant | its latency vs "
                  "ours | val acc margin (points ± SE) | gator-hw front faster at its acc | "
                  "val acc margin over uniform width |", "|---|---|---|---|---|---|---|"]
        for s in res["summary"]:
            fs = "-" if s["front_speedup"] is None else f"{100 * s['front_speedup']:+.1f} %"
            um = s.get("uniform_margin")
            um = "-" if um is None else f"{100 * um:+.2f}"
            lines.append(
                f"| {s['budget']:g} | {s['landing']:.3f} | {s['best_tp']} | "
                f"{100 * s['latency_match']:+.1f} % | {100 * s['acc_margin']:+.2f} ± "
                f"{100 * s['acc_margin_se']:.2f} | {fs} | {um} |")
    return "\n".join(lines) + "\n"


STYLE = {"gator_latency": ("tab:red", "o"), "gator_flops": ("tab:blue", "s"),
         "tp_taylor_r1": ("tab:green", "^"), "tp_taylor_r8": ("tab:olive", "v"),
         "tp_magnitude_r1": ("tab:purple", "D"), "tp_magnitude_r8": ("tab:pink", "P"),
         "uniform": ("tab:gray", "x"), "gator_structure": ("tab:orange", "*")}


def pareto_plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.8, 4.6))
    ax.axhline(100 * res["base_acc"], color="black", lw=0.8, ls=":", label="unpruned")
    for method, (color, marker) in STYLE.items():
        rs = sorted((r for r in res["rows"] if r["method"] == method),
                    key=lambda r: r["measured"])
        if not rs:
            continue
        x = [r["measured"] for r in rs]
        y = [100 * r["val_acc"] for r in rs]
        ax.errorbar(x, y, xerr=[[r["measured"] - r["measured_min"] for r in rs],
                                [r["measured_max"] - r["measured"] for r in rs]],
                    yerr=[100 * r["val_se"] for r in rs], fmt=marker, color=color, capsize=2,
                    label=rs[0]["label"], ls="-" if method == "gator_latency" else "none")
    ax.set_xlabel("measured latency ratio (pruned / full)")
    ax.set_ylabel("val acc (%)")
    ax.set_title(f"{res['model']} {res['input_size']} px, {res['data']}, on {res['device']}",
                 fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/peers"))
    ap.add_argument("--table", type=Path, required=True, help="this device's profile table")
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--data", default="digitmax")
    ap.add_argument("--input-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8, help="the bench's batch")
    ap.add_argument("--budgets", default="0.7,0.5,0.35")
    ap.add_argument("--variants", default="", help="comma-separated subset of the peers")
    ap.add_argument("--base-epochs", type=int, default=8)
    ap.add_argument("--base-weights", type=Path, default=None)
    ap.add_argument("--epochs", type=int, default=4, help="total epochs of every method")
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--gamma", type=float, default=0.2, help="gradient_multiplier")
    ap.add_argument("--importance-norm", type=float, default=0.0,
                    help="gator-hw: 1 divides each edge's Taylor importances by their mean")
    ap.add_argument("--budget-at", type=float, default=0.5,
                    help="gator-hw: the share of the run by which the budget is reached")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--train-threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--structure", action="store_true",
                    help="also fine-tune gator-hw's latency structure cut from the base weights "
                    "as the peers are (its structure without its training)")
    a = ap.parse_args()
    a.variants = [v for v in a.variants.split(",") if v]
    # what e2e_latency's prune reads
    a.device, a.backend, a.amp, a.round_to = "cpu", "torch", None, 1
    a.importance_power, a.gate_norm, a.calibrate = 1.0, "none", "auto"
    a.hold_epochs = 0.1 * a.epochs  # the gates hold the budget for a tenth of the run
    a.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    _check_backend(a.table, a.backend)
    lat_cfg, flops_cfg = configs(a.out, a.table, a)
    torch.set_num_threads(a.train_threads)
    weights = a.base_weights or a.out / "base.safetensors"
    if not weights.exists():
        train_base(a.out, a.base_epochs, a.seed, model_name=a.model, size=a.input_size,
                   lr=2e-3, optimizer="adamw", data_name=a.data, log=log)
    base_acc = base_accuracy(weights, a.seed, model_name=a.model, size=a.input_size,
                             data_name=a.data)
    log(f"unpruned val acc {100 * base_acc:.2f}%")
    data = load_data(a.data, a.input_size, seed=a.seed)
    base = build_model(a.model, data.num_classes, seed=a.seed)
    from safetensors.torch import load_file

    base.load_state_dict(load_file(str(weights)))
    base.eval()
    batches = taylor_batches(data, a.seed)
    from gator_hw.profile.device import cpu_name

    rows: list[dict] = []
    for b in [float(x) for x in a.budgets.split(",")]:
        rows += run_budget(b, a, lat_cfg, flops_cfg, weights, base, data, batches)
        res = {"device": cpu_name(), "model": a.model, "input_size": a.input_size,
               "batch_size": a.batch_size, "data": a.data, "n_val": len(data.val),
               "base_acc": base_acc, "tp_version": tp_version(), "seed": a.seed,
               "torch": torch.__version__, "rows": rows,
               "summary": summary(rows, base_acc, len(data.val)),
               "settings": {k: str(v) for k, v in vars(a).items()},
               "wall_s": time.perf_counter() - t0}
        write_json(a.out / "results.json", res)
        write_text(a.out / "results.md", table_md(res))
        pareto_plot(res, a.out / "pareto.png")
        log(f"budget {b:g} done ({res['wall_s']:.0f} s so far)")
    print(table_md(res))


if __name__ == "__main__":
    main()
