"""Data for ``fastconv train``: synthetic tensors (throughput), scikit-learn's 8x8 digits (a
small real data set that works offline) and Fashion-MNIST read from the standard IDX files.

Images are kept as uint8 on the training device and turned into float batches there: scaled
to [0, 1] (as torchvision's ToTensor) and resized as d2l does (bilinear) to the model's input
size. Resizing per batch keeps Fashion-MNIST at 47 MB instead of 12 GB at 224x224.

Batches follow torch's DistributedSampler idea: every rank draws the same permutation of the
epoch (seeded by seed and epoch), global batch ``b`` is positions ``[b*B, (b+1)*B)`` of it,
and rank ``r`` of ``W`` takes the ``r``-th of ``W`` equal slices. The union over ranks is the
global batch a single process would draw, so data-parallel training equals one process.
"""
from __future__ import annotations

import dataclasses
import gzip
import os
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .. import models

DATA_SETS = ("synthetic", "digits", "fashion-mnist")

# IDX element types (the third byte of the magic number)
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_IDX_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09}

FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte",
}
FASHION_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                   "sneaker", "bag", "ankle boot")


class DataError(RuntimeError):
    """A data set cannot be found or read; the message says what was looked for."""


# --------------------------------------------------------------------------- IDX files
def read_idx(path: os.PathLike) -> np.ndarray:
    """An IDX file (gzipped when the name ends in .gz) as a numpy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read IDX file {path}: {exc}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise DataError(f"{path} is not an IDX file (magic number {raw[:4].hex()!r}; expected "
                        "00 00 <type> <ndim>)")
    dtype, ndim = np.dtype(_IDX_TYPES[raw[2]]), raw[3]
    head = 4 + 4 * ndim
    if len(raw) < head:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes, {ndim} dimensions)")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    count = int(np.prod(dims)) if dims else 1
    if len(raw) - head != count * dtype.itemsize:
        raise DataError(f"{path}: IDX header says shape {dims} ({count * dtype.itemsize} bytes "
                        f"of data) but the file holds {len(raw) - head}")
    return np.frombuffer(raw, dtype=dtype, count=count, offset=head).reshape(dims).copy()


def write_idx(path: os.PathLike, array: np.ndarray) -> Path:
    """Write ``array`` (uint8 or int8) as an IDX file, gzipped when the name ends in .gz."""
    path = Path(path)
    array = np.ascontiguousarray(array)
    if array.dtype not in _IDX_CODES:
        raise ValueError(f"write_idx: dtype {array.dtype} not supported (uint8 or int8)")
    header = bytes([0, 0, _IDX_CODES[array.dtype], array.ndim]) + \
        np.asarray(array.shape, dtype=">u4").tobytes()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())
    return path


def find_fashion_mnist(data_dir: os.PathLike) -> dict[str, Path]:
    """The four Fashion-MNIST IDX files under ``data_dir``, raw or gzipped, directly or in
    torchvision's ``FashionMNIST/raw`` layout."""
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"--data-dir {root}: no such directory (it should hold the Fashion-MNIST "
                        f"IDX files {', '.join(FASHION_FILES.values())}, raw or .gz)")
    places = [root, root / "raw", root / "FashionMNIST" / "raw", root / "fashion-mnist"]
    found, missing = {}, []
    for key, stem in FASHION_FILES.items():
        for place in places:
            hits = [place / name for name in (stem, stem + ".gz") if (place / name).is_file()]
            if hits:
                found[key] = hits[0]
                break
        else:
            missing.append(stem)
    if missing:
        looked = ", ".join(str(p) for p in places if p.is_dir())
        raise DataError(f"Fashion-MNIST: missing {', '.join(m + '[.gz]' for m in missing)} in "
                        f"{looked} (expected the standard IDX files, directly or in "
                        "torchvision's FashionMNIST/raw layout)")
    return found


# --------------------------------------------------------------------------- data sets
@dataclasses.dataclass
class ArrayData:
    """Images (N, C, h, w) stored compactly, and labels (N,)."""

    name: str
    images: torch.Tensor          # uint8 (or float) on the device batches are built on
    labels: torch.Tensor          # int64
    scale: float = 1.0 / 255      # multiplies the stored values into [0, 1]
    num_classes: int = 10

    def __post_init__(self):
        if self.images.dim() != 4 or self.labels.dim() != 1 or \
                self.images.shape[0] != self.labels.shape[0]:
            raise DataError(f"{self.name}: images {tuple(self.images.shape)} and labels "
                            f"{tuple(self.labels.shape)} do not match")

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device) -> "ArrayData":
        return dataclasses.replace(self, images=self.images.to(device),
                                   labels=self.labels.to(device))


def fashion_mnist(data_dir: os.PathLike) -> tuple[ArrayData, ArrayData]:
    files = find_fashion_mnist(data_dir)
    out = []
    for split in ("train", "test"):
        images, labels = read_idx(files[f"{split}_images"]), read_idx(files[f"{split}_labels"])
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise DataError(f"Fashion-MNIST {split}: images {images.shape} "
                            f"({files[split + '_images']}) and labels {labels.shape} "
                            f"({files[split + '_labels']}) do not match")
        if labels.size and int(labels.max()) >= 10:
            raise DataError(f"Fashion-MNIST {split}: label {int(labels.max())} out of range 0..9")
        out.append(ArrayData(f"fashion-mnist/{split}",
                             torch.from_numpy(images).unsqueeze(1),
                             torch.from_numpy(labels.astype(np.int64))))
    return out[0], out[1]


