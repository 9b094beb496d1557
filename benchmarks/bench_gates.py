"""A gated training step against a plain one (default: ResNet-18, batch 32, 112x112, CPU).

Both steps run forward, cross-entropy, backward and an SGD step on the same model; the gated
one adds the gate sampling, the reader hooks, the cost loss, the importance update, the mask
update and the per-edge learning-rate refresh, and with ``--target`` the budget's projection
of every step (as ``prune --target`` runs it). ``--config`` takes a gating config (a latency
config carries its cost model: the loss and the projection then evaluate it every step).
Steps alternate (plain, gated, plain, ...) so that load changes on a shared machine hit both
alike; the ratio of medians is printed. Goal: <= 1.15.

    python benchmarks/bench_gates.py [--repeats 7] [--threads N]
    python benchmarks/bench_gates.py --model resnet50 --size 224 --batch 64 --device cuda \
        --config cfg/resnet50_h200_b32_float32.json --target latency=0.5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from gator_hw.budget import Budget, BudgetSchedule, BudgetTarget
from gator_hw.config import GatingConfig, read_config
from gator_hw.gates import GateSet
from gator_hw.loss import CostCriterion, gate_param_groups, refresh_gate_groups
from gator_hw.network import load_network

GOAL = 1.15


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--config", default=None, help="gating config (default: plain FLOPs)")
    ap.add_argument("--target", default=None, help="e.g. latency=0.5: time the projection too")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    old_threads = torch.get_num_threads()
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        run(a)
    finally:
        torch.set_num_threads(old_threads)


def run(a: argparse.Namespace) -> None:
    dev = torch.device(a.device)
    net = load_network(a.model, input_size=a.size, num_classes=1000)
    model, graph = net.model.train().to(dev), net.graph
    config = read_config(a.config) if a.config else GatingConfig()
    crit = CostCriterion(graph, config).to(dev)
    gates = GateSet.from_graph(graph, 0.995).to(dev)
    widths = gates.kept_widths()
    groups = [{"params": list(model.parameters()), "lr_scale": 1.0}]
    groups += gate_param_groups(gates, crit.edge_weights(widths), gamma=0.2, weight_decay=1e-4)
    opt = torch.optim.SGD(groups, lr=1e-3, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(a.batch, 3, a.size, a.size, device=dev)
    y = torch.randint(0, net.num_classes, (a.batch,), device=dev)
    budget = None
    if a.target:  # the ceiling falls from the first step: every step projects
        sched = BudgetSchedule.for_run(BudgetTarget.parse(a.target), 4 * (a.repeats + 1),
                                       budget_at=0.9, hold_steps=0)
        budget = Budget(sched, crit, theta0=5.3, gamma=0.2, momentum=0.9)
        budget.start(gates, 1e-3)
    step = 0

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def plain() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        sync()

    def gated() -> None:
        nonlocal step
        opt.zero_grad(set_to_none=True)
        (F.cross_entropy(model(x), y) + crit.loss(gates)).backward()
        gates.update_importance()
        opt.step()
        step += 1
        if budget is None:
            gates.update_masks()
        else:
            budget.step(step, gates, lr=1e-3, optimizer=opt)
        kept = gates.kept_widths()
        refresh_gate_groups(opt.param_groups, crit.edge_weights(kept), gamma=0.2, weight_decay=1e-4)
        sync()

    times: dict[str, list[float]] = {"plain": [], "gated": []}
    for i in range(a.repeats + 1):
        for name, fn in (("plain", plain), ("gated", gated)):
            if name == "gated":
                gates.attach(model, graph)
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            if name == "gated":
                gates.detach()
            if i:  # the first round is warm-up
                times[name].append(dt)
    p, g = statistics.median(times["plain"]), statistics.median(times["gated"])
    print(
        f"{a.model} batch {a.batch} {a.size}x{a.size} on {a.device}, "
        f"{torch.get_num_threads()} threads, {a.repeats} steps each, torch {torch.__version__}"
        f"{f', config {a.config}' if a.config else ''}{f', budget {a.target}' if a.target else ''}"
    )
    print(f"plain step median {p * 1e3:.1f} ms  (all: {[round(t * 1e3) for t in times['plain']]})")
    print(f"gated step median {g * 1e3:.1f} ms  (all: {[round(t * 1e3) for t in times['gated']]})")
    print(f"ratio gated/plain {g / p:.3f}  (goal <= {GOAL}): {'OK' if g / p <= GOAL else 'OVER'}")


if __name__ == "__main__":
    main()
