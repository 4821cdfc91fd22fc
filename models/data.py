"""Parquet -> torch batches, sharded across DDP ranks and DataLoader workers.

The reader side of the Spark -> torch converter. No pyspark here: the same code
reads a converter's cache on a Spark executor and plain Parquet files under
`torchrun` on a GPU box.

How an epoch is cut up, so every row is read exactly once and every rank gets
the same number of batches (DDP would hang otherwise):
1. The row groups of all files are listed from the Parquet footers; with shuffle
   on, their order is permuted with `(seed, epoch)`. That order numbers the rows
   0..N-1.
2. Rank r takes rows [N*r/W, N*(r+1)/W): contiguous, sizes differ by at most one.
3. Every rank cuts its rows into the same number K = ceil(max rank rows / B) of
   batches of at most B rows (only the tail batches of a short rank are smaller).
4. DataLoader worker w of a rank takes a contiguous run of those batches.
5. A worker reads the row groups overlapping its rows, slices the edges, and
   shuffles blocks of at least `shuffle_buffer` rows before cutting batches.
Batches are whole Arrow tables turned into tensors with numpy; no per-row Python.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from sparkloom.models.storage import resolve

META_FILE = "_sparkloom_meta.json"  # written by the converter: vector formats, shapes


@dataclass(frozen=True)
class RowGroup:
    path: str
    index: int
    num_rows: int


@dataclass(frozen=True)
class Slice:
    """Rows [start, stop) of one row group."""

    group: RowGroup
    start: int
    stop: int


def world() -> tuple[int, int]:
    """(rank, world size) from torch.distributed when initialised, else RANK/WORLD_SIZE."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


# --- listing ----------------------------------------------------------------------------------


def list_row_groups(path: str) -> tuple[pafs.FileSystem, list[RowGroup], pa.Schema, dict]:
    """Every row group under `path` (a file or a folder of .parquet files), in file order."""
    fs, root = resolve(path)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"no Parquet data at {path}")
    if info.type == pafs.FileType.File:
        files = [root]
    else:
        selector = pafs.FileSelector(root, recursive=True)
        files = sorted(
            f.path
            for f in fs.get_file_info(selector)
            if f.type == pafs.FileType.File
            and f.path.endswith(".parquet")
            and not any(p.startswith(("_", ".")) for p in f.path[len(root) :].split("/") if p)
        )
    groups: list[RowGroup] = []
    schema = None
    for f in files:
        with fs.open_input_file(f) as handle:
            md = pq.ParquetFile(handle).metadata
            schema = schema or md.schema.to_arrow_schema()
            groups += [RowGroup(f, i, md.row_group(i).num_rows) for i in range(md.num_row_groups)]
    if schema is None:
        raise FileNotFoundError(f"no .parquet files under {path}")
    meta = {}
    if info.type == pafs.FileType.Directory:
        meta_path = f"{root}/{META_FILE}"
        if fs.get_file_info(meta_path).type == pafs.FileType.File:
            with fs.open_input_stream(meta_path) as s:
                meta = json.loads(s.read().decode())
    return fs, groups, schema, meta


# --- the epoch plan ---------------------------------------------------------------------------


