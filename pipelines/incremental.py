"""Incremental ingest: which input files are new, changed or gone since the last batch.

The `ingested` manifest of an incremental pipeline keeps one record per file it has taken
in (path, bytes, mtime, SHA-256 of the content, the batch holding its rows). A run compares
the input listing with those records: a file with the same size and mtime is taken as
unchanged without reading it (as rsync does); one whose size or mtime moved is hashed, and
is `touched` (same content: only its record changes) or `changed` (re-read; its rows replace
the old ones). New and changed files are read as the next batch; files no longer listed are
reported, and their rows dropped only with `ingest.on_deleted: drop`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from sparkloom.pipelines.catalog import Catalog, open_input
from sparkloom.pipelines.config import IngestConfig
from sparkloom.pipelines.sources import Listing, _norm_str, per_file

log = logging.getLogger(__name__)


def content_hashes(spark: SparkSession, paths: list[str]) -> dict[str, str]:
    """path -> SHA-256 of the file's bytes, read on the executors."""
    if not paths:
        return {}

    def digest(batches):
        for b in batches:
            out = []
            for p in b["path"]:
                h = hashlib.sha256()
                with open_input(p) as f:
                    for chunk in iter(lambda f=f: f.read(1 << 20), b""):
                        h.update(chunk)
                out.append(h.hexdigest())
            yield pd.DataFrame({"path": b["path"], "sha256": out})

    rows = per_file(spark, paths, digest, "path string, sha256 string")
    return {r["path"]: r["sha256"] for r in rows}


@dataclass
class FilePlan:
    """What this run does with each input file, and the file records after it."""

    new: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    touched: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)  # gone since the last run
    missing: list[str] = field(default_factory=list)  # gone earlier, rows kept
    unchanged: int = 0
    read: dict[str | None, Listing] = field(default_factory=dict)  # new + changed, by split
    records: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def files_read(self) -> int:
        return len(self.new) + len(self.changed)

    def removed_sources(self, on_deleted: str) -> list[str]:
        """Files whose rows in earlier batches go: changed ones, and deleted ones when dropped."""
        return self.changed + (self.deleted + self.missing if on_deleted == "drop" else [])

    def counts(self) -> dict[str, int]:
        return {"files_new": len(self.new), "files_changed": len(self.changed),
                "files_touched": len(self.touched), "files_deleted": len(self.deleted),
                "files_missing": len(self.missing), "files_unchanged": self.unchanged}  # fmt: skip


def plan_files(spark: SparkSession, listings: dict[str | None, Listing],
               previous: dict[str, dict], batch: int, on_deleted: str) -> FilePlan:  # fmt: skip
    """Compare the listings with the previous file records (path -> record)."""
    plan = FilePlan()
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    listed: dict[str, tuple[str | None, str, int, int]] = {}
    for split, listing in listings.items():
        for rel, size, mtime in listing.files:
            listed[_norm_str(listing.full(rel))] = (split, rel, size, mtime)
        for rel in listing.bad_names:  # unreadable by name: read once, to quarantine
            listed[_norm_str(listing.full(rel))] = (split, rel, -1, -1)
    moved = [p for p, (_, _, size, mtime) in listed.items()
             if p in previous and size >= 0
             and (previous[p]["size"], previous[p]["mtime"]) != (size, mtime)]  # fmt: skip
    hashes = content_hashes(spark, [p for p in listed if p not in previous and
                                    listed[p][2] >= 0] + moved)  # fmt: skip
    take: dict[str | None, list[str]] = {}
    for path, (split, rel, size, mtime) in sorted(listed.items()):
        old = previous.get(path)
        rec = {"size": size, "mtime": mtime, "sha256": hashes.get(path), "split": split,
               "batch": batch, "seen": now}  # fmt: skip
        if old is None or old.get("deleted"):
            if old is not None and old.get("sha256") == rec["sha256"] and rec["sha256"]:
                plan.touched.append(path)  # back, as it was: its rows were kept
                plan.records[path] = {**old, **rec, "batch": old["batch"], "deleted": None}
                continue
            (plan.changed if old is not None else plan.new).append(path)
        elif path in moved and old.get("sha256") != rec["sha256"]:
            plan.changed.append(path)
        elif path in moved:
            plan.touched.append(path)
            plan.records[path] = {**old, "size": size, "mtime": mtime, "seen": now}
            continue
        else:
            plan.unchanged += 1
            plan.records[path] = old
            continue
        plan.records[path] = rec
        take.setdefault(split, []).append(rel)
    for path, old in sorted(previous.items()):
        if path in listed:
            continue
        (plan.missing if old.get("deleted") else plan.deleted).append(path)
        if on_deleted == "keep":
            plan.records[path] = {**old, "deleted": old.get("deleted") or now}
    for split, rels in take.items():
        listing, wanted = listings[split], set(rels)
        plan.read[split] = Listing(
            listing.root, [f for f in listing.files if f[0] in wanted],
            [b for b in listing.bad_names if b in wanted], listing.is_file,
        )  # fmt: skip
    return plan


@dataclass
class Batch:
    """An incremental ingest run: the batch it appends and what it keeps of the earlier ones."""

    number: int
    plan: FilePlan
    previous: dict[str, Any] | None  # the ingested manifest of the last batch; None: the first
    kept: DataFrame | None = None  # earlier rows that stay: id, source, split, label, batch
    removed: dict[int, int] = field(default_factory=dict)  # batch -> rows of removed files

    @property
    def first(self) -> bool:
        return self.previous is None

    @property
    def labels(self) -> list[str]:
        """Earlier labels keep their indices; new ones are appended."""
        return list(self.previous["labels"]) if self.previous else []


def start_batch(spark: SparkSession, ing: IngestConfig, catalog: Catalog, config_hash: str,
                listings: dict[str | None, Listing], force: bool = False) -> Batch:  # fmt: skip
    """Plan the next batch against the last one. A first run, an ingest section changed
    since (the rows would not be comparable), a dataset made without `incremental`, or
    `--force` starts over at batch 1 with every file."""
    prev = catalog.manifest("ingested")
    inc = (prev or {}).get("incremental")
    if prev is not None and (force or inc is None or prev.get("config_hash") != config_hash):
        why = ("--force" if force else "it was not made incrementally" if inc is None
               else "the ingest section changed")  # fmt: skip
        log.warning("ingest: %s; reading every file again as batch 1", why)
        prev = None
    if prev is None:
        return Batch(1, plan_files(spark, listings, {}, 1, ing.on_deleted), None)
    number = max(b["batch"] for b in inc["batches"]) + 1
    plan = plan_files(spark, listings, inc["files"], number, ing.on_deleted)
    batch = Batch(number, plan, prev)
    gone = plan.removed_sources(ing.on_deleted)
    rows = catalog.read("ingested", "ingest").select("id", "source", "split", "label", "batch")
    if gone:
        removed = rows.filter(F.col("source").isin(gone)).groupBy("batch").count().collect()
        batch.removed = {r["batch"]: r["count"] for r in removed}
        rows = rows.filter(~F.col("source").isin(gone))
    batch.kept = rows
    return batch
