"""Training data from a one-word spec: ``digits``, ``digitmax``, ``fake``, ``imagefolder:PATH``,
``cifar10:PATH``.

Nothing is ever downloaded. ``digits`` is scikit-learn's bundled handwritten digits (1797 real
8x8 images, 10 classes), upsampled to 3 x S x S with a fixed stratified 80/20 train/val split;
it saturates (every net ~99 %). ``digitmax`` composes those digits into cluttered canvases
of two digits labelled with the larger one (10 classes, see :mod:`gator_hw.train.digitmax`): a
task where pruning costs accuracy.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from gator_hw.errors import GatorError

__all__ = ["DATA_KINDS", "DataSpec", "Datasets", "TensorImages", "load_data"]

#: Accepted ``--data`` kinds.
DATA_KINDS: tuple[str, ...] = ("digits", "digitmax", "fake", "imagefolder", "cifar10")

_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_CIFAR_MEAN, _CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


@dataclass(frozen=True)
class DataSpec:
    """A parsed ``--data`` value: a kind and, for file-based kinds, a path."""

    kind: str
    path: Path | None = None

    @classmethod
    def parse(cls, spec: str) -> DataSpec:
        """Parse ``digits``, ``digitmax``, ``fake``, ``imagefolder:PATH`` or ``cifar10:PATH``."""
        kind, sep, path = spec.partition(":")
        kind = kind.strip().lower()
        if kind not in DATA_KINDS:
            raise GatorError(
                f"unknown --data {spec!r}; use digits, digitmax, fake, imagefolder:PATH or "
                "cifar10:PATH"
            )
        needs_path = kind in ("imagefolder", "cifar10")
        if needs_path and not (sep and path):
            raise GatorError(f"--data {kind} needs a folder: write --data {kind}:PATH")
        if not needs_path and sep:
            raise GatorError(f"--data {kind} takes no path; write --data {kind}")
        return cls(kind, Path(path) if needs_path else None)

    def __str__(self) -> str:
        return self.kind if self.path is None else f"{self.kind}:{self.path}"


@dataclass(frozen=True)
class Datasets:
    """Train and validation sets, their class count and where they came from."""

    train: Dataset
    val: Dataset
    num_classes: int
    spec: DataSpec

    def __str__(self) -> str:
        return (
            f"{self.spec}: {len(self.train)} train / {len(self.val)} val images, "
            f"{self.num_classes} classes"
        )


class TensorImages(Dataset):
    """In-memory images ``(N, 3, S, S)`` with labels; optional random shift augmentation.

    ``shift`` pads by that many pixels (zeros after normalisation: the background) and crops
    back at a random offset, the standard CIFAR augmentation; ``flip`` adds horizontal flips.
    """

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, *, shift: int = 0, flip: bool = False
    ) -> None:
        self.images, self.labels = images, labels
        self.shift, self.flip = shift, flip

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self.images[i]
        if self.shift:
            s = self.shift
            dx, dy = (int(v) for v in torch.randint(0, 2 * s + 1, (2,)))
            x = F.pad(x, (s, s, s, s))[:, dy : dy + x.shape[1], dx : dx + x.shape[2]]
        if self.flip and bool(torch.rand(()) < 0.5):
            x = x.flip(-1)
        return x, int(self.labels[i])


def _digits(size: int, seed: int) -> Datasets:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    y = torch.tensor(d.target, dtype=torch.long)
    tr, va = train_test_split(range(len(y)), test_size=0.2, random_state=seed, stratify=d.target)
    mean, std = x[tr].mean(), x[tr].std()
    x = ((x - mean) / std).expand(-1, 3, -1, -1).contiguous()
    shift = max(1, size // 16)  # 2 pixels at 32x32
    spec = DataSpec("digits")
    return Datasets(TensorImages(x[tr], y[tr], shift=shift), TensorImages(x[va], y[va]), 10, spec)


def _digitmax(size: int, seed: int) -> Datasets:
    from gator_hw.train.digitmax import DIGITMAX_CLASSES, make_digitmax

    train, val = make_digitmax(size, seed)
    mean, std = train.images.mean(), train.images.std()

    def norm(x: torch.Tensor) -> torch.Tensor:  # one stored channel, shown as three
        return ((x - mean) / std).expand(-1, 3, -1, -1)

    shift = max(1, size // 16)
    return Datasets(TensorImages(norm(train.images), train.labels, shift=shift),
                    TensorImages(norm(val.images), val.labels), DIGITMAX_CLASSES,
                    DataSpec("digitmax"))


def _fake(size: int, seed: int, n_train: int = 256, n_val: int = 64, classes: int = 10) -> Datasets:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + n_val, 3, size, size, generator=g)
    y = torch.randint(0, classes, (n_train + n_val,), generator=g)
    return Datasets(
        TensorImages(x[:n_train], y[:n_train], shift=max(1, size // 16), flip=True),
        TensorImages(x[n_train:], y[n_train:]),
        classes,
        DataSpec("fake"),
    )


def _imagefolder(root: Path, size: int) -> Datasets:
    from torchvision import datasets, transforms

    for sub in ("train", "val"):
        if not (root / sub).is_dir():
            raise GatorError(
                f"--data imagefolder:{root} needs {root / sub}/ with one folder per class; "
                "create train/ and val/ subfolders"
            )
    norm = transforms.Normalize(_IMAGENET_MEAN, _IMAGENET_STD)
    train_tf = transforms.Compose(
        [
            transforms.RandomResizedCrop(size),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            norm,
        ]
    )
    val_tf = transforms.Compose(
        [
            transforms.Resize(round(size / 0.875)),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            norm,
        ]
    )
    try:
        train = datasets.ImageFolder(str(root / "train"), train_tf)
        val = datasets.ImageFolder(str(root / "val"), val_tf)
    except (FileNotFoundError, OSError) as exc:
        raise GatorError(f"--data imagefolder:{root}: {str(exc).splitlines()[0]}") from None
    for name, ds in (("train", train), ("val", val)):
        try:
            ds[0]  # one image now, not a traceback an epoch into training
        except (OSError, ValueError) as exc:  # PIL's UnidentifiedImageError is an OSError
            raise GatorError(
                f"--data imagefolder:{root}: cannot read {ds.samples[0][0]} in {name}/ "
                f"({type(exc).__name__}); remove or replace unreadable image files"
            ) from None
    if train.classes != val.classes:
        raise GatorError(
            f"--data imagefolder:{root}: train/ has {len(train.classes)} classes and val/ has "
            f"{len(val.classes)} (or different names); give both the same class folders"
        )
    return Datasets(train, val, len(train.classes), DataSpec("imagefolder", root))


def _cifar10(root: Path, size: int) -> Datasets:
    from torchvision import datasets, transforms

    resize = [transforms.Resize(size)] if size != 32 else []
    norm = [transforms.ToTensor(), transforms.Normalize(_CIFAR_MEAN, _CIFAR_STD)]
    train_tf = transforms.Compose(
        [
            *resize,
            transforms.RandomCrop(size, padding=size // 8),
            transforms.RandomHorizontalFlip(),
            *norm,
        ]
    )
    val_tf = transforms.Compose([*resize, *norm])
    try:
        train = datasets.CIFAR10(str(root), train=True, transform=train_tf, download=False)
        val = datasets.CIFAR10(str(root), train=False, transform=val_tf, download=False)
    except (RuntimeError, OSError, ValueError, pickle.UnpicklingError, EOFError) as exc:
        raise GatorError(
            f"--data cifar10:{root}: no readable CIFAR-10 there ({str(exc).splitlines()[0]}); "
            "point it at the folder holding cifar-10-batches-py/"
        ) from None
    return Datasets(train, val, 10, DataSpec("cifar10", root))


def load_data(spec: str | DataSpec, input_size: int, *, seed: int = 0) -> Datasets:
    """Load the train and validation sets named by ``spec`` at ``input_size`` pixels.

    Raises
    ------
    GatorError
        For an unknown kind, a missing folder, or files that cannot be read.
    """
    ds = spec if isinstance(spec, DataSpec) else DataSpec.parse(spec)
    if ds.kind == "digits":
        return _digits(input_size, seed)
    if ds.kind == "digitmax":
        return _digitmax(input_size, seed)
    if ds.kind == "fake":
        return _fake(input_size, seed)
    if not ds.path.is_dir():
        raise GatorError(f"--data {ds}: folder {ds.path} does not exist; check the path")
    if ds.kind == "imagefolder":
        return _imagefolder(ds.path, input_size)
    return _cifar10(ds.path, input_size)
