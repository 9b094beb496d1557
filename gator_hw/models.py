"""Build a model by name: torchvision classifiers, the CIFAR ResNet-56, or ``file.py:factory``.

Nothing is ever downloaded: every model starts from random initialisation (load your own
trained weights with ``load_weights``).
"""

from __future__ import annotations

import difflib
import importlib.util
import sys
from pathlib import Path

import torch
from torch import nn

from gator_hw.errors import GatorError

__all__ = [
    "available_models",
    "build_model",
    "default_input_size",
    "is_weights_name",
    "load_weights",
    "pretrained_state",
    "resnet56",
]


# ---------------------------------------------------------------------------
# The CIFAR ResNet-56 of the GATOR paper (projection shortcuts, 0.85 M conv params)
# ---------------------------------------------------------------------------
class _CifarBlock(nn.Module):
    """Basic block (two 3x3 convs); a 1x1 conv + BN projection where the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs: 3 stages of ``n`` basic blocks with 16, 32, 64 channels."""

    def __init__(self, depth: int = 56, num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise GatorError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        layers, cin = [], 16
        for width, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = [_CifarBlock(cin, width, stride)]
            blocks += [_CifarBlock(width, width, 1) for _ in range(n - 1)]
            layers.append(nn.Sequential(*blocks))
            cin = width
        self.layer1, self.layer2, self.layer3 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet56(num_classes: int = 10) -> CifarResNet:
    """The CIFAR-10 ResNet-56 used in the GATOR paper (32x32 input)."""
    return CifarResNet(56, num_classes)


_CIFAR = {"resnet20": 20, "resnet32": 32, "resnet44": 44, "resnet56": 56, "resnet110": 110}


def _torchvision_names() -> list[str]:
    from torchvision import models

    return sorted(models.list_models(module=models))


def available_models() -> list[str]:
    """Every name ``build_model`` accepts (besides ``file.py:factory``)."""
    return sorted(set(_torchvision_names()) | set(_CIFAR))


def default_input_size(name: str) -> int:
    """The square input side a model expects: 32 for CIFAR nets, 299 for Inception, else 224."""
    base = name.split(":", 1)[-1]
    if name.startswith("timm:"):
        return _timm_input_size(base)
    if base in _CIFAR:
        return 32
    if base.startswith("inception"):
        return 299
    return 224


def _timm():
    try:
        import timm
    except ImportError:
        raise GatorError("timm:NAME models need timm; pip install 'gator-hw[timm]'") from None
    return timm


def _timm_input_size(arch: str) -> int:
    """The input side of a timm architecture's default pretrained config (224 if it has none)."""
    try:
        cfg = _timm().get_pretrained_cfg(arch)
    except Exception:  # an unknown name: build_model reports it
        cfg = None
    return int(cfg.input_size[-1]) if cfg is not None and cfg.input_size else 224


def _timm_model(arch: str, num_classes: int) -> nn.Module:
    """A timm architecture with random weights (``pretrained=False``: never a download)."""
    timm = _timm()
    if arch not in timm.list_models():
        close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join('timm:' + c for c in close)}?" if close else ""
        raise GatorError(f"unknown timm model '{arch}'{hint} (see timm.list_models())")
    return timm.create_model(arch, pretrained=False, num_classes=num_classes)


