"""Image ingest: each reader on tiny files the tests make, quarantine, statistics, vectors."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pyspark.ml import PipelineModel
from pyspark.sql import functions as F

from sparkloom.pipelines.catalog import Catalog
from sparkloom.pipelines.errors import DataError
from sparkloom.pipelines.images import PixelVectorizer, decode_file
from sparkloom.pipelines.ingest import run_ingest
from sparkloom.pipelines.sample_data import digits, write_idx, write_png_tree
from tests.conftest import make_config

PER_CLASS = 12


@pytest.fixture(scope="module")
def few_digits():
    """12 of each digit from scikit-learn's bundled set: (120, 8, 8) uint8 and labels."""
    images, labels = digits()
    keep = np.concatenate([np.flatnonzero(labels == d)[:PER_CLASS] for d in range(10)])
    return images[keep], labels[keep]


def image_config(tmp_path, fmt, path, **image):
    return make_config(
        tmp_path,
        ingest={"format": fmt, "path": str(path),
                "image": {"height": 8, "width": 8, "channels": 1, **image}},
    )  # fmt: skip


def ingested(spark, cfg):
    catalog = Catalog(spark, cfg.pipeline.data_root, cfg.pipeline.name)
    return catalog, catalog.read("ingested", "ingest")


def stored_pixels(df) -> dict[str, np.ndarray]:
    return {
        r["id"]: np.frombuffer(r["image"], np.uint8) for r in df.select("id", "image").collect()
    }


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_png_folders_with_corrupt_empty_and_truncated_files(spark, tmp_path, few_digits):
    images, labels = few_digits
    root = tmp_path / "pngs"
    write_png_tree(images, labels, root)
    noise = np.random.default_rng(0).integers(0, 255, (40, 40), dtype=np.uint8)
    corrupt = bytearray(png_bytes(noise))
    corrupt[100:140] = b"\xff" * 40  # garbage inside the compressed pixel data
    (root / "3" / "corrupt.png").write_bytes(bytes(corrupt))
    (root / "3" / "notes.txt").write_bytes(b"not an image at all")
    (root / "4" / "empty.png").write_bytes(b"")
    (root / "5" / "cut.png").write_bytes(png_bytes(np.full((40, 40), 7, np.uint8))[:60])
    (root / "unlabelled.png").write_bytes(png_bytes(images[0]))
    cfg = image_config(tmp_path, "image_dirs", root)
    catalog = Catalog(spark, cfg.pipeline.data_root, cfg.pipeline.name)

    result = run_ingest(spark, cfg, catalog)

    assert result.rows_in == 125 and result.rows_out == 120 and result.rows_quarantined == 5
    assert result.reasons == {"empty_file": 1, "null_label": 1, "truncated": 1, "undecodable": 2}
    assert result.labels == [str(d) for d in range(10)]
    _, df = ingested(spark, cfg)
    pixels = stored_pixels(df)
    # PNG is lossless and the size already matches: the stored bytes are the source pixels
    for i in (0, 57, 119):
        rel = f"{labels[i]}/{i:05d}.png"
        assert np.array_equal(pixels[rel], images[i].reshape(-1))
    q = catalog.read("quarantine", "ingest").collect()
    assert {r["id"]: r["reason"] for r in q}["4/empty.png"] == "empty_file"
    m = catalog.manifest("ingested")
    train = np.stack([pixels[r["id"]] for r in df.filter("split = 'train'").collect()]) / 255.0
    assert m["image"]["shape"] == [1, 8, 8]
    assert m["image"]["mean"][0] == pytest.approx(train.mean(), abs=1e-9)
    assert m["image"]["std"][0] == pytest.approx(train.std(), abs=1e-9)


@pytest.mark.parametrize("compress", [True, False])
def test_idx_pair(spark, tmp_path, few_digits, compress):
    images, labels = few_digits
    write_idx(images, labels, tmp_path / "idx", prefix="t10k", compress=compress)
    cfg = image_config(tmp_path, "idx", tmp_path / "idx")
    result = run_ingest(spark, cfg, Catalog(spark, cfg.pipeline.data_root, cfg.pipeline.name))
    assert (result.rows_in, result.rows_out, result.rows_quarantined) == (120, 120, 0)
    _, df = ingested(spark, cfg)
    rows = {r["id"]: r for r in df.collect()}
    name = "t10k-images-idx3-ubyte" + (".gz" if compress else "")
    for i in (0, 33, 119):
        row = rows[f"{name}#{i:07d}"]
        assert row["label"] == str(labels[i])
        assert np.array_equal(np.frombuffer(row["image"], np.uint8), images[i].reshape(-1))


def test_idx_truncated_file_quarantines_missing_records(spark, tmp_path, few_digits):
    images, labels = few_digits
    img_path, _ = write_idx(images, labels, tmp_path / "idx", compress=False)
    data = img_path.read_bytes()
    img_path.write_bytes(data[: len(data) - 64 * 5 - 10])  # 5 whole records and part of a 6th
    cfg = image_config(tmp_path, "idx", tmp_path / "idx")
    result = run_ingest(spark, cfg, Catalog(spark, cfg.pipeline.data_root, cfg.pipeline.name))
    assert (result.rows_in, result.rows_out, result.reasons) == (120, 114, {"truncated": 6})


