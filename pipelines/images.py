"""Images in Spark: decode, resize, validate, channel statistics, pixel vectors for MLlib.

Every image source (files, IDX records, Parquet arrays) arrives as the raw columns
`content` (file bytes, or raw uint8 pixels when `shape` is set), `pixels` (a
numeric array) and `shape` ([H, W] or [H, W, C]). `prepare_images` turns them
into one column `image`: uint8 bytes in (C, H, W) order at the configured size,
or a quarantine reason. Pixels stay uint8 in storage (a quarter of float32);
standardization happens where the tensors are made, with the training split's
per-channel mean/std that ingest stores in the dataset's manifest.
"""

from __future__ import annotations

import gzip
import io
import logging
import math
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from pyspark import keyword_only
from pyspark.ml import PipelineModel, Transformer
from pyspark.ml.functions import array_to_vector
from pyspark.ml.param import Param, Params, TypeConverters
from pyspark.ml.param.shared import HasInputCol, HasOutputCol
from pyspark.ml.util import DefaultParamsReadable, DefaultParamsWritable
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from sparkloom.pipelines.config import ImageConfig
from sparkloom.pipelines.context import StageContext, stage

log = logging.getLogger(__name__)

PREPARED = T.StructType([T.StructField("image", T.BinaryType()), T.StructField("reason", T.StringType())])  # fmt: skip