def _load_factory(spec: str, num_classes: int | None) -> nn.Module:
    path_s, factory = spec.rsplit(":", 1)
    path = Path(path_s)
    if not path.is_file():
        raise GatorError(
            f"model file {path} does not exist; pass an existing path/to/file.py:factory"
        )
    mod_name = f"_gator_user_model_{abs(hash(path.resolve()))}"
    module_spec = importlib.util.spec_from_file_location(mod_name, path)
    if module_spec is None or module_spec.loader is None:
        raise GatorError(f"cannot import {path} as Python; pass a .py file")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[mod_name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:  # the user's file: report its failure on one line
        raise GatorError(f"importing {path} failed: {type(exc).__name__}: {exc}") from exc
    fn = getattr(module, factory, None)
    if not callable(fn):
        names = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        hint = difflib.get_close_matches(factory, names, n=3)
        more = f"; did you mean {', '.join(hint)}?" if hint else f"; callables there: {names[:8]}"
        raise GatorError(f"{path} has no factory named '{factory}'{more}")
    model = fn(num_classes=num_classes) if num_classes is not None else fn()
    if not isinstance(model, nn.Module):
        raise GatorError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def build_model(name: str, num_classes: int = 1000, *, seed: int | None = 0) -> nn.Module:
    """Build a model with random weights in eval mode.

    Parameters
    ----------
    name : a torchvision classification builder (``resnet50``), a CIFAR ResNet
        (``resnet56``; ``num_classes`` defaults to 10 there when left at 1000), a timm
        architecture as ``timm:NAME`` (timm installed), or ``path/to/file.py:factory``
        (called with ``num_classes`` when it is not 1000).
    num_classes : classifier outputs.
    seed : seeds the random initialisation, so the same name gives the same weights.
    """
    if seed is not None:
        torch.manual_seed(seed)
    if ":" in name and name.split(":", 1)[0].endswith(".py"):
        model = _load_factory(name, None if num_classes == 1000 else num_classes)
    elif name.startswith("timm:"):
        model = _timm_model(name.removeprefix("timm:"), num_classes)
    elif name in _CIFAR:
        model = CifarResNet(_CIFAR[name], 10 if num_classes == 1000 else num_classes)
    elif name in _torchvision_names():
        from torchvision import models

        kwargs: dict = {"weights": None, "num_classes": num_classes}
        if name in ("googlenet", "inception_v3"):
            # auxiliary heads only run in training and would hang off pruned channels
            kwargs.update(aux_logits=False, init_weights=True)
        model = models.get_model(name, **kwargs)
    else:
        close = difflib.get_close_matches(name, available_models(), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise GatorError(
            f"unknown model '{name}'{hint} (see `gator-hw models`, pass timm:NAME or "
            "path/to/file.py:factory)"
        )
    return model.eval()


_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


def is_weights_name(text: str | Path) -> bool:
    """True for a torchvision weights name (``DEFAULT``, ``IMAGENET1K_V2``,
    ``ResNet50_Weights.IMAGENET1K_V2``) rather than a file path."""
    s = str(text)
    return (not Path(s).exists() and "/" not in s and "\\" not in s
            and not s.lower().endswith(_WEIGHT_SUFFIXES) and s.replace(".", "_").replace(
                "_", "").isalnum())


def pretrained_state(name: str, weights: str) -> dict:
    """The state dict of torchvision's ``weights`` for builder ``name``, through torchvision's
    own weights API and the torch hub cache (``$TORCH_HOME/hub/checkpoints``); fetched only
    when not cached. GatorError (one line, with the fix) for an unknown name or when it is
    neither cached nor reachable."""
    from torchvision.models import get_model_weights

    try:
        enum = get_model_weights(name)
    except (ValueError, KeyError):
        raise GatorError(f"--weights {weights}: {name} has no torchvision weights; pass a state "
                         "dict file instead") from None
    key = weights.split(".")[-1]
    if key not in enum.__members__:
        raise GatorError(f"--weights {weights}: {name} has {', '.join(enum.__members__)}; or "
                         "pass a state dict file")
    w = enum[key]
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(w.url).name
    try:
        return w.get_state_dict(progress=False)
    except Exception as exc:  # no network, proxy, a truncated download: all one fix
        raise GatorError(
            f"--weights {weights}: {w} is not in the torch hub cache ({cached}) and could not "
            f"be fetched ({type(exc).__name__}); download {w.url} to that path or pass "
            "--weights FILE"
        ) from None


def _fit_head(model: nn.Module, state: dict) -> tuple[dict, list[str]]:
    """Drop the classifier's tensors when their shape differs (pretrained on 1000 classes,
    pruned on 10): the head then starts at random. Other mismatches stay errors."""
    own = model.state_dict()
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    head = linears[-1] if linears else None
    bad = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if head is None or any(k.rsplit(".", 1)[0] != head for k in bad):
        return state, []
    return {k: v for k, v in state.items() if k not in bad}, bad


def load_weights(model: nn.Module, path: str | Path, name: str | None = None,
                 log=None) -> nn.Module:
    """Load a state dict (``.pt``/``.pth``, read with ``weights_only``, or ``.safetensors``),
    or, with the builder ``name``, torchvision weights by name (``DEFAULT``, ...).

    A classifier whose class count differs from the weights' starts at random (``log`` says so).
    """
    if name is not None and is_weights_name(path):
        state, dropped = _fit_head(model, pretrained_state(name, str(path)))
        if dropped and log is not None:
            log(f"--weights {path}: the classifier ({', '.join(dropped)}) does not fit "
                "the class count and starts at random")
        try:
            model.load_state_dict(state, strict=not dropped)
        except RuntimeError as exc:
            raise GatorError(f"--weights {path} do not fit {name}: "
                             f"{str(exc).splitlines()[0][:200]}") from None
        return model
    path = Path(path)
    if not path.is_file():
        raise GatorError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise GatorError(f"cannot read weights {path}: {type(exc).__name__}: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:2])
        raise GatorError(f"weights {path} do not fit this model: {detail[:300]}") from exc
    return model