def test_idx_errors_name_the_file(spark, tmp_path, few_digits):
    images, labels = few_digits
    _, lab = write_idx(images, labels, tmp_path / "a", compress=False)
    lab.unlink()
    cfg = image_config(tmp_path, "idx", tmp_path / "a")
    with pytest.raises(DataError, match="has no labels file; expected .*train-labels-idx1-ubyte"):
        run_ingest(spark, cfg, Catalog(spark, cfg.pipeline.data_root, cfg.pipeline.name))
    write_idx(images, labels, tmp_path / "b")
    (tmp_path / "b" / "notes-images-idx3-ubyte").write_bytes(b"hello world, not idx")
    cfg = image_config(tmp_path, "idx", tmp_path / "b")
    with pytest.raises(DataError, match="notes-images-idx3-ubyte: not an IDX file"):
        run_ingest(spark, cfg, Catalog(spark, cfg.pipeline.data_root, cfg.pipeline.name))


def test_parquet_arrays_with_shape_and_bad_rows(spark, tmp_path, few_digits):
    images, labels = few_digits
    rows = [
        {"key": f"d{i}", "digit": int(labels[i]), "pixels": (images[i] * 16.0 / 255).reshape(-1).tolist(),
         "dims": [8, 8]}
        for i in range(len(images))
    ]  # fmt: skip
    rows.append({"key": "short", "digit": 1, "pixels": [0.0] * 63, "dims": [8, 8]})
    rows.append({"key": "4d", "digit": 1, "pixels": [0.0] * 64, "dims": [2, 2, 4, 4]})
    rows.append({"key": "hot", "digit": 2, "pixels": [99.0] * 64, "dims": [8, 8]})
    rows.append({"key": "none", "digit": 2, "pixels": None, "dims": None})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "arrays.parquet")
    cfg = make_config(
        tmp_path,
        ingest={"format": "image_parquet", "path": str(tmp_path / "arrays.parquet"),
                "columns": {"id": "key", "label": "digit", "image": "pixels", "shape": "dims"},
                "image": {"height": 8, "width": 8, "channels": 1, "max_value": 16}},
    )  # fmt: skip
    result = run_ingest(spark, cfg, Catalog(spark, cfg.pipeline.data_root, cfg.pipeline.name))
    assert (result.rows_in, result.rows_out) == (124, 120)
    assert result.reasons == {"null_image": 1, "pixel_out_of_range": 1, "wrong_shape": 2}
    _, df = ingested(spark, cfg)
    got = stored_pixels(df)["d7"].astype(int)
    want = np.rint(np.rint(images[7] * 16.0 / 255) * 255 / 16).reshape(-1)
    assert np.abs(got - want).max() <= 1  # 0-16 -> 0-255, rounded once each way


def test_missing_parquet_column_says_which_and_how(spark, tmp_path):
    pq.write_table(pa.table({"image": [[0.0] * 4], "label": ["a"]}), tmp_path / "p.parquet")
    cfg = image_config(tmp_path, "image_parquet", tmp_path / "p.parquet")
    with pytest.raises(DataError, match=r"column 'shape' \(ingest.columns.shape\).*shape=null"):
        run_ingest(spark, cfg, Catalog(spark, cfg.pipeline.data_root, cfg.pipeline.name))


@pytest.mark.parametrize(
    ("resize", "expected"),
    [
        ("stretch", [[200] * 4] * 4),
        ("center_crop", [[200] * 4] * 4),  # the middle of a wide image: all the same grey
        ("pad", [[0] * 4, [200] * 4, [200] * 4, [0] * 4]),  # letterbox: black above and below
    ],
)
def test_resize_modes_and_channel_conversion(resize, expected):
    from sparkloom.pipelines.config import ImageConfig

    wide_rgb = np.full((8, 16, 3), 200, np.uint8)  # 16 wide, 8 high, grey
    ic = ImageConfig(height=4, width=4, channels=1, resize=resize)
    out = np.frombuffer(decode_file(png_bytes(wide_rgb), ic), np.uint8).reshape(4, 4)
    assert out.tolist() == expected
    rgb = ImageConfig(height=4, width=4, channels=3, resize="stretch")
    gray = np.full((4, 4), 90, np.uint8)
    out = np.frombuffer(decode_file(png_bytes(gray), rgb), np.uint8).reshape(3, 4, 4)
    assert (out == 90).all()  # grey -> RGB copies the channel


def test_pixel_vectorizer_standardizes_and_round_trips(spark, tmp_path):
    pixels = np.arange(2 * 2 * 3, dtype=np.uint8).reshape(3, 2, 2) * 20  # (C, H, W)
    df = spark.createDataFrame([(bytearray(pixels.tobytes()),)], "image binary")
    mean, std = [0.1, 0.2, 0.3], [0.5, 0.25, 1.0]
    model = PipelineModel(stages=[PixelVectorizer(mean=mean, std=std)])
    model.save(str(tmp_path / "pm"))
    for m in (model, PipelineModel.load(str(tmp_path / "pm"))):
        got = np.array(m.transform(df).select(F.col("features")).first()[0].toArray())
        want = (pixels / 255.0 - np.array(mean)[:, None, None]) / np.array(std)[:, None, None]
        assert np.allclose(got, want.reshape(-1))