class BadImage(Exception):
    """One image that cannot be used; `reason` is its quarantine reason."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# --- one image -> (C, H, W) uint8 bytes --------------------------------------------------------


def _fit(img, ic: ImageConfig):
    """A PIL image at the configured size and channels."""
    from PIL import Image, ImageOps

    img = _eight_bit(img).convert("L" if ic.channels == 1 else "RGB")  # palette, alpha, CMYK
    size = (ic.width, ic.height)
    if img.size == size:
        return img
    method = Image.Resampling.BILINEAR  # Pillow antialiases when it shrinks
    if ic.resize == "stretch":
        return img.resize(size, method)
    if ic.resize == "pad":
        return ImageOps.pad(img, size, method=method, color=0)
    return ImageOps.fit(img, size, method=method)


def _eight_bit(img):
    """Grayscale of more than 8 bits (16-bit PNG/TIFF/PGM: modes I;16, I;16B, ...; 32-bit
    integer: I; float: F) scaled to an 8-bit L image; Pillow's convert("L") clips them
    instead, so a 0..65535 gradient turns white after its first step. Other modes pass."""
    from PIL import Image

    if not (img.mode == "F" or img.mode == "I" or img.mode.startswith("I;16")):
        return img
    a = np.asarray(img)
    if a.size == 0:
        return img.convert("L")
    if img.mode == "F":
        a = a.astype(np.float64)
        if not np.isfinite(a).all():
            raise BadImage("pixel_out_of_range")
        if a.min() >= 0 and a.max() <= 1:  # the usual float image: 0 black, 1 white
            return Image.fromarray(np.rint(a * 255).astype(np.uint8))
        return Image.fromarray(_stretched(a))
    a = a.astype(np.int64)
    if a.min() >= 0 and a.max() <= 65535:
        # 16-bit data, also when Pillow opens it as I (older Pillow, some TIFF/PGM): the high
        # byte, as Pillow itself reduces 16-bit RGB(A) and gray+alpha PNGs, so one file saved
        # as grey or as colour gives the same pixels, and 8-bit values widened either way
        # (x * 257 or x << 8) come back exact. Not the image's own range: a dark 16-bit
        # image stays dark, as it would in 8 bits.
        return Image.fromarray((a >> 8).astype(np.uint8))
    return Image.fromarray(_stretched(a))  # beyond 16 bits there is no white to scale to


def _stretched(a: np.ndarray) -> np.ndarray:
    """Values mapped linearly from their own min..max to 0..255 (a constant image is black)."""
    lo, hi = float(a.min()), float(a.max())
    if hi == lo:
        return np.zeros(a.shape, np.uint8)
    return np.rint((a - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _chw(img) -> bytes:
    a = np.asarray(img, dtype=np.uint8)  # (H, W) or (H, W, C)
    if a.ndim == 2:
        a = a[:, :, None]
    return np.ascontiguousarray(a.transpose(2, 0, 1)).tobytes()  # (C, H, W)


def decode_file(data: bytes, ic: ImageConfig) -> bytes:
    """Encoded image file (PNG, JPEG, GIF, BMP, TIFF, WebP...) -> (C, H, W) uint8 bytes."""
    from PIL import Image, UnidentifiedImageError

    if len(data) == 0:
        raise BadImage("empty_file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.load()  # decoding happens here; a cut-off file fails now, not later
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadImage("too_large") from None
    except UnidentifiedImageError:
        raise BadImage("undecodable") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise BadImage("truncated" if "truncated" in str(e).lower() else "undecodable") from None
    return _chw(_fit(img, ic))


def from_array(values: np.ndarray, shape, ic: ImageConfig, max_value: float) -> bytes:
    """Pixel values in row-major [H, W] or [H, W, C] order -> (C, H, W) uint8 bytes."""
    from PIL import Image

    shape = [int(d) for d in shape]
    if len(shape) == 2:
        shape = [*shape, 1]
    if len(shape) != 3 or min(shape) < 1 or shape[2] not in (1, 2, 3, 4):
        raise BadImage("wrong_shape")
    if len(values) != shape[0] * shape[1] * shape[2]:
        raise BadImage("wrong_shape")
    if values.dtype != np.uint8:
        v = np.asarray(values, dtype=np.float64)
        if not np.isfinite(v).all() or v.min(initial=0) < 0 or v.max(initial=0) > max_value:
            raise BadImage("pixel_out_of_range")
        values = np.rint(v * (255.0 / max_value)).astype(np.uint8)
    a = values.reshape(shape)  # (H, W, C)
    if shape == [ic.height, ic.width, ic.channels]:
        return np.ascontiguousarray(a.transpose(2, 0, 1)).tobytes()  # (C, H, W), no resampling
    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[shape[2]]
    img = Image.fromarray(a[:, :, 0] if shape[2] == 1 else a, mode=mode)
    return _chw(_fit(img, ic))


def prepare_one(content, pixels, shape, ic: ImageConfig) -> tuple[bytes | None, str | None]:
    try:
        if pixels is not None:
            dims = shape if shape is not None else (ic.height, ic.width, ic.channels)
            return from_array(np.asarray(pixels), dims, ic, ic.max_value), None
        if content is None:
            raise BadImage("null_image")
        if shape is not None:  # raw uint8 pixels (IDX records, binary Parquet columns)
            return from_array(np.frombuffer(content, dtype=np.uint8), shape, ic, 255.0), None
        return decode_file(bytes(content), ic), None
    except BadImage as e:
        return None, e.reason


def prepare_images(df: DataFrame, ic: ImageConfig) -> DataFrame:
    """Adds `image` ((C, H, W) uint8 bytes at the configured size) and `image_reason`."""

    @F.pandas_udf(PREPARED)
    def prepare(content: pd.Series, pixels: pd.Series, shape: pd.Series) -> pd.DataFrame:
        out = [
            prepare_one(None if _isnull(c) else c, None if _isnull(p) else p,
                        None if _isnull(s) else s, ic)
            for c, p, s in zip(content, pixels, shape, strict=True)
        ]  # fmt: skip
        return pd.DataFrame(out, columns=["image", "reason"])

    prepared = prepare(F.col("content"), F.col("pixels"), F.col("shape"))
    return df.withColumn("_prepared", prepared).select(
        *[c for c in df.columns if c not in ("content", "pixels", "shape")],
        F.col("_prepared.image").alias("image"),
        F.col("_prepared.reason").alias("image_reason"),
    )


def _isnull(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


# --- IDX (MNIST's format) --------------------------------------------------------------------

IDX_TYPES = {0x08: np.uint8}  # the only type image/label IDX files use in practice
IDX_RECORDS = T.StructType(
    [
        T.StructField("file", T.StringType()),
        T.StructField("index", T.LongType()),
        T.StructField("content", T.BinaryType()),
        T.StructField("label", T.StringType()),
        T.StructField("shape", T.ArrayType(T.IntegerType())),  # an image record's [H, W(, C)]
        T.StructField("reason", T.StringType()),
    ]
)


def _open(data: bytes) -> io.BufferedIOBase:
    buf = io.BytesIO(data)
    return gzip.GzipFile(fileobj=buf) if data[:2] == b"\x1f\x8b" else buf


def idx_header(data: bytes) -> dict:
    """Magic and dimensions of an IDX file (gzip or not); `error` says what is wrong."""
    try:
        head = _open(data).read(4)
        if len(head) < 4 or head[:2] != b"\x00\x00":
            return {"error": "not an IDX file (bad magic number)"}
        dtype, ndim = head[2], head[3]
        if dtype not in IDX_TYPES:
            return {"error": f"IDX element type 0x{dtype:02x} is not unsigned bytes (0x08)"}
        dims = np.frombuffer(_open(data).read(4 + 4 * ndim)[4:], dtype=">u4")
        if len(dims) != ndim:
            return {"error": "IDX header is cut off"}
        return {"dims": [int(d) for d in dims], "offset": 4 + 4 * ndim}
    except (OSError, EOFError) as e:
        return {"error": f"cannot read: {e}"}


def idx_records(files: Iterator[pd.DataFrame], chunk: int = 8192) -> Iterator[pd.DataFrame]:
    """mapInPandas over binaryFile rows of IDX files: one row per record.

    Labels files (1-d) give `label`; image files (N, H, W[, C]) give raw pixel
    bytes in `content`. Records the header promises but a cut-off file lacks come
    out with reason `truncated`, so they are counted, not lost.
    """
    for pdf in files:
        for path, data in zip(pdf["path"], pdf["content"], strict=True):
            raw = _open(bytes(data)).read()  # decompressed once; the header is its start
            h = idx_header(raw)
            dims, offset = h["dims"], h["offset"]
            n, size = dims[0], int(np.prod(dims[1:], dtype=np.int64)) if len(dims) > 1 else 1
            body = raw[offset:]
            have = min(n, len(body) // size)
            for start in range(0, n, chunk):
                idx = np.arange(start, min(n, start + chunk))
                rec = [body[i * size : (i + 1) * size] if i < have else None for i in idx.tolist()]
                yield pd.DataFrame({
                    "file": path, "index": idx,
                    "content": rec if len(dims) > 1 else None,
                    "label": [None if r is None else str(r[0]) for r in rec] if len(dims) == 1 else None,
                    "shape": [dims[1:]] * len(idx) if len(dims) > 1 else None,
                    "reason": ["truncated" if i >= have else None for i in idx.tolist()],
                })  # fmt: skip


# --- statistics and pixel vectors ----------------------------------------------------------------


def channel_stats(df: DataFrame, channels: int, height: int, width: int) -> dict[str, list[float]]:
    """Per-channel mean and std of x/255 over every pixel of `df`'s images, in Spark."""

    @F.pandas_udf(T.ArrayType(T.DoubleType()))
    def sums(images: pd.Series) -> pd.Series:
        x = np.frombuffer(b"".join(images), dtype=np.uint8).reshape(-1, channels, height * width)
        x = x.astype(np.float64) / 255.0
        per_row = np.concatenate([x.sum(axis=2), (x * x).sum(axis=2)], axis=1)  # (B, 2C)
        return pd.Series(list(per_row))

    s = df.select(sums("image").alias("s"))
    row = s.agg(
        *[F.sum(F.col("s")[i]).alias(f"s{i}") for i in range(2 * channels)], F.count("*")
    ).first()
    n = row[-1] * height * width
    if not n:
        raise ValueError("no images to compute channel statistics from")
    mean = [row[c] / n for c in range(channels)]
    var = [max(row[channels + c] / n - mean[c] ** 2, 0.0) for c in range(channels)]
    # a constant channel would divide by zero; leave it unscaled
    std = [math.sqrt(v) if v > 1e-12 else 1.0 for v in var]
    return {"mean": mean, "std": std}


