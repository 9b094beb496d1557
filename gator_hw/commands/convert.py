"""``gator-hw export``, ``eval`` and ``bench`` on a converted model directory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gator_hw.commands.common import BackendName, BackendOption, console

__all__ = ["register"]

ModelDir = Annotated[
    Path,
    typer.Argument(help="Directory written by `gator-hw convert` (model.safetensors + plan.json)."),
]


def convert_cmd(
    run: Annotated[Path, typer.Argument(
        help="Run folder of `gator-hw prune` (uses last.json) or a checkpoint NAME.json.")],
    out: Annotated[Path, typer.Option(help="Directory to write the converted model to.")],
    data: Annotated[str | None, typer.Option(
        help="Check equality on a real batch of this data (digits, imagefolder:PATH, ...)."
    )] = None,
) -> None:
    """Remove every pruned channel for real and save model.safetensors + plan.json."""
    from gator_hw.gated import convert_checkpoint
    from gator_hw.io import save

    batch = None
    if data is not None:
        from torch.utils.data import DataLoader

        from gator_hw.train.checkpoint import load_checkpoint
        from gator_hw.train.data import load_data

        sig = load_checkpoint(run).meta["signature"]
        ds = load_data(data, int(sig["input_shape"][-1]))
        batch = next(iter(DataLoader(ds.val, batch_size=16)))[0]
    r = convert_checkpoint(run, batch)
    net = r.net
    save(out, r.model, name=net.name, num_classes=net.num_classes,
         input_size=net.input_size, graph=net.graph, keep=r.keep,
         provenance={"source": str(r.source), "epoch": r.meta.get("epoch"),
                     "config": r.meta.get("config"), "check_rel_error": r.rel_error})
    console.print(r.summary())
    console.print(f"saved to [bold]{out}[/] (load with gator_hw.load)")


def export_cmd(
    model_dir: ModelDir,
    onnx: Annotated[Path | None, typer.Option(help="Write an ONNX file here.")] = None,
    torchscript: Annotated[
        Path | None, typer.Option(help="Write a TorchScript file here.")
    ] = None,
    program: Annotated[
        Path | None,
        typer.Option("--torch-export", help="Write a torch.export program (.pt2) here."),
    ] = None,
) -> None:
    """Export a converted model and check the export against PyTorch (1e-4 relative)."""
    from gator_hw.errors import GatorError
    from gator_hw.export import export_onnx, export_program, export_torchscript
    from gator_hw.io import load, load_plan

    if not (onnx or torchscript or program):
        raise GatorError("nothing to export; pass --onnx, --torchscript or --torch-export")
    doc = load_plan(model_dir)
    model = load(model_dir)
    shape = (1, 3, doc["input_size"], doc["input_size"])
    for fn, path in (
        (export_onnx, onnx),
        (export_torchscript, torchscript),
        (export_program, program),
    ):
        if path is not None:
            console.print(str(fn(model, shape, path)))


def eval_cmd(
    model_dir: ModelDir,
    data: Annotated[
        str,
        typer.Option(help="digits, digitmax, fake, imagefolder:PATH (train/ and val/) or "
                     "cifar10:PATH."),
    ],
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 128,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")] = "cpu",
) -> None:
    """Top-1 and top-5 accuracy of a converted model on the validation split."""
    from gator_hw.evaluate import accuracy
    from gator_hw.io import load, load_plan
    from gator_hw.profile.timing import resolve_device
    from gator_hw.train.data import load_data

    dev = resolve_device(device)
    doc = load_plan(model_dir)
    ds = load_data(data, doc["input_size"])
    acc = accuracy(load(model_dir), ds.val, batch_size=batch_size, device=dev)
    console.print(f"{doc['model']} (converted): {acc}")


def bench_cmd(
    model_dir: ModelDir,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")] = "cpu",
    batch_size: Annotated[int, typer.Option(help="Images per forward.")] = 8,
    dtype: Annotated[str, typer.Option(help="float32, float16 or bfloat16.")] = "float32",
    channels_last: Annotated[bool, typer.Option(help="NHWC memory format.")] = False,
    eager: Annotated[bool, typer.Option(help="On CUDA, time eager calls, not graphs.")] = False,
    rounds: Annotated[int, typer.Option(min=1, help="Alternating timing rounds.")] = 3,
    threads: Annotated[int | None, typer.Option(help="CPU threads.")] = None,
    interleave: Annotated[bool | None, typer.Option(
        "--interleave/--no-interleave",
        help="Alternate blocks of the two models within each round (ABBA; default: on for "
        "CPU, off for CUDA).")] = None,
    backend: BackendOption = BackendName.torch,
) -> None:
    """Time the original and the converted model side by side; print both ratios."""
    from gator_hw.evaluate import bench_converted
    from gator_hw.profile.spec import TimingOptions

    result = bench_converted(model_dir, TimingOptions(
        device=device, batch=batch_size, dtype=dtype, channels_last=channels_last, eager=eager,
        threads=threads, interleave=interleave, backend=backend.value), rounds=rounds)
    console.print(f"original  {result.original_median_ms:.4g} ms")
    console.print(f"converted {result.converted_median_ms:.4g} ms")
    console.print(str(result))


def register(app: typer.Typer) -> None:
    """Add ``convert``, ``export``, ``eval`` and ``bench`` to ``app``."""
    app.command("convert")(convert_cmd)
    app.command("export")(export_cmd)
    app.command("eval")(eval_cmd)
    app.command("bench")(bench_cmd)
