"""The Parquet -> torch reader: sharding, shuffling, batching and column types (no Spark)."""

from __future__ import annotations

import itertools

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from sparkloom.models.data import ParquetBatches, batch_sizes, make_dataloader, to_tensors


def write_parts(root, rows: int, files: int = 3, row_group_size: int = 7):
    """`rows` rows with ids 0..rows-1 over several files and uneven row groups."""
    root.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, rows, files + 1).astype(int)
    for f, (a, b) in enumerate(itertools.pairwise(bounds)):
        ids = np.arange(a, b)
        table = pa.table(
            {
                "id": ids,
                "label": ids % 3,
                "tokens": pa.array([list(range(i % 5 + 1)) for i in ids], pa.list_(pa.int32())),
            }
        )
        pq.write_table(table, root / f"part-{f:03d}.parquet", row_group_size=row_group_size)
    (root / "_SUCCESS").write_text("")
    return str(root)


def epoch_ids(path, world_size, batch_size, num_workers=0, epoch=0, seed=0, shuffle=True):
    """Ids per rank and batch counts per rank, reading each rank like DDP would."""
    per_rank, counts = [], []
    for rank in range(world_size):
        loader = make_dataloader(
            path, batch_size, num_workers=num_workers, rank=rank, world_size=world_size,
            shuffle=shuffle, seed=seed, shuffle_buffer=16, columns=["id"],
        )  # fmt: skip
        loader.dataset.set_epoch(epoch)
        batches = [b["id"] for b in loader]
        assert all(len(b) <= batch_size for b in batches)
        counts.append(len(batches))
        assert len(batches) == len(loader.dataset)
        per_rank.append(torch.cat(batches).tolist() if batches else [])
    return per_rank, counts


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("rows, batch_size", [(100, 8), (101, 10), (61, 4), (10, 3)])
def test_every_row_once_per_epoch_and_equal_batches(
    tmp_path, world_size, num_workers, rows, batch_size
):
    path = write_parts(tmp_path / "d", rows)
    per_rank, counts = epoch_ids(path, world_size, batch_size, num_workers)
    seen = sorted(itertools.chain.from_iterable(per_rank))
    assert seen == list(range(rows))  # exactly once across ranks x workers
    assert len(set(counts)) == 1  # DDP needs the same number of steps on every rank
    assert max(len(r) for r in per_rank) - min(len(r) for r in per_rank) <= 1


def test_shuffle_differs_between_epochs_and_repeats_for_a_seed(tmp_path):
    path = write_parts(tmp_path / "d", 200)
    e0, _ = epoch_ids(path, 2, 16, epoch=0, seed=5)
    e0_again, _ = epoch_ids(path, 2, 16, epoch=0, seed=5)
    e1, _ = epoch_ids(path, 2, 16, epoch=1, seed=5)
    other_seed, _ = epoch_ids(path, 2, 16, epoch=0, seed=6)
    assert e0 == e0_again
    assert e0 != e1 and e0 != other_seed
    assert sorted(sum(e1, [])) == list(range(200))
    ordered, _ = epoch_ids(path, 1, 16, shuffle=False)
    assert ordered[0] == list(range(200))


def test_batch_sizes_split_the_largest_when_short():
    assert batch_sizes(10, 4, 3) == [3, 3, 3, 1]
    short = batch_sizes(9, 4, 3)  # 9 rows must still give the 4 batches the other ranks give
    assert sum(short) == 9 and len(short) == 4 and min(short) >= 1 and max(short) <= 3
    with pytest.raises(ValueError, match="lower the batch size"):
        batch_sizes(2, 3, 1)


