"""Named datasets under a data root: paths, atomic writes, manifests.

Every stage output lives at `<data_root>/<pipeline>/<dataset>` and is written to a
temporary sibling first, then committed by rename; a failed write leaves the
previous version readable. Each dataset carries `_manifest.json` (row counts,
schema, config hash, a fingerprint of its inputs) so a re-run with the same
inputs and config is recognised and skipped. The data root may be a local path
or any Hadoop filesystem URI; all file operations go through Hadoop's FileSystem
so the same code runs on a laptop and on HDFS/S3.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import uuid
from collections.abc import Callable
from typing import Any

from pyspark.sql import DataFrame, SparkSession

from pipelines.errors import DataError

log = logging.getLogger(__name__)

MANIFEST = "_manifest.json"


def local_path(url: str) -> str:
    """`file:/x` and `file:///x` -> `/x`, for libraries that want a plain path (pyarrow, torch)."""
    if url.startswith("file://"):
        return url.removeprefix("file://")
    return url.removeprefix("file:")


def absolute_uri(path: str) -> str:
    """Local relative paths become absolute; URIs (scheme://) pass through."""
    if "://" in path or path.startswith("file:"):
        return path
    return os.path.abspath(path)


class HadoopFS:
    """The handful of filesystem calls we need, on the JVM's Hadoop FileSystem."""

    def __init__(self, spark: SparkSession):
        self._jvm = spark.sparkContext._jvm
        self._conf = spark.sparkContext._jsc.hadoopConfiguration()

    def _path(self, path: str):
        return self._jvm.org.apache.hadoop.fs.Path(path)

    def _fs(self, path: str):
        return self._path(path).getFileSystem(self._conf)

    def qualify(self, path: str) -> str:
        p = self._path(path)
        return p.getFileSystem(self._conf).makeQualified(p).toString()

    def exists(self, path: str) -> bool:
        return self._fs(path).exists(self._path(path))

    def delete(self, path: str) -> None:
        self._fs(path).delete(self._path(path), True)

    def rename(self, src: str, dst: str) -> None:
        if not self._fs(src).rename(self._path(src), self._path(dst)):
            raise OSError(f"could not rename {src} to {dst}")

    def replace(self, tmp: str, final: str) -> None:
        """Move the complete `tmp` into `final`'s place. The previous `final` stays readable
        until then and comes back if the move fails; a crash between the two renames
        leaves it at `final`.__old-*, which `Catalog` restores on its next read."""
        old = f"{final}.__old-{uuid.uuid4().hex[:8]}"
        had_previous = self.exists(final)
        if had_previous:
            self.rename(final, old)
        try:
            self.rename(tmp, final)
        except BaseException:
            if had_previous:
                self.rename(old, final)
            raise
        if had_previous:
            self.delete(old)

    def mkdirs(self, path: str) -> None:
        self._fs(path).mkdirs(self._path(path))

    def write_text(self, path: str, text: str) -> None:
        out = self._fs(path).create(self._path(path), True)
        try:
            out.write(bytearray(text.encode("utf-8")))
        finally:
            out.close()

    def read_text(self, path: str) -> str:
        stream = self._fs(path).open(self._path(path))
        try:
            return self._jvm.org.apache.commons.io.IOUtils.toString(stream, "UTF-8")
        finally:
            stream.close()

    def list_dir(self, path: str) -> list[str]:
        return [s.getPath().toString() for s in self._fs(path).listStatus(self._path(path))]

    def list_files(self, path: str) -> list[tuple[str, int, int]]:
        """(path relative to `path`, bytes, mtime ms) of every data file under `path`, sorted.

        Hidden files (`.x`, `_x`) are left out, as Spark's readers leave them out.
        Local folders are walked in Python; py4j costs about 3 ms a file, too much
        for a corpus of small files, so only remote filesystems go through Hadoop.
        """
        root = self.qualify(path)
        if root.startswith("file:"):
            return _list_local(local_path(root))
        out = []
        it = self._fs(root).listFiles(self._path(root), True)
        prefix = len(root.rstrip("/")) + 1
        while it.hasNext():
            st = it.next()
            rel = st.getPath().toString()[prefix:]
            if not _hidden(rel):
                out.append((rel, st.getLen(), st.getModificationTime()))
        return sorted(out)

    def fingerprint(self, path: str) -> str:
        """Changes when any data file under `path` is added, removed, resized or touched."""
        return fingerprint(self.list_files(path))


def _hidden(rel: str) -> bool:
    return any(part.startswith((".", "_")) for part in rel.split("/"))


def _list_local(root: str) -> list[tuple[str, int, int]]:
    if os.path.isfile(root):
        st = os.stat(root)
        return [(os.path.basename(root), st.st_size, int(st.st_mtime * 1000))]
    out = []
    for folder, _dirs, files in os.walk(root):
        for name in files:
            full = os.path.join(folder, name)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            if not _hidden(rel):
                st = os.stat(full)
                out.append((rel, st.st_size, int(st.st_mtime * 1000)))
    return sorted(out)


class Catalog:
    """Datasets of one pipeline: `catalog.path("ingested")`, `catalog.write(...)`, manifests."""

    def __init__(self, spark: SparkSession, data_root: str, pipeline: str):
        self.spark = spark
        self.fs = HadoopFS(spark)
        self.base = f"{absolute_uri(data_root).rstrip('/')}/{pipeline}"

    def path(self, name: str) -> str:
        return f"{self.base}/{name}"

    def local_path(self, name: str) -> str:
        """The dataset's directory as a filesystem path (model files are read with open())."""
        return local_path(self.fs.qualify(self.path(name)))

    def manifest(self, name: str) -> dict[str, Any] | None:
        self._recover(name)
        path = f"{self.path(name)}/{MANIFEST}"
        return json.loads(self.fs.read_text(path)) if self.fs.exists(path) else None

    def require(self, name: str, stage_hint: str) -> dict[str, Any]:
        m = self.manifest(name)
        if m is None:
            raise DataError(
                f"dataset '{name}' not found at {self.path(name)}; run the '{stage_hint}' "
                "stage first (sparkloom run runs every stage in order)"
            )
        return m

    def read(self, name: str, stage_hint: str) -> DataFrame:
        self.require(name, stage_hint)
        return self.spark.read.parquet(self.path(name))

    def current(self, name: str, fingerprint: str) -> dict[str, Any] | None:
        """The dataset's manifest if it was made from these inputs and config, else None."""
        m = self.manifest(name)
        return m if m is not None and m.get("fingerprint") == fingerprint else None

    def write(
        self,
        name: str,
        save: Callable[[str], None],
        manifest: dict[str, Any] | Callable[[str], dict[str, Any]],
    ) -> dict[str, Any]:
        """Run `save(tmp_path)`, add the manifest, then swap the result into place.

        `save` is any writer: `df.write.parquet`, `model.save`, a JSON file. `manifest`
        may be a function of the temporary path, to count what was actually written;
        if it raises, nothing is committed.
        """
        final = self.path(name)
        tmp = f"{final}.__tmp-{uuid.uuid4().hex[:8]}"
        try:
            save(tmp)
            extra = manifest(tmp) if callable(manifest) else manifest
            manifest = {
                "dataset": name,
                "path": final,
                "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                **extra,
            }
            self.fs.mkdirs(tmp)
            self.fs.write_text(f"{tmp}/{MANIFEST}", json.dumps(manifest, indent=2, sort_keys=True))
        except BaseException:
            if self.fs.exists(tmp):
                self.fs.delete(tmp)
            raise
        self._recover(name)
        self.fs.replace(tmp, final)
        return manifest

    def write_parquet(
        self,
        name: str,
        df: DataFrame,
        manifest: dict[str, Any] | Callable[[str], dict[str, Any]],
        partition_by: list[str] | None = None,
    ) -> dict[str, Any]:
        def save(tmp: str) -> None:
            writer = df.write.mode("errorifexists")
            if partition_by:
                writer = writer.partitionBy(*partition_by)
            writer.parquet(tmp)

        def full_manifest(tmp: str) -> dict[str, Any]:
            extra = manifest(tmp) if callable(manifest) else manifest
            return {"format": "parquet", "schema": df.schema.jsonValue(), **extra}

        return self.write(name, save, full_manifest)

    def _recover(self, name: str) -> None:
        """Undo a commit that died between its two renames: bring the old version back."""
        final = self.path(name)
        if self.fs.exists(final) or not self.fs.exists(self.base):
            return
        leftovers = [p for p in self.fs.list_dir(self.base) if f"/{name}.__old-" in p]
        if leftovers:
            log.warning("restoring %s from an interrupted commit (%s)", final, leftovers[-1])
            self.fs.rename(leftovers[-1], final)


def fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
