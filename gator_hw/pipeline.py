"""The main job end to end: profile -> cost model and config -> validation -> plots."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gator_hw.config import GatingConfig, write_config
from gator_hw.costmodel.dataset import load_samples
from gator_hw.costmodel.make import make_config
from gator_hw.costmodel.validate import Scores, validate
from gator_hw.network import load_network
from gator_hw.profile.runner import ProfileRequest, ProfileResult, run
from gator_hw.report import plot_all

__all__ = ["QuickstartResult", "quickstart"]


@dataclass(frozen=True)
class QuickstartResult:
    """Everything the main job wrote and measured."""

    profile: ProfileResult
    config_path: Path
    model_path: Path
    scores: list[Scores]
    plots: list[Path]


def quickstart(
    out_dir: str | Path = "runs/quickstart",
    *,
    model: str = "resnet18",
    input_size: int = 64,
    batch: int = 8,
    device: str = "cpu",
    widths: str = "0.25,0.5,0.75",
    random_nets: int = 16,
    rounds: int = 3,
    threads: int | None = None,
    progress: bool = True,
) -> QuickstartResult:
    """Profile ``model`` on ``device``, fit the cost model, write a config, validate, plot."""
    out = Path(out_dir)
    request = ProfileRequest.create(
        model, device=device, batch=batch, input_size=input_size, widths=widths,
        random_nets=random_nets, rounds=rounds, threads=threads,
    )
    prof = run(request, out / f"{model}_b{batch}_{request.spec.dtype}.csv", progress=progress)
    result = make_config([prof.table_path], method="model", template=GatingConfig())
    config_path = write_config(result.config, out / f"{model}_latency_config.json")
    model_path = result.cost_model.save(out / f"{model}_costmodel.json")
    net = load_network(model, input_size=input_size)
    scores, _ = validate(result.cost_model, load_samples([prof.table_path], net.graph))
    plots = plot_all(net, [prof.table_path], out / "plots", cost_model=result.cost_model)
    return QuickstartResult(prof, config_path, model_path, scores, plots)