def test_column_types_round_trip():
    table = pa.table(
        {
            "i32": pa.array([1, 2, 3], pa.int32()),
            "f64": pa.array([0.5, 1.5, -2.0]),
            "flag": pa.array([True, False, True]),
            "fixed": pa.array([[1, 2], [3, 4], [5, 6]], pa.list_(pa.int64())),
            "ragged": pa.array([[1], [2, 3, 4], []], pa.list_(pa.int32())),
            "image": pa.array(
                [[[0.0, 1.0], [2.0, 3.0]], [[4.0, 5.0], [6.0, 7.0]], [[8.0, 9.0], [1.0, 2.0]]],
                pa.list_(pa.list_(pa.float32())),
            ),
            "flat_img": pa.array([list(range(4))] * 3, pa.list_(pa.float32(), 4)),
            "name": pa.array(["a", "b", "c"]),
        }
    )
    out = to_tensors(table, {"shapes": {"flat_img": [1, 2, 2]}}, pad_value=0)
    assert out["i32"].dtype == torch.int64 and out["i32"].tolist() == [1, 2, 3]
    assert out["f64"].dtype == torch.float32 and out["f64"].tolist() == [0.5, 1.5, -2.0]
    assert out["flag"].tolist() == [True, False, True]
    assert out["fixed"].tolist() == [[1, 2], [3, 4], [5, 6]] and "fixed_mask" not in out
    assert out["ragged"].tolist() == [[1, 0, 0], [2, 3, 4], [0, 0, 0]]
    assert out["ragged_mask"].tolist() == [[1, 0, 0], [1, 1, 1], [0, 0, 0]]
    assert out["image"].shape == (3, 2, 2) and out["image"][1].tolist() == [[4.0, 5.0], [6.0, 7.0]]
    assert out["flat_img"].shape == (3, 1, 2, 2)
    assert out["name"] == ["a", "b", "c"]
    # per-column padding: labels padded with -100 are ignored by cross_entropy
    per_col = to_tensors(table, pad_value={"ragged": -100})
    assert per_col["ragged"].tolist() == [[1, -100, -100], [2, 3, 4], [-100, -100, -100]]
    assert per_col["ragged_mask"].tolist() == out["ragged_mask"].tolist()
    # a slice (as the reader cuts batches) keeps its own rows
    part = to_tensors(table.slice(1, 2))
    assert part["ragged"].tolist() == [[2, 3, 4], [0, 0, 0]]
    assert part["image"][0].tolist() == [[4.0, 5.0], [6.0, 7.0]]


def test_spark_vector_layout_dense_and_sparse_rows():
    """Spark ML writes vectors as struct<type, size, indices, values>: 0 sparse, 1 dense."""
    vec = pa.array(
        [
            {"type": 1, "size": None, "indices": None, "values": [1.0, 0.0, 2.0, 0.0]},
            {"type": 0, "size": 4, "indices": [3], "values": [5.0]},
            {"type": 0, "size": 4, "indices": [], "values": []},
            {"type": 0, "size": 4, "indices": [0, 2], "values": [7.0, 8.0]},
        ],
        pa.struct([("type", pa.int8()), ("size", pa.int32()),
                   ("indices", pa.list_(pa.int32())), ("values", pa.list_(pa.float64()))]),
    )  # fmt: skip
    dense = [[1, 0, 2, 0], [0, 0, 0, 5], [0, 0, 0, 0], [7, 0, 8, 0]]
    table = pa.table({"v": vec})
    assert to_tensors(table)["v"].tolist() == dense
    sparse = to_tensors(table, {"vectors": {"v": "sparse"}})["v"]
    assert sparse.layout == torch.sparse_csr and sparse.to_dense().tolist() == dense
    assert to_tensors(table.slice(1, 3))["v"].tolist() == dense[1:]


def test_nulls_and_missing_columns_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="column 'x' has null values"):
        to_tensors(pa.table({"x": pa.array([1, None])}))
    path = write_parts(tmp_path / "d", 10)
    with pytest.raises(KeyError, match=r"columns \['nope'\] not in"):
        ParquetBatches(path, 4, columns=["nope"])
    with pytest.raises(FileNotFoundError, match="no Parquet data"):
        ParquetBatches(str(tmp_path / "missing"), 4)


def test_ragged_token_batches_through_the_loader(tmp_path):
    path = write_parts(tmp_path / "d", 20)
    loader = make_dataloader(path, 6, shuffle=False, columns=["id", "tokens"])
    first = next(iter(loader))
    assert first["tokens"].shape == (6, 5)
    assert first["tokens_mask"].sum(1).tolist() == [i % 5 + 1 for i in range(6)]
