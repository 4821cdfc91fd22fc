"""Named datasets under a data root: paths, atomic writes, manifests.

Every stage output lives at `<data_root>/<pipeline>/<dataset>` and is written to a
temporary sibling first, then committed by rename; a failed write leaves the
previous version readable. The datasets of one stage are one commit (`Catalog.commit`):
a journal written before the renames lets the next reader finish a commit cut short, so
no reader sees a new dataset beside an old one. Each dataset carries `_manifest.json`
(row counts, schema, config hash, a fingerprint of its inputs) so a re-run with the same
inputs and config is recognised and skipped. The data root may be a local path or a
URI (file:, hdfs://, s3://, gs://, or a scheme fsspec serves). File operations go through
`pyarrow.fs` (`models.storage`), not Hadoop's FileSystem over Py4J: the same code runs on
the driver, in executors and in a Spark Connect client, which has no JVM.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import posixpath
import socket
import stat
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow.fs as pafs
from pyspark.sql import DataFrame, SparkSession

from sparkloom.models import storage
from sparkloom.pipelines.errors import DataError

log = logging.getLogger(__name__)

MANIFEST = "_manifest.json"
COMMITS = "_commits"  # journals of multi-dataset commits, under the pipeline's folder


def local_path(url: str) -> str:
    """`file:/x` and `file:///x` -> `/x`, for libraries that want a plain path (pyarrow, torch)."""
    if url.startswith("file://"):
        return url.removeprefix("file://")
    return url.removeprefix("file:")


def absolute_uri(path: str) -> str:
    """Local paths become absolute, `~` expanded; URIs (scheme://) pass through."""
    if "://" in path or path.startswith("file:"):
        return path
    return os.path.abspath(os.path.expanduser(path))


def open_input(path: str):
    """A seekable binary file on any store the executors can reach, as stored (no
    decompression): a local path or file: URI, or a URI pyarrow.fs knows (hdfs://, s3://
    (s3a:// and s3n:// too), gs://)."""
    import pyarrow.fs as pafs

    if "://" not in path or path.startswith("file:"):
        return open(local_path(path), "rb")
    scheme, _, rest = path.partition("://")
    fs, inner = pafs.FileSystem.from_uri(
        ("s3" if scheme in ("s3a", "s3n") else scheme) + "://" + rest
    )
    return fs.open_input_file(inner)


class ArrowFS:
    """The handful of filesystem calls we need, on `pyarrow.fs` (through `models.storage`).

    Paths are local paths or URIs. Local ones are named as Hadoop names them (`file:/abs`),
    since they are compared with the paths Spark reports; other URIs pass through as given.
    """

    def qualify(self, path: str) -> str:
        if storage.is_local(path):
            return "file:" + storage.resolve(path)[1]
        return path if path.endswith("://") else path.rstrip("/")

    def exists(self, path: str) -> bool:
        return storage.exists(path)

    def delete(self, path: str) -> None:
        """Remove a file or a whole folder; nothing to do when it is not there."""
        fs, inner = storage.resolve(path)
        with contextlib.suppress(FileNotFoundError):  # absent, or another reader removed it
            if isinstance(fs, pafs.LocalFileSystem) and os.path.islink(inner):
                os.unlink(inner)  # the link, not what it points to
                return
            kind = fs.get_file_info(inner).type
            if kind == pafs.FileType.Directory:
                fs.delete_dir(inner)
            elif kind == pafs.FileType.File:
                fs.delete_file(inner)

    def rename(self, src: str, dst: str) -> None:
        """Move `src` to `dst`, which must not exist (never into a folder already there);
        OSError when it cannot. Object stores cannot move a folder: it is copied, then the
        original deleted, which is not atomic (as with Hadoop's S3A)."""
        fs, s = storage.resolve(src)
        d = storage.resolve(dst)[1]
        try:
            kind = fs.get_file_info(s).type
            if kind == pafs.FileType.NotFound:
                raise FileNotFoundError(f"could not rename {src} to {dst}: {src} does not exist")
            if fs.get_file_info(d).type != pafs.FileType.NotFound:
                raise FileExistsError(f"could not rename {src} to {dst}: {dst} exists")
            if kind == pafs.FileType.Directory and fs.type_name in ("s3", "gcs"):
                self._copy_dir(fs, s, d)
                return
            try:
                fs.move(s, d)
            except NotImplementedError:
                if kind != pafs.FileType.Directory:
                    raise
                self._copy_dir(fs, s, d)
        except OSError:
            raise
        except Exception as e:  # pyarrow's own errors (not implemented, ...)
            raise OSError(f"could not rename {src} to {dst}: {e}") from e

    @staticmethod
    def _copy_dir(fs: pafs.FileSystem, src: str, dst: str) -> None:
        fs.create_dir(dst, recursive=True)  # an empty folder has no file to copy
        pafs.copy_files(src, dst, source_filesystem=fs, destination_filesystem=fs)
        fs.delete_dir(src)

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

    def delete_empty_dir(self, path: str) -> None:
        """Remove `path` if it is an empty folder; one another writer just filled stays."""
        fs, inner = storage.resolve(path)
        with contextlib.suppress(OSError):  # gone, or not empty any more: someone is committing
            if isinstance(fs, pafs.LocalFileSystem):
                os.rmdir(inner)  # refuses a folder that is not empty
            elif storage.is_dir(path) and not self.list_dir(path):
                fs.delete_dir(inner)

    def touch(self, path: str) -> None:
        """Set the file's modification time to now. Remote stores have no call for that: the
        file is written again, so this is for small files."""
        fs, inner = storage.resolve(path)
        if isinstance(fs, pafs.LocalFileSystem):
            os.utime(inner)
        else:
            storage.write_bytes(path, storage.read_bytes(path))

    def mtime_ms(self, path: str) -> int:
        fs, inner = storage.resolve(path)
        info = fs.get_file_info(inner)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"{path} does not exist")
        return (info.mtime_ns or 0) // 1_000_000

    def mkdirs(self, path: str) -> None:
        storage.makedirs(path)

    def write_text(self, path: str, text: str) -> None:
        """The whole text or none (see `storage.write_bytes`); parent folders are made."""
        storage.write_text(path, text)

    def read_text(self, path: str) -> str:
        return storage.read_text(path)

    def list_dir(self, path: str) -> list[str]:
        """What the folder holds, as qualified paths (`file:/abs/dir/name`), sorted."""
        fs, inner = storage.resolve(path)
        root = self.qualify(path).rstrip("/")
        names = (posixpath.basename(i.path.rstrip("/"))
                 for i in fs.get_file_info(pafs.FileSelector(inner)))  # fmt: skip
        return sorted(f"{root}/{name}" for name in names)

    def is_dir(self, path: str) -> bool:
        return storage.is_dir(path)

    def list_files(self, path: str) -> list[tuple[str, int, int]]:
        """(path relative to `path`, bytes, mtime ms) of every data file under `path`, sorted.

        Hidden files (`.x`, `_x`) are left out, as Spark's readers leave them out.
        Local folders are walked in Python (symlinks followed, as Spark follows them);
        remote ones are listed by pyarrow in one recursive call.
        """
        root = self.qualify(path)
        if root.startswith("file:"):
            return _list_local(local_path(root))
        fs, inner = storage.resolve(root)
        top = fs.get_file_info(inner)
        if top.type == pafs.FileType.File:  # a file lists as itself
            return [("", top.size, (top.mtime_ns or 0) // 1_000_000)]
        prefix = len(inner.rstrip("/")) + 1
        out = []
        for info in fs.get_file_info(pafs.FileSelector(inner, recursive=True)):
            rel = info.path[prefix:]
            if info.type == pafs.FileType.File and not _hidden(rel):
                out.append((rel, info.size, (info.mtime_ns or 0) // 1_000_000))
        return sorted(out)

    def fingerprint(self, path: str) -> str:
        """Changes when any data file under `path` is added, removed, resized or touched."""
        return fingerprint(self.list_files(path))


def _hidden(rel: str) -> bool:
    return any(part.startswith((".", "_")) for part in rel.split("/"))


def _list_local(root: str) -> list[tuple[str, int, int]]:
    """Symlinks are followed, to files and folders, as Spark follows them when it reads; a
    link back to a folder above it (a loop Spark would follow until the path is too long)
    or a broken link is an error naming it."""
    if os.path.isfile(root):
        st = os.stat(root)
        return [(os.path.basename(root), st.st_size, int(st.st_mtime * 1000))]
    out: list[tuple[str, int, int]] = []

    def walk(folder: str, prefix: str, above: frozenset) -> None:
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            if _hidden(entry.name):
                continue
            try:
                st = os.stat(entry.path)  # follows links
            except OSError as e:
                raise DataError(
                    f"{entry.path} cannot be read ({e.strerror}; a broken symlink?); fix or "
                    "remove it"
                ) from None
            if stat.S_ISDIR(st.st_mode):
                key = (st.st_dev, st.st_ino)
                if key in above:
                    raise DataError(
                        f"{entry.path} links back to {os.path.realpath(entry.path)}, a folder "
                        "above it: a symlink loop; remove the link or point ingest.path below it"
                    )
                walk(entry.path, f"{prefix}{entry.name}/", above | {key})
            elif stat.S_ISREG(st.st_mode):
                out.append((f"{prefix}{entry.name}", st.st_size, int(st.st_mtime * 1000)))

    top = os.stat(root)
    walk(root, "", frozenset({(top.st_dev, top.st_ino)}))
    return sorted(out)


class Catalog:
    """Datasets of one pipeline: `catalog.path("ingested")`, `catalog.write(...)`, manifests."""

    def __init__(self, spark: SparkSession, data_root: str, pipeline: str):
        self.spark = spark
        self.fs = ArrowFS()
        self.base = f"{absolute_uri(data_root).rstrip('/')}/{pipeline}"

    def path(self, name: str) -> str:
        return f"{self.base}/{name}"

    def uri(self, name: str) -> str:
        """The dataset's directory as a full URI (`file:/...`, `hdfs://nn:8020/...`): what
        `models.storage` (pyarrow.fs) opens on the driver and in the training processes."""
        return self.fs.qualify(self.path(name))

    def local_path(self, name: str) -> str:
        """The dataset's files in a local directory, for code that reads them with open(): the
        directory itself on a local filesystem, else a copy made once per written version."""
        uri = self.uri(name)
        if storage.is_local(uri):
            return local_path(uri)
        version = json.dumps(self.manifest(name), sort_keys=True, default=str)
        return storage.local_copy(uri, fingerprint(uri, version))

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
        if it raises, nothing is committed. A commit of one dataset (see `commit`).
        """
        with self.commit() as tx:
            return tx.write(name, save, manifest)

    def write_parquet(
        self,
        name: str,
        df: DataFrame,
        manifest: dict[str, Any] | Callable[[str], dict[str, Any]],
        partition_by: list[str] | None = None,
    ) -> dict[str, Any]:
        with self.commit() as tx:
            return tx.write_parquet(name, df, manifest, partition_by)

    @contextlib.contextmanager
    def commit(self) -> Iterator[Commit]:
        """One commit for all the datasets a stage writes: they become visible together.

            with catalog.commit() as tx:
                q = tx.write_parquet("quarantine", quarantine, q_manifest)
                m = tx.write_parquet("ingested", clean, manifest)  # may read tx.path("quarantine")

        Each write runs at once on a temporary sibling and returns its manifest; on normal
        exit all of them replace the previous versions, on an exception none does.
        """
        tx = Commit(self)
        try:
            yield tx
        except BaseException:
            tx.abort()
            raise
        tx.apply()

    def _recover(self, name: str | None = None) -> None:
        """Finish what interrupted commits left. A journaled commit is rolled forward (its
        writer had decided; readers must see all its datasets or none), temporaries of a
        commit that died before its journal are deleted, and a dataset whose single rename
        was cut in two (`ArrowFS.replace`'s `.__old-` copy) is brought back."""
        if not self.fs.exists(self.base):
            return
        entries = self.fs.list_dir(self.base)
        commits = f"{self.base}/{COMMITS}"
        journals: dict[str, str] = {}
        markers: dict[str, str] = {}
        halves: list[tuple[str, str]] = []
        if self.fs.exists(commits):
            for p in self.fs.list_dir(commits):
                file = p.rsplit("/", 1)[-1]
                tag, _, kind = file.partition(".")
                if kind == "json":
                    journals[tag] = p
                elif kind == "open":
                    markers[tag] = p
                elif kind.startswith(("json.tmp", "open.tmp")):  # cut short, or its own
                    halves.append((tag, p))  # temporary (storage.write_bytes' `.tmp-<pid>`)
        for tag, p in sorted(journals.items()):
            journal = json.loads(self.fs.read_text(p))
            datasets = journal["datasets"]
            log.warning("finishing an interrupted commit of %s (%s)", ", ".join(datasets), p)
            self._finish(tag, datasets, journal.get("dropped", ()))
        live = {t for t, p in markers.items() if t not in journals and self._alive(p)}
        for p in entries:
            _, sep, tag = p.rsplit("/", 1)[-1].rpartition(".__tmp-")
            if sep and tag not in journals and tag not in live:
                log.warning("deleting %s, left by a commit that died before it was made", p)
                self.fs.delete(p)
        for tag, p in [*markers.items(), *halves]:
            if tag not in journals and tag not in live:
                self.fs.delete(p)
        self.fs.delete_empty_dir(commits)
        final = self.path(name) if name else None
        if final is None or self.fs.exists(final):
            return
        leftovers = [p for p in entries if f"/{name}.__old-" in p and self.fs.exists(p)]
        if leftovers:
            log.warning("restoring %s from an interrupted commit (%s)", final, leftovers[-1])
            self.fs.rename(leftovers[-1], final)

    def _finish(self, tag: str, datasets: dict[str, str], dropped=()) -> None:
        """Move each temporary of a journaled commit into place (and the dropped parts out),
        then drop the journal. Every step looks at what is there first, so a rerun after a
        crash at any point (or a reader finishing it at the same time) completes it."""
        for name in dropped:
            final, old = self.path(name), f"{self.base}/{name.replace('/', '.')}.__old-{tag}"
            if self.fs.exists(final) and not self.fs.exists(old):
                self._move(final, old)
            if self.fs.exists(old):
                self.fs.delete(old)
        for name, tmp_name in datasets.items():
            # a part of a dataset (`ingested/batch=3`, `ingested/_manifest.json`) keeps its
            # old copy beside the dataset, not inside it where Spark would read it
            final, tmp = self.path(name), f"{self.base}/{tmp_name}"
            old = f"{self.base}/{name.replace('/', '.')}.__old-{tag}"
            if self.fs.exists(tmp):
                if self.fs.exists(final) and not self.fs.exists(old):
                    self._move(final, old)
                self._move(tmp, final)
            if self.fs.exists(old):
                self.fs.delete(old)
        commits = f"{self.base}/{COMMITS}"
        self.fs.delete(f"{commits}/{tag}.json")
        self.fs.delete(f"{commits}/{tag}.open")
        self.fs.delete_empty_dir(commits)

    def _move(self, src: str, dst: str) -> None:
        try:
            self.fs.rename(src, dst)
        except OSError:
            if self.fs.exists(src):  # else another reader finishing the same commit moved it
                raise

    def _alive(self, marker: str) -> bool:
        """Whether the writer that opened a commit may still be running (then its temporaries
        are its work in progress). Only a writer on this host can be known to be gone."""
        try:
            owner = json.loads(self.fs.read_text(marker))
        except Exception:
            return False  # written with one create+rename: unreadable means gone
        if owner.get("host") != socket.gethostname():
            return True
        try:
            os.kill(int(owner["pid"]), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


class Commit:
    """The datasets of one commit, staged beside their final paths (`<name>.__tmp-<tag>`).

    At the end a journal `_commits/<tag>.json` (name -> temporary) is written with one
    create+rename: before it, a crash leaves only temporaries, which the next reader deletes
    once the writer is gone (its `<tag>.open` marker names host and pid); after it, the next
    reader completes the renames. Readers see all old or all new datasets. One writer per
    dataset at a time, as the runner does.
    """

    def __init__(self, catalog: Catalog):
        self.catalog, self.fs = catalog, catalog.fs
        self.tag = uuid.uuid4().hex[:12]
        self.staged: dict[str, str] = {}  # name (or name/part) -> temporary path
        self.dropped: list[str] = []  # parts removed on commit
        self._dir = f"{catalog.base}/{COMMITS}"

    def path(self, name: str) -> str:
        """Where `name` can be read inside the commit: its staged copy if this commit wrote it."""
        return self.staged.get(name) or self.catalog.path(name)

    def write(
        self,
        name: str,
        save: Callable[[str], None],
        manifest: dict[str, Any] | Callable[[str], dict[str, Any]],
    ) -> dict[str, Any]:
        """`Catalog.write`, staged: `save` and `manifest` run now, the dataset appears on commit."""
        if name in self.staged:
            raise ValueError(f"dataset '{name}' is written twice in one commit; write it once")
        self._open()
        final = self.catalog.path(name)
        tmp = f"{final}.__tmp-{self.tag}"
        try:
            save(tmp)
            extra = manifest(tmp) if callable(manifest) else manifest
            full = {
                "dataset": name,
                "path": final,
                "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                **extra,
            }
            self.fs.mkdirs(tmp)
            self.fs.write_text(f"{tmp}/{MANIFEST}", json.dumps(full, indent=2, sort_keys=True))
        except BaseException:
            self._discard(tmp)
            raise
        self.staged[name] = tmp
        return full

    def _discard(self, tmp: str) -> None:
        """A write that failed: a caller that catches this and goes on must not commit half a
        dataset."""
        if self.fs.exists(tmp):
            self.fs.delete(tmp)
        if not self.staged and not self.dropped:
            self._close()

    def write_parquet(
        self,
        name: str,
        df: DataFrame,
        manifest: dict[str, Any] | Callable[[str], dict[str, Any]],
        partition_by: list[str] | None = None,
    ) -> dict[str, Any]:
        def save(tmp: str) -> None:
            _parquet(df, tmp, partition_by)

        def full_manifest(tmp: str) -> dict[str, Any]:
            extra = manifest(tmp) if callable(manifest) else manifest
            return {"format": "parquet", "schema": df.schema.jsonValue(), **extra}

        return self.write(name, save, full_manifest)

    def write_part(self, name: str, part: str, df: DataFrame,
                   partition_by: list[str] | None = None) -> str:  # fmt: skip
        """Stage one partition folder of the Parquet dataset `name` (`batch=3`): it appears in
        (or replaces) `<name>/<part>` on commit, together with the rest of the commit. Its
        temporary sits beside the dataset, so no reader of `name` sees it half written.
        Returns the temporary path, readable until the commit."""
        key = f"{name}/{part}"
        if key in self.staged:
            raise ValueError(f"'{key}' is written twice in one commit; write it once")
        self._open()
        tmp = f"{self.catalog.path(name)}.{part}.__tmp-{self.tag}"
        try:
            _parquet(df, tmp, partition_by)
        except BaseException:
            self._discard(tmp)
            raise
        self.staged[key] = tmp
        return tmp

    def drop_part(self, name: str, part: str) -> None:
        """Remove `<name>/<part>` on commit."""
        self._open()
        self.dropped.append(f"{name}/{part}")

    def write_manifest(self, name: str, manifest: dict[str, Any]) -> dict[str, Any]:
        """Stage a new `_manifest.json` for the dataset `name`, whose parts this commit
        changes (`write_part`): the parts and the manifest that counts them move together.
        `manifest` may be the previous one updated: dataset, path and created_at are set anew."""
        self._open()
        full = {**manifest, "dataset": name, "path": self.catalog.path(name),
                "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}  # fmt: skip
        tmp = f"{self.catalog.path(name)}.{MANIFEST}.__tmp-{self.tag}"
        self.fs.write_text(tmp, json.dumps(full, indent=2, sort_keys=True))
        self.staged[f"{name}/{MANIFEST}"] = tmp
        return full

    def _open(self) -> None:
        if not self.staged and not self.dropped:
            self.catalog._recover()  # an earlier commit's leftovers must not meet this one's
            owner = json.dumps({"host": socket.gethostname(), "pid": os.getpid()})
            self._create(f"{self._dir}/{self.tag}.open", owner)

    def apply(self) -> None:
        if not self.staged and not self.dropped:
            return
        datasets = {name: tmp.rsplit("/", 1)[-1] for name, tmp in self.staged.items()}
        journal = {"commit": self.tag, "datasets": datasets, "dropped": self.dropped,
                   "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}  # fmt: skip
        try:
            self._create(f"{self._dir}/{self.tag}.json", json.dumps(journal, indent=2))
        except BaseException:
            self.abort()
            raise
        # from here the commit is made: a failure leaves the journal for the next reader
        self.catalog._finish(self.tag, datasets, self.dropped)

    def abort(self) -> None:
        """Drop everything staged; the previous versions stay as they were."""
        self.fs.delete(f"{self._dir}/{self.tag}.json")  # first: a half-deleted commit is void
        for tmp in self.staged.values():
            if self.fs.exists(tmp):
                self.fs.delete(tmp)
        self.staged.clear()
        self.dropped.clear()
        self._close()

    def _close(self) -> None:
        self.fs.delete(f"{self._dir}/{self.tag}.open")
        self.fs.delete_empty_dir(self._dir)

    def _create(self, path: str, text: str) -> None:
        """Write a whole file or none: readers never see half a journal."""
        self.fs.write_text(f"{path}.tmp", text)
        try:
            self.fs.rename(f"{path}.tmp", path)
        except BaseException:
            self.fs.delete(f"{path}.tmp")
            raise


def _parquet(df: DataFrame, path: str, partition_by: list[str] | None) -> None:
    writer = df.write.mode("error")
    if partition_by:
        writer = writer.partitionBy(*partition_by)
    writer.parquet(path)


def fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