def standardized(image: Column, mean: list[float], std: list[float]) -> Column:
    """(C, H, W) uint8 bytes -> array<double> of (x/255 - mean[c]) / std[c]."""
    m = np.asarray(mean, dtype=np.float64)[:, None]
    s = np.asarray(std, dtype=np.float64)[:, None]
    channels = len(mean)

    @F.pandas_udf(T.ArrayType(T.DoubleType()))
    def scale(images: pd.Series) -> pd.Series:
        x = np.frombuffer(b"".join(images), dtype=np.uint8).reshape(len(images), channels, -1)
        z = (x / 255.0 - m) / s  # (B, C, H*W)
        return pd.Series(list(z.reshape(len(images), -1)))

    return scale(image)


class PixelVectorizer(
    Transformer, HasInputCol, HasOutputCol, DefaultParamsReadable, DefaultParamsWritable
):
    """Spark ML stage: image bytes -> standardized pixel vector, for MLlib classifiers.

    Saved inside the baseline's PipelineModel, so scoring standardizes exactly as
    training did.
    """

    mean = Param(Params._dummy(), "mean", "per-channel mean of x/255", TypeConverters.toListFloat)
    std = Param(Params._dummy(), "std", "per-channel std of x/255", TypeConverters.toListFloat)

    @keyword_only
    def __init__(self, *, inputCol="image", outputCol="features", mean=None, std=None):
        super().__init__()
        self._setDefault(inputCol="image", outputCol="features")
        self._set(**self._input_kwargs)

    def _transform(self, df: DataFrame) -> DataFrame:
        mean, std = self.getOrDefault(self.mean), self.getOrDefault(self.std)
        pixels = standardized(F.col(self.getInputCol()), mean, std)
        return df.withColumn(self.getOutputCol(), array_to_vector(pixels))