def digits(test_fraction: float = 0.2, seed: int = 0) -> tuple[ArrayData, ArrayData]:
    """scikit-learn's 1797 handwritten 8x8 digits (values 0..16), split train/test once with a
    fixed permutation."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("--data digits needs scikit-learn, which ships the data set: "
                        "pip install scikit-learn (or pip install 'fastconv[data]')") from None
    d = load_digits()
    images = torch.from_numpy(d.images.astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(d.target.astype(np.int64))
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(len(labels) * test_fraction))
    test, train = perm[:n_test], perm[n_test:]
    return (ArrayData("digits/train", images[train], labels[train], scale=1 / 16),
            ArrayData("digits/test", images[test], labels[test], scale=1 / 16))


def synthetic(shape: tuple, n_train: int, n_test: int, seed: int = 0,
              num_classes: int = 10) -> tuple[ArrayData, ArrayData]:
    """Random images already at the model's input ``shape`` (C, H, W) and random labels."""
    g = torch.Generator().manual_seed(seed)
    parts = []
    for n in (n_train, n_test):
        images = torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=g)
        labels = torch.randint(0, num_classes, (n,), generator=g)
        parts.append(ArrayData("synthetic", images, labels, num_classes=num_classes))
    return parts[0], parts[1]


def input_size(model: str, image_size: Optional[int] = None) -> tuple[int, int]:
    """The side length d2l resizes to for ``model`` (224 AlexNet/VGG/NiN, 96 GoogLeNet/ResNet,
    28 LeNet, 32 VGG-16-BN) unless ``image_size`` overrides it."""
    if image_size is not None:
        return (image_size, image_size)
    return tuple(models.INPUT_SIZES[model][1:])


def load(name: str, model: str, *, data_dir: Optional[str] = None, batch_size: int = 128,
         synthetic_size: Optional[int] = None, image_size: Optional[int] = None,
         seed: int = 0) -> tuple[ArrayData, ArrayData]:
    """The train and test sets of data set ``name`` for ``model``."""
    if name == "synthetic":
        c = models.INPUT_SIZES[model][0]
        n = synthetic_size if synthetic_size is not None else 10 * batch_size
        return synthetic((c, *input_size(model, image_size)), n, max(batch_size, n // 5), seed)
    if name == "digits":
        return digits()
    if name == "fashion-mnist":
        if not data_dir:
            raise DataError("--data fashion-mnist needs --data-dir DIR holding the IDX files "
                            f"({', '.join(FASHION_FILES.values())}, raw or .gz)")
        return fashion_mnist(data_dir)
    raise DataError(f"unknown data set {name!r}; choose one of {DATA_SETS}")


# --------------------------------------------------------------------------- batches
def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
    """The permutation of epoch ``epoch``: identical on every rank and on resume."""
    if not shuffle:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def num_batches(n: int, batch_size: int, world: int = 1) -> int:
    """Training batches per epoch: d2l keeps the last partial batch; data-parallel runs drop
    the examples that would not split evenly over the ranks."""
    if world == 1:
        return -(-n // batch_size)
    full, rest = divmod(n, batch_size)
    return full + (1 if rest // world else 0)


def shard(indices: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s slice of a global batch (equal slices; a remainder is dropped)."""
    local = len(indices) // world
    return indices[rank * local:(rank + 1) * local]


def make_batch(data: ArrayData, idx: torch.Tensor, size: tuple[int, int], device,
               channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    idx = idx.to(data.images.device)
    x = data.images.index_select(0, idx).to(device, non_blocking=True)
    y = data.labels.index_select(0, idx).to(device, non_blocking=True)
    x = x.float().mul_(data.scale)
    if tuple(x.shape[-2:]) != tuple(size):
        # d2l resizes with torchvision's bilinear Resize; upsampling needs no antialiasing
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


def train_batches(data: ArrayData, batch_size: int, size, device, *, seed: int, epoch: int,
                  start: int = 0, rank: int = 0, world: int = 1, shuffle: bool = True,
                  channels_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's batches of one epoch, from global batch ``start`` on (for resuming)."""
    if batch_size % world:
        raise DataError(f"global batch size {batch_size} does not split over {world} processes")
    order = epoch_order(len(data), seed, epoch, shuffle)
    for b in range(start, num_batches(len(data), batch_size, world)):
        idx = order[b * batch_size:(b + 1) * batch_size]
        yield make_batch(data, shard(idx, rank, world), size, device, channels_last)


def eval_batches(data: ArrayData, batch_size: int, size, device, *, rank: int = 0,
                 world: int = 1, channels_last: bool = False):
    """Every test example exactly once over all ranks (rank r takes examples r, r+W, ...)."""
    idx = torch.arange(rank, len(data), world)
    local = max(1, batch_size // world)
    for b in range(0, len(idx), local):
        yield make_batch(data, idx[b:b + local], size, device, channels_last)
