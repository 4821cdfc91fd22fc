"""One filesystem layer for the files training shares across machines.

Checkpoints, status files, the exported model and the converter's Parquet cache are
written by one process and read by another, often on another host. They go through
`pyarrow.fs`, so the same code serves a local path, `file://`, `hdfs://` (libhdfs, as
Spark's own HDFS client finds it: `HADOOP_HOME`, `CLASSPATH`), `s3://`/`s3a://` (AWS
credentials from the environment) and `gs://`, on the driver and in every rank alike,
without Spark or a JVM. A scheme pyarrow does not know is served by `fsspec` if an
fsspec implementation for it is installed (`memory://` in tests, `abfs://` with adlfs).

Paths are URIs or plain local paths; every function takes and returns that form.
"""

from __future__ import annotations

import io
import os
import posixpath
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import pyarrow.fs as pafs

# Object stores: a single PUT is already atomic, and rename is a copy there
_OBJECT_STORES = ("s3", "gcs", "abfs")


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file:")


def resolve(url: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and its own path for `url` (a local path or any URI)."""
    if url.startswith("file:"):
        return pafs.LocalFileSystem(), os.path.abspath(url.removeprefix("file://")
                                                       .removeprefix("file:"))  # fmt: skip
    if "://" not in url:
        return pafs.LocalFileSystem(), os.path.abspath(url)
    if url.startswith("s3a://") or url.startswith("s3n://"):  # Hadoop's names for S3
        url = "s3://" + url.split("://", 1)[1]
    try:
        return pafs.FileSystem.from_uri(url)
    except ValueError as e:  # a scheme pyarrow lacks (an OSError is the store: network, keys)
        try:
            import fsspec
        except ImportError:
            raise e from None
        try:
            fs, path = fsspec.core.url_to_fs(url)
        except (ValueError, ImportError):
            raise ValueError(
                f"no filesystem for {url}: pyarrow does not know the scheme and no fsspec "
                "implementation for it is installed"
            ) from e
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def shown(url: str) -> str:
    """How to print `url` for a person: a plain path when local (so `ls` takes it)."""
    return resolve(url)[1] if is_local(url) else url


def join(url: str, *parts: str) -> str:
    if is_local(url) and not url.startswith("file:"):
        return os.path.join(url, *parts)
    return posixpath.join(url, *parts)


def _info(url: str) -> pafs.FileInfo:
    fs, path = resolve(url)
    return fs.get_file_info(path)


def exists(url: str) -> bool:
    return _info(url).type != pafs.FileType.NotFound


def is_dir(url: str) -> bool:
    return _info(url).type == pafs.FileType.Directory


def makedirs(url: str) -> None:
    fs, path = resolve(url)
    fs.create_dir(path, recursive=True)


def listdir(url: str) -> list[str]:
    """Names (not paths) of what `url` holds; [] when it does not exist."""
    fs, path = resolve(url)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    return sorted(posixpath.basename(i.path.rstrip("/"))
                  for i in fs.get_file_info(pafs.FileSelector(path)))  # fmt: skip


def remove(url: str) -> None:
    fs, path = resolve(url)
    if fs.get_file_info(path).type == pafs.FileType.File:
        fs.delete_file(path)


def rmtree(url: str) -> None:
    fs, path = resolve(url)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


def read_bytes(url: str) -> bytes:
    fs, path = resolve(url)
    with fs.open_input_stream(path) as f:
        return f.read()


def read_text(url: str) -> str:
    return read_bytes(url).decode("utf-8")


def write_bytes(url: str, data: bytes) -> None:
    """Whole or not at all: a reader (or a resume after a kill) sees the old file or the new.

    Locally a temporary file is fsynced and renamed over the old one; on an object store
    one PUT is atomic already; elsewhere (HDFS) a temporary file is moved into place."""
    fs, path = resolve(url)
    parent = posixpath.dirname(path)
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(parent, exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # a kill before this line leaves the previous file intact
        return
    fs.create_dir(parent, recursive=True)
    if fs.type_name in _OBJECT_STORES:
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    tmp = f"{path}.tmp-{os.getpid()}"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    if fs.get_file_info(path).type == pafs.FileType.File:
        fs.delete_file(path)  # HDFS rename does not replace
    fs.move(tmp, path)


def write_text(url: str, text: str) -> None:
    write_bytes(url, text.encode("utf-8"))


def torch_source(url: str):
    """What `torch.load` takes: the path itself when local, the bytes otherwise."""
    return os.path.abspath(resolve(url)[1]) if is_local(url) else io.BytesIO(read_bytes(url))


def torch_save(obj, url: str) -> None:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes(url, buf.getvalue())


def copy_tree(src: str, dst: str) -> None:
    """Every file under `src` to the same place under `dst`, across filesystems."""
    sfs, spath = resolve(src)
    dfs, dpath = resolve(dst)
    pafs.copy_files(spath, dpath, source_filesystem=sfs, destination_filesystem=dfs)


def copy(src: str, dst: str) -> None:
    write_bytes(dst, read_bytes(src))


@contextmanager
def staged(url: str) -> Iterator[str]:
    """A local folder whose files end up at `url`: `url` itself when local, else a
    temporary folder uploaded on success (for code that writes with open())."""
    if is_local(url):
        path = resolve(url)[1]
        os.makedirs(path, exist_ok=True)
        yield path
        return
    tmp = tempfile.mkdtemp(prefix="sparkloom-stage-")
    try:
        yield tmp
        makedirs(url)
        copy_tree(tmp, url)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def local_copy(url: str, key: str) -> str:
    """A local folder with the files under `url`: the path itself when local, else a copy
    in the temporary directory, made once per `key` (say, a content fingerprint)."""
    if is_local(url):
        return resolve(url)[1]
    target = os.path.join(tempfile.gettempdir(), "sparkloom-remote", key)
    if not os.path.isdir(target):
        part = f"{target}.part-{os.getpid()}"
        shutil.rmtree(part, ignore_errors=True)
        os.makedirs(part)
        copy_tree(url, part)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        try:
            os.rename(part, target)
        except OSError:  # another process made it first
            shutil.rmtree(part, ignore_errors=True)
    return target