def batch_sizes(rows: int, num_batches: int, batch_size: int) -> list[int]:
    """`rows` cut into exactly `num_batches` batches of at most `batch_size`, none empty."""
    if rows < num_batches:
        raise ValueError(
            f"a rank has {rows} rows but every rank must give {num_batches} batches; "
            "lower the batch size or the number of processes"
        )
    sizes = [batch_size] * (rows // batch_size)
    if rows % batch_size:
        sizes.append(rows % batch_size)
    while len(sizes) < num_batches:  # a short rank: split its largest batches
        i = int(np.argmax(sizes))
        half = sizes[i] // 2
        sizes[i : i + 1] = [sizes[i] - half, half]
    return sizes


@dataclass
class EpochPlan:
    """Which rows one (rank, worker) reads in one epoch, and how it batches them."""

    slices: list[Slice]
    sizes: list[int]
    num_batches_per_rank: int
    rows: int = field(init=False)

    def __post_init__(self) -> None:
        self.rows = sum(s.stop - s.start for s in self.slices)


def plan_epoch(
    groups: list[RowGroup],
    *,
    rank: int,
    world_size: int,
    worker: int = 0,
    num_workers: int = 1,
    batch_size: int,
    shuffle: bool,
    seed: int,
    epoch: int,
) -> EpochPlan:
    order = list(groups)
    if shuffle:
        rng = np.random.default_rng([seed, epoch])
        order = [order[i] for i in rng.permutation(len(order))]
    total = sum(g.num_rows for g in order)
    if total < world_size:
        raise ValueError(f"{total} rows cannot be shared by {world_size} processes")
    bounds = [total * r // world_size for r in range(world_size + 1)]
    num_batches = math.ceil(
        max(b - a for a, b in zip(bounds, bounds[1:], strict=False)) / batch_size
    )
    lo, hi = bounds[rank], bounds[rank + 1]
    sizes = batch_sizes(hi - lo, num_batches, batch_size)
    # this worker's contiguous run of the rank's batches
    first, last = num_batches * worker // num_workers, num_batches * (worker + 1) // num_workers
    w_lo = lo + sum(sizes[:first])
    w_hi = w_lo + sum(sizes[first:last])
    slices, offset = [], 0
    for g in order:
        a, b = max(w_lo, offset), min(w_hi, offset + g.num_rows)
        if a < b:
            slices.append(Slice(g, a - offset, b - offset))
        offset += g.num_rows
    return EpochPlan(slices, sizes[first:last], num_batches)


# --- Arrow -> tensors -------------------------------------------------------------------------


def _is_vector(t: pa.DataType) -> bool:
    """Spark ML's VectorUDT as stored in Parquet: struct<type, size, indices, values>."""
    return pa.types.is_struct(t) and {t.field(i).name for i in range(t.num_fields)} == {
        "type", "size", "indices", "values",
    }  # fmt: skip


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _list_parts(arr: pa.Array) -> tuple[np.ndarray, pa.Array]:
    """(offsets from 0, flat child values) of a list array, honouring slices and nulls."""
    lengths = pc.list_value_length(arr).fill_null(0).to_numpy(zero_copy_only=False)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets, arr.flatten()


def _numeric(values: pa.Array, name: str) -> np.ndarray:
    if values.null_count:
        raise ValueError(f"column '{name}' has null values; fill or filter them before training")
    out = values.to_numpy(zero_copy_only=False)
    if np.issubdtype(out.dtype, np.floating):
        out = out.astype(np.float32, copy=False)
    elif np.issubdtype(out.dtype, np.integer):
        out = out.astype(np.int64, copy=False)  # embeddings and losses want int64
    # Arrow buffers are read-only; torch wants to own writable memory
    return out if out.flags.writeable else out.copy()


def _list_column(
    arr: pa.Array, name: str, shape: list[int] | None, pad_value: float
) -> dict[str, torch.Tensor]:
    if arr.null_count:
        raise ValueError(f"column '{name}' has null rows; fill or filter them before training")
    offsets, values = _list_parts(arr)
    inner: list[int] = []
    while _is_list(values.type):  # nested arrays (an image as rows of pixels) must be rectangular
        sub_offsets, values = _list_parts(values)
        lens = np.diff(sub_offsets)
        if len(lens) and (lens != lens[0]).any():
            raise ValueError(
                f"column '{name}' holds ragged nested arrays; only the outer level may vary"
            )
        inner.append(int(lens[0]) if len(lens) else 0)
    flat = _numeric(values, name).reshape(-1, *inner) if inner else _numeric(values, name)
    lengths = np.diff(offsets)
    n = len(lengths)
    if n and (lengths == lengths[0]).all():
        tensor = torch.from_numpy(np.ascontiguousarray(flat).reshape(n, int(lengths[0]), *inner))
        return {name: tensor.reshape(n, *shape) if shape else tensor}
    # variable length: pad to the longest row of the batch, plus an attention mask
    width = int(lengths.max()) if n else 0
    out = np.full((n, width, *inner), pad_value, dtype=flat.dtype)
    rows = np.repeat(np.arange(n), lengths)
    cols = np.arange(len(flat)) - np.repeat(offsets[:-1], lengths)
    out[rows, cols] = flat
    mask = np.zeros((n, width), dtype=np.int64)
    mask[rows, cols] = 1
    return {name: torch.from_numpy(out), f"{name}_mask": torch.from_numpy(mask)}


def _positions(offsets: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Flat value positions of the selected rows, in order (ranges without a Python loop)."""
    starts, stops = offsets[:-1][rows], offsets[1:][rows]
    lens = stops - starts
    before = np.concatenate([[0], np.cumsum(lens)[:-1]])
    return np.repeat(starts - before, lens) + np.arange(lens.sum())


def _vector_column(arr: pa.StructArray, name: str, fmt: str) -> torch.Tensor:
    """Spark ML vectors (dense and sparse rows may mix) -> dense (B, size) or sparse CSR."""
    if arr.null_count:
        raise ValueError(f"column '{name}' has null vectors; fill or filter them before training")
    fields = dict(zip([f.name for f in arr.type], arr.flatten(), strict=True))
    kind = fields["type"].to_numpy(zero_copy_only=False)  # 0 sparse, 1 dense
    v_off, values = _list_parts(fields["values"])
    vals = _numeric(values, name).astype(np.float32, copy=False)
    nnz = np.diff(v_off)
    size = fields["size"].fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    width = np.where(kind == 1, nnz, size)
    if len(width) and (width != width[0]).any():
        raise ValueError(f"column '{name}' mixes vectors of sizes {sorted(set(width.tolist()))}")
    cols = np.arange(len(vals)) - np.repeat(v_off[:-1], nnz)  # dense rows: 0..size-1
    sparse_rows = kind == 0
    if sparse_rows.any():
        _, idx = _list_parts(fields["indices"])  # null for dense rows, so only sparse rows' ids
        cols[_positions(v_off, sparse_rows)] = idx.to_numpy(zero_copy_only=False)
    n, d = len(arr), int(width[0]) if len(width) else 0
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        # Spark keeps sparse indices sorted and in range, so the checks would only cost time
        csr = torch.sparse_csr_tensor(
            torch.from_numpy(v_off), torch.from_numpy(cols.astype(np.int64)), torch.from_numpy(vals),
            size=(n, d), check_invariants=False,
        )  # fmt: skip
    return csr if fmt == "sparse" else csr.to_dense()


def _binary_column(arr: pa.Array, name: str, shape: list[int]) -> torch.Tensor:
    """Fixed-size raw uint8 records (e.g. images as (C, H, W) bytes) -> (B, *shape) uint8."""
    if arr.null_count:
        raise ValueError(f"column '{name}' has null rows; fill or filter them before training")
    arr = arr.cast(pa.large_binary()) if not pa.types.is_large_binary(arr.type) else arr
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[
        arr.offset : arr.offset + len(arr) + 1
    ]
    size = int(np.prod(shape))
    if len(arr) and (np.diff(offsets) != size).any():
        raise ValueError(f"column '{name}' has records that are not {size} bytes ({shape})")
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
    return torch.from_numpy(data.copy()).view(len(arr), *shape)


PadValue = int | float | dict[str, int | float]  # one for all columns, or per column (default 0)


def to_tensors(
    table: pa.Table, meta: dict | None = None, pad_value: PadValue = 0
) -> dict[str, Any]:
    """One Arrow table -> {column: tensor}; strings and binaries stay Python lists, except
    binaries with a shape in `meta` (raw uint8 records such as images), which become tensors.
    Variable-length lists are padded with `pad_value` (e.g. {"mlm_labels": -100}: padding
    that a loss must ignore)."""
    meta = meta or {}
    shapes = meta.get("shapes", {})
    vector_formats = meta.get("vectors", {})
    out: dict[str, Any] = {}
    for name in table.column_names:
        col = table.column(name).combine_chunks()
        t = col.type
        if _is_vector(t):
            out[name] = _vector_column(col, name, vector_formats.get(name, "dense"))
        elif _is_list(t):
            pad = pad_value.get(name, 0) if isinstance(pad_value, dict) else pad_value
            out.update(_list_column(col, name, shapes.get(name), pad))
        elif (pa.types.is_binary(t) or pa.types.is_large_binary(t)) and name in shapes:
            out[name] = _binary_column(col, name, shapes[name])
        elif pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t):
            out[name] = col.to_pylist()
        elif pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t):
            out[name] = torch.from_numpy(_numeric(col, name))
        else:
            raise TypeError(f"column '{name}' has type {t}, which the torch loader cannot batch")
    return out


# --- the dataset ------------------------------------------------------------------------------


class ParquetBatches(IterableDataset):
    """Batches (dicts of tensors) of one rank's shard of a Parquet dataset, for one epoch.

    Call `set_epoch(e)` before each epoch, as with DistributedSampler. Use it with
    `DataLoader(dataset, batch_size=None, num_workers=...)`: batching happens here.
    """

    def __init__(
        self,
        path: str,
        batch_size: int,
        *,
        columns: list[str] | None = None,
        shuffle: bool = True,
        seed: int = 0,
        shuffle_buffer: int = 16_384,
        rank: int | None = None,
        world_size: int | None = None,
        pad_value: PadValue = 0,
        transform: Callable[[dict[str, Any], torch.Generator], dict[str, Any]] | None = None,
    ):
        """`transform(batch, generator)` runs on every batch (augmentation, standardization);
        its generator is seeded from (seed, epoch, rank, batch number), so a batch gets the
        same random draws however many DataLoader workers there are."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.path, self.batch_size, self.columns = path, batch_size, columns
        self.shuffle, self.seed, self.shuffle_buffer, self.pad_value = (
            shuffle,
            seed,
            shuffle_buffer,
            pad_value,
        )
        r, w = world()
        self.rank = r if rank is None else rank
        self.world_size = w if world_size is None else world_size
        self.epoch = 0
        self.transform = transform
        _, self.groups, self.schema, self.meta = list_row_groups(path)
        if columns:
            missing = [c for c in columns if c not in self.schema.names]
            if missing:
                raise KeyError(f"columns {missing} not in {path}; it has {self.schema.names}")
        self.num_rows = sum(g.num_rows for g in self.groups)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def plan(self, worker: int = 0, num_workers: int = 1) -> EpochPlan:
        return plan_epoch(
            self.groups, rank=self.rank, world_size=self.world_size, worker=worker,
            num_workers=num_workers, batch_size=self.batch_size, shuffle=self.shuffle,
            seed=self.seed, epoch=self.epoch,
        )  # fmt: skip

    def __len__(self) -> int:
        """Batches per epoch on this rank (the same on every rank)."""
        return self.plan().num_batches_per_rank

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        plan = self.plan(worker, num_workers)
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker, num_workers])
        first = plan.num_batches_per_rank * worker // num_workers  # this worker's first batch
        for i, table in enumerate(self._shuffled_batches(plan, rng)):
            batch = to_tensors(table, self.meta, self.pad_value)
            if self.transform is not None:
                g = torch.Generator().manual_seed(
                    int(np.random.SeedSequence([self.seed, self.epoch, self.rank, first + i])
                        .generate_state(1, np.uint64)[0] >> 1)
                )  # fmt: skip
                batch = self.transform(batch, g)
            yield batch

    def _shuffled_batches(self, plan: EpochPlan, rng: np.random.Generator) -> Iterator[pa.Table]:
        fs, _ = resolve(self.path)
        files: dict[str, pq.ParquetFile] = {}
        sizes = iter(plan.sizes)
        want = next(sizes, None)
        pending: list[pa.Table] = []
        pending_rows = 0

        def drain(block: pa.Table, final: bool) -> pa.Table:
            nonlocal want
            if self.shuffle and len(block) > 1:
                block = block.take(pa.array(rng.permutation(len(block))))
            start = 0
            while want is not None and len(block) - start >= want:
                batches.append(block.slice(start, want))
                start += want
                want = next(sizes, None)
            if final and start != len(block):
                raise RuntimeError(
                    "epoch plan and data disagree; the dataset changed while reading"
                )
            return block.slice(start)

        for s in plan.slices:
            pf = files.get(s.group.path)
            if pf is None:
                pf = files[s.group.path] = pq.ParquetFile(fs.open_input_file(s.group.path))
            table = pf.read_row_group(s.group.index, columns=self.columns)
            pending.append(table.slice(s.start, s.stop - s.start))
            pending_rows += s.stop - s.start
            if pending_rows >= max(self.shuffle_buffer, want or 0):
                batches: list[pa.Table] = []
                rest = drain(pa.concat_tables(pending), final=False)
                yield from batches
                pending, pending_rows = [rest], len(rest)
        batches = []
        if pending_rows:
            drain(pa.concat_tables(pending), final=True)
        yield from batches


class ColumnTransform:
    """Applies `fn(tensor, generator)` to one column of a batch (picklable, for workers)."""

    def __init__(self, column: str, fn: Callable[[torch.Tensor, torch.Generator], torch.Tensor]):
        self.column, self.fn = column, fn

    def __call__(self, batch: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
        return {**batch, self.column: self.fn(batch[self.column], generator)}


def make_dataloader(
    path: str,
    batch_size: int,
    *,
    num_workers: int = 0,
    **kwargs: Any,
) -> DataLoader:
    """A DataLoader over `ParquetBatches`; its dataset is `loader.dataset` (for set_epoch)."""
    dataset = ParquetBatches(path, batch_size, **kwargs)
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=False,
        prefetch_factor=2 if num_workers else None,
    )
