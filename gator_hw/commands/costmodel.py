"""``gator-hw make-config`` and ``gator-hw validate``: timing tables -> gating configs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from gator_hw.atomic import write_json
from gator_hw.commands.common import InputSize, console, err_console
from gator_hw.config import GatingConfig, write_config
from gator_hw.costmodel.make import FACTORS, METHODS, factor_config, make_config, table_context

__all__ = ["print_repeated", "register"]

Timing = Annotated[
    list[Path] | None,
    typer.Option("--timing", "--tables", exists=True, dir_okay=False,
                 help="Timing table(s): tidy profile CSVs, or one GATOR-format CSV for "
                      "--method gator. Repeat the option for several tables."),
]


def _default_out(table: Path, method: str) -> Path:
    return Path("cfg") / f"{table.stem}_{method}.json"


def _print_scores(scores) -> None:
    t = Table(title="held-out random nets")
    for col in ("predictor", "n", "MAPE%", "±5%", "±10%", "rho", "bias%", "worst%"):
        t.add_column(col, justify="left" if col == "predictor" else "right", no_wrap=True)
    for s in scores:
        t.add_row(s.predictor, str(s.n), f"{s.mape:.2f}", f"{s.within5:.0f}", f"{s.within10:.0f}",
                  f"{s.spearman:.3f}", f"{s.mean_signed:+.2f}", f"{s.worst:.2f}")
    console.print(t)


def _noise_floor(table: Path) -> float | None:
    import json

    from gator_hw.profile.tables import sidecar_path

    try:
        return float(json.loads(sidecar_path(table).read_text())["noise_floor"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def print_repeated(rep) -> None:
    t = Table(title=f"mean over {rep.splits} random holdouts, each refitted "
                    f"(chosen: {', '.join(f'{k} x{v}' for k, v in rep.chosen.most_common())})")
    for col in ("predictor", "MAPE%", "±5%", "±10%", "rho", "bias%", "|bias|%", "worst%"):
        t.add_column(col, justify="left" if col == "predictor" else "right", no_wrap=True)
    for name in rep.runs:
        m = rep.mean(name)
        t.add_row(name, f"{m['mape']:.2f}", f"{m['within5']:.0f}", f"{m['within10']:.0f}",
                  f"{m['spearman']:.3f}", f"{m['mean_signed']:+.2f}", f"{m['abs_bias']:.2f}",
                  f"{m['worst']:.2f}")
    console.print(t)
    for base, n in rep.wins.items():
        console.print(f"cost model at least as good as {base} on every metric: "
                      f"{n}/{rep.splits} splits")


def make_config_cmd(
    timing: Timing = None,
    factor: Annotated[str | None, typer.Option(
        help=f"Without tables: a plain {' / '.join(FACTORS)} config for --model "
             "(exact FLOPs or parameters as the cost).")] = None,
    method: Annotated[str, typer.Option(
        help=f"gator (the original half-width recipe), model (fit and pick the best cost "
             f"model), or one candidate: {', '.join(METHODS[2:])}.")] = "model",
    model: Annotated[str | None, typer.Option(
        help="Network the tables measured (default: recorded beside the table).")] = None,
    input_size: InputSize = None,
    out: Annotated[Path | None, typer.Option(
        help="Config to write (default cfg/<table>_<method>.json).")] = None,
    model_out: Annotated[Path | None, typer.Option(
        help="Also save the fitted cost model (JSON) here.")] = None,
    criteria_weight: Annotated[float, typer.Option(help="Cost-loss weight lambda.")] = 0.25,
    gradient_multiplier: Annotated[float, typer.Option(
        help="Learning-rate multiplier of the gate logits.")] = 0.2,
    gate_init_prob: Annotated[float, typer.Option(
        help="Initial probability that a gate is open.")] = 0.995,
    num_classes: Annotated[int, typer.Option(
        help="With --factor: classifier outputs of the network.")] = 1000,
) -> None:
    """Write a gating config: latency from measured tables (with the fitted cost model
    embedded, and GATOR edge_multipliers), or a plain FLOPs / memory one with --factor."""
    from gator_hw.errors import GatorError

    template = GatingConfig(criteria_weight=criteria_weight,
                            gradient_multiplier=gradient_multiplier,
                            gate_init_prob=gate_init_prob)
    if factor is not None:
        if timing:
            raise GatorError("pass either --timing tables or --factor, not both")
        if model is None or out is None:
            raise GatorError("--factor needs --model NAME and --out PATH")
        cfg = factor_config(factor, model, input_size=input_size, num_classes=num_classes,
                            template=template)
        console.print(f"{cfg.factor_type} config for {model}: static_total_cost "
                      f"{cfg.static_total_cost:g}")
        console.print(f"config written to [bold]{write_config(cfg, out)}[/]")
        return
    if not timing:
        raise GatorError("no timing table given; pass --timing PATH (or --factor flops "
                         "--model NAME for a plain FLOPs config)")
    result = make_config(timing, method=method, model=model, input_size=input_size,
                         template=template)
    path = write_config(result.config, out or _default_out(timing[0], method))
    if result.cost_model is not None:
        cm = result.cost_model
        cv = ", ".join(f"{k} {v:.2f}%" for k, v in sorted(cm.cv_mape.items(),
                                                            key=lambda kv: kv[1]))
        console.print(f"cost model: [bold]{cm.method}[/] (grouped-CV MAPE: {cv})")
        if cm.method == "flops_linear" and len(cm.cv_mape) > 1:
            floor = _noise_floor(timing[0])
            noise = f" (noise floor {100 * floor:.1f} %)" if floor else ""
            err_console.print(
                "[yellow]warning:[/] no candidate predicted this table better than "
                f"FLOPs{noise}, so every edge gets the same multiplier; profile with more "
                "--rounds, --threads 1 or a larger batch for a cleaner table",
                highlight=False, soft_wrap=True,
            )
        if model_out is not None:
            console.print(f"cost model saved to {cm.save(model_out)}")
    mu = result.config.edge_multipliers or []
    console.print(f"{len(mu)} edge multipliers, range {min(mu):.3f} .. {max(mu):.3f}")
    if result.config.cost_model is not None:
        console.print("the cost model is embedded: prune optimises its predicted latency")
    console.print(f"config written to [bold]{path}[/]")


def validate_cmd(
    model_file: Annotated[Path, typer.Option(
        exists=True, dir_okay=False, help="Cost model JSON from make-config --model-out.")],
    tables: Annotated[list[Path] | None, typer.Option(
        "--tables", exists=True, dir_okay=False,
        help="Tables holding the held-out random nets (default: the model's own).")] = None,
    json_out: Annotated[Path | None, typer.Option(
        help="Also write the scores and predictions as JSON.")] = None,
    splits: Annotated[int, typer.Option(
        min=1, help="Also refit on N seeded random holdouts and report mean scores "
                    "(one split of a few dozen nets is noisy).")] = 1,
) -> None:
    """Score the cost model, FLOPs-linear and the original additive model on held-out nets."""
    import json

    from gator_hw.costmodel.dataset import load_samples
    from gator_hw.costmodel.model import load_cost_model
    from gator_hw.costmodel.validate import repeated_holdout, validate
    from gator_hw.network import load_network

    doc = json.loads(model_file.read_text())
    ctx = table_context(doc["tables"][0]["path"]) if doc.get("tables") else {}
    classes = (doc.get("context") or {}).get("num_classes") or 1000
    net = load_network(doc["model"], input_size=doc["input_shape"][-1],
                       num_classes=int(classes))
    cm = load_cost_model(model_file, net.graph)
    paths = tables or [Path(t["path"]) for t in doc["tables"]]
    scores, detail = validate(cm, load_samples(paths, net.graph))
    console.print(f"{net.name} on {ctx.get('device', '?')}, batch {ctx.get('batch')}, "
                  f"{ctx.get('dtype')}: cost model {cm.method}")
    _print_scores(scores)
    rep = None
    if splits > 1:
        rep = repeated_holdout(paths, net.graph, splits=splits)
        print_repeated(rep)
    if json_out is not None:
        write_json(json_out, {"scores": [s.as_dict() for s in scores], **detail,
                              "context": ctx, "method": cm.method,
                              "repeated": rep.as_dict() if rep else None})
        console.print(f"scores written to {json_out}")


def register(app: typer.Typer) -> None:
    """Add ``make-config`` and ``validate`` to ``app``."""
    app.command("make-config")(make_config_cmd)
    app.command("validate")(validate_cmd)
