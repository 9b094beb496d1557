"""The coverage matrix: every torchvision classifier checked by ``gator_hw.soundness``, and a
sample of timm architectures.

Run: ``python benchmarks/zoo.py [--out runs/zoo] [--doc docs/coverage.md] [--timeout 900]
[--timm] [NAME ...]``. Each model runs in its own process with a time limit (random init, never
a download) and leaves ``OUT/NAME.json``; a re-run skips models already done, then writes the
Markdown matrix from every JSON there. ``--timm`` adds ``TIMM_SAMPLE`` (``timm:NAME``; needs
``pip install timm``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: what "sound" means for one row (float64 checks; FLOPs exact)
TOL = 1e-9

#: timm architectures users bring (one or two per family), with the input side each takes
TIMM_SAMPLE = {
    "resnet50d": 64, "resnetv2_50": 64, "seresnext26d_32x4d": 64, "ecaresnet26t": 64,
    "resnest14d": 64, "res2net50_14w_8s": 64, "nf_resnet50": 64, "regnety_002": 64,
    "efficientnet_b0": 64, "tf_efficientnet_lite0": 64, "mobilenetv3_large_100": 64,
    "mnasnet_100": 64, "fbnetc_100": 64, "mixnet_s": 64, "tinynet_a": 64, "hardcorenas_a": 64,
    "ghostnet_100": 64, "rexnet_100": 64, "lcnet_050": 64, "mobileone_s0": 64,
    "densenet121": 64, "dpn68": 64, "dla34": 64, "hrnet_w18_small": 64, "cspdarknet53": 64,
    "darknet53": 64, "repvgg_a0": 64, "gernet_s": 64, "selecsls42b": 64, "ese_vovnet19b_dw": 64,
    "hgnetv2_b0": 64, "inception_v4": 96, "xception41": 96, "convnext_atto": 64,
    "edgenext_xx_small": 64, "poolformer_s12": 64, "fastvit_t8": 64, "efficientvit_b0": 64,
    "vit_tiny_patch16_224": 224, "deit_tiny_patch16_224": 224, "levit_128s": 224,
    "efficientformer_l1": 224, "mobilevit_xxs": 256, "coat_tiny": 224,
    "swin_tiny_patch4_window7_224": 224, "maxvit_nano_rw_256": 256,
}


def _one(name: str, out: Path) -> None:
    """Child process: check one model and write its row."""
    import torch

    from gator_hw.atomic import write_text
    from gator_hw.models import build_model
    from gator_hw.soundness import check_model, zoo_input_size

    torch.set_num_threads(1)
    if name.startswith("timm:"):
        import timm

        arch = name.removeprefix("timm:")
        model = timm.create_model(arch, pretrained=False, num_classes=10)
        row = check_model(name, model, TIMM_SAMPLE.get(arch, 224))
    else:
        row = check_model(name, build_model(name), zoo_input_size(name))
    write_text(out / f"{_file(name)}.json", json.dumps(row.to_dict(), indent=1))


def _file(name: str) -> str:
    return name.replace(":", "_")


def _run(name: str, out: Path, timeout: float) -> None:
    t0 = time.perf_counter()
    cmd = [sys.executable, __file__, "--child", name, "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        res = subprocess.run(cmd, env=env, timeout=timeout, capture_output=True, text=True)
        failed = res.returncode != 0 and not (out / f"{_file(name)}.json").exists()
        why = (res.stderr.strip().splitlines() or [f"exit code {res.returncode}"])[-1]
    except subprocess.TimeoutExpired:
        failed, why = True, f"no result within {timeout:.0f} s"
    if failed:
        row = {"model": name, "error": why[:300]}
        (out / f"{_file(name)}.json").write_text(json.dumps(row, indent=1))
    print(f"{name:28s} {time.perf_counter() - t0:6.1f} s {'FAILED ' + why if failed else ''}",
          flush=True)


def _sound(r: dict) -> bool:
    return (not r.get("error") and r["empty_plan_changes"] == 0
            and max(r["flops_error"], r["half_flops_error"], r["slim_error"],
                    r["convert_error"]) <= TOL)


def _fmt(x: float) -> str:
    return "0" if x == 0 else f"{x:.0e}"


def _table(rows: list[dict]) -> list[str]:
    lines = [
        "| model | px | edges | prunable | FLOPs @ half | fixed FLOPs | FLOPs err | "
        "empty plan | slim vs masked | convert vs gated | discovery | sound |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("error") and "edges" not in r:
            lines.append(f"| {r['model']} | | | | | | | | | | | ✗ {r['error']} |")
            continue
        flops_err = max(r["flops_error"], r["half_flops_error"])
        lines.append(
            f"| {r['model']} | {r['input_size']} | {r['edges']} | "
            f"{100 * r['prunable_share']:.0f} % | {r['half_flops_ratio']:.3f} | "
            f"{100 * r['fixed_flops_share']:.1f} % | {_fmt(flops_err)} | "
            f"{'identity' if r['empty_plan_changes'] == 0 else str(r['empty_plan_changes'])} | "
            f"{_fmt(r['slim_error'])} | {_fmt(r['convert_error'])} | {r['discovery_s']:.2f} s | "
            f"{'✓' if _sound(r) else '✗ ' + r.get('error', '')} |"
        )
    return lines


def _reasons(rows: list[dict]) -> list[str]:
    lines = ["", "## Why channels are frozen", "",
             "Frozen channel groups per reason (network input and output left out):", ""]
    for r in rows:
        reasons = r.get("freeze_reasons") or {}
        if reasons:
            top = "; ".join(f"{k} ×{v}" for k, v in list(reasons.items())[:4])
            lines.append(f"- **{r['model']}**: {top}")
    return lines


def write_doc(out: Path, doc: Path) -> None:
    import torch
    import torchvision

    every = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    rows = [r for r in every if not r["model"].startswith("timm:")]
    sample = [r for r in every if r["model"].startswith("timm:")]
    sound = sum(_sound(r) for r in rows)
    prunable = sum(bool(r.get("edges")) for r in rows)
    head = [
        "# Coverage: the torchvision classifiers and a sample of timm", "",
        f"Generated by `python benchmarks/zoo.py` (torch {torch.__version__}, torchvision "
        f"{torchvision.__version__}, {platform.processor() or platform.machine()}, one thread; "
        "random init). Each model is checked by `gator_hw.soundness.check_model`, in float64: "
        "FLOPs against `FlopCounterMode` at full width and slimmed with every prunable edge at "
        "half width; the empty plan (must change no tensor); the slimmed model against the "
        "masked one for a random plan; the converted model against the gated one for random "
        "gate logits. *fixed FLOPs* are those of ops without a channel rule (attention "
        "matmuls, functional convs), counted but never pruned.", "",
        f"**{sound}/{len(rows)} sound** (errors ≤ {TOL:g}, the empty plan the identity); "
        f"**{prunable}/{len(rows)} with prunable edges.**", "",
    ]
    from gator_hw.atomic import write_text

    write_text(doc, "\n".join(head + _table(rows) + _timm(sample) + _reasons(every)) + "\n")
    print(f"{doc}: {sound}/{len(rows)} sound, {prunable}/{len(rows)} prunable; timm "
          f"{sum(_sound(r) for r in sample)}/{len(sample)} sound")


def _timm(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    import timm

    sound = sum(_sound(r) for r in rows)
    untraced = [r["model"] for r in rows if "cannot be traced" in r.get("error", "")]
    why = (f" The {len(untraced)} others ({', '.join(untraced)}) cannot be traced with torch.fx "
           "(Python control flow on a traced value): discovery stops with that one-line error, "
           "so no plan exists for them." if untraced else "")
    return ["", f"## A sample of timm architectures (timm {timm.__version__})", "",
            f"The same checks on {len(rows)} timm models users bring (`timm.create_model(name, "
            "pretrained=False, num_classes=10)`, or `timm:NAME` on the command line): "
            f"**{sound}/{len(rows)} sound, {sum(bool(r.get('edges')) for r in rows)}/{len(rows)} "
            f"with prunable edges.**{why}", "", *_table(rows)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "zoo")
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "coverage.md")
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--timm", action="store_true", help="add the timm sample (TIMM_SAMPLE)")
    ap.add_argument("--child")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    if a.child:
        _one(a.child, a.out)
        return
    from gator_hw.models import _torchvision_names

    names = a.names or [*_torchvision_names(), *(f"timm:{n}" for n in TIMM_SAMPLE if a.timm)]
    for name in names:
        if not (a.out / f"{_file(name)}.json").exists():
            _run(name, a.out, a.timeout)
    write_doc(a.out, a.doc)


if __name__ == "__main__":
    main()