# --- the features stage for images: pixel vectors for the MLlib baseline ----------------------


@dataclass
class ImageFeaturesResult:
    rows: int
    num_features: int
    skipped: bool = False

    def metrics(self) -> dict[str, float]:
        return {"rows": self.rows, "num_features": self.num_features}

    def summary(self) -> str:
        return f"{self.rows} images as standardized pixel vectors of {self.num_features} features"


@stage("features", ImageFeaturesResult)
def run_image_features(ctx: StageContext) -> ImageFeaturesResult:
    """`features` = standardized pixels as an ML vector, and the PipelineModel that makes it.
    Called as run_image_features(spark, cfg, catalog, force=False).

    The deep image models read `ingested` directly (uint8 is a quarter of the size and
    augmentation wants raw pixels); this stage exists for the MLlib baseline.
    """
    spark, catalog, upstream = ctx.spark, ctx.catalog, ctx.upstream
    stats = upstream["image"]
    model = PipelineModel(stages=[PixelVectorizer(mean=stats["mean"], std=stats["std"])])
    data = catalog.read("ingested", "ingest")
    out = model.transform(data).select("id", "label", "label_index", "split", "features")
    common = ctx.common(labels=upstream["labels"], image=stats)
    size = int(np.prod(stats["shape"]))

    def manifest(tmp: str) -> dict:
        rows = spark.read.parquet(tmp).count()
        return {**common, "result": asdict(ImageFeaturesResult(rows, size))}

    with catalog.commit() as tx:  # the features and the model that made them: both or neither
        tx.write("feature_model", model.save, common)
        m = tx.write_parquet("features", out, manifest, partition_by=["split"])
    return ImageFeaturesResult(**m["result"])


def decode_grid(images: list[bytes], channels: int, height: int, width: int) -> np.ndarray:
    """Stored image bytes -> (N, H, W, C) uint8, for plotting."""
    x = np.frombuffer(b"".join(images), dtype=np.uint8).reshape(-1, channels, height, width)
    return x.transpose(0, 2, 3, 1)
