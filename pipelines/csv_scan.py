"""The true record count of a CSV file: a quote-aware scan independent of Spark's parser.

`scan_records` streams a file once, in constant memory, and finds where each record starts
and ends (1-based lines), the way Spark 4's CSV reader (univocity, `multiLine=true`,
`unescapedQuoteHandling=STOP_AT_DELIMITER`) splits records:

- a record ends at \\r\\n, \\n or \\r outside a quoted field; an empty line is no record, a
  line of only whitespace is one (Spark reads it as a one-field row); a final newline adds none;
- a quote opens a quoted field only as the field's first character; elsewhere it is data;
- in a quoted field escape+quote is data (RFC 4180's `""` when escape == quote); when they
  differ (`\\"`), escape+escape and a doubled quote are data too;
- a closing quote followed by anything but a separator, a newline or whitespace leaves the rest
  of the field unquoted, up to the next separator or newline;
- a UTF-8 BOM at the start is not data.

One difference is deliberate. Spark takes the first line ending in a file as the only one, so in a
CRLF file a bare \\n in an unquoted field (and in an LF file a bare \\r) does not end Spark's
record. Here, as in Python's csv and pandas, it does. A file that mixes line endings therefore
counts differently, which is exactly what the count check must catch (those merged rows are
wrong); `ScanResult.newlines` says which kinds were seen.

Encodings: UTF-8 and the single-byte ASCII-compatible ones (latin-1, cp1252, iso-8859-*) are
scanned as bytes, since a quote, separator or newline byte cannot be part of another character
there. Others (utf-16, utf-32, shift_jis, ...) are decoded incrementally and scanned as text:
the same rules, slower. `scan_files` runs the scan for many files on the executors.
"""

from __future__ import annotations

import codecs
import contextlib
import functools
import re
import zlib
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO

import numpy as np

from sparkloom.pipelines.errors import ConfigError, DataError

if TYPE_CHECKING:
    import pandas as pd
    from pyspark.sql import DataFrame, SparkSession

CHUNK = 1 << 20
UTF8_BOM = b"\xef\xbb\xbf"
# Spark's Hadoop codecs decompress .gz, .bz2, .deflate and .zst by file name (so does
# open_file); its .lz4 and .snappy use Hadoop's own block framing, which nothing here reads
HADOOP_FRAMED = (".lz4", ".snappy")


@dataclass(frozen=True)
class ScanResult:
    """Records of one file. `start_lines[i]`..`end_lines[i]` are record i's lines (1-based),
    empty when the scan was asked not to keep them; `unclosed_quote_line` is the line of a
    quote still open at the end of the file, else None."""

    records: int
    start_lines: np.ndarray
    end_lines: np.ndarray
    unclosed_quote_line: int | None
    newlines: dict[str, int]  # line endings outside quoted fields, by kind: "crlf", "lf", "cr"

    @property
    def mixed_newlines(self) -> bool:
        return sum(1 for n in self.newlines.values() if n) > 1

    def rows(self, header: bool) -> int:
        """The rows Spark should read: the records, less the header's."""
        return max(self.records - header, 0)


# --- the scanner --------------------------------------------------------------------------------

# states: between records, at a field's start, in an unquoted field, in a quoted field, just past
# a quote in a quoted field, just past the escape, in whitespace after a closing quote, and
# unquoted after `"\` when the escape is not the quote: univocity then reads on to the next
# separator or newline and is quoted again after it, and each further `"\` on the way (by its
# recursion) adds one more separator or newline to read past
_REC, _FIELD, _UNQ, _QUOT, _QCLOSE, _QESC, _WS, _UNQ_Q = range(8)
_OTHER, _AFTER_Q, _AFTER_E = range(3)  # in _UNQ_Q: what the last character was


class _Scanner:
    """The state machine, fed one buffer at a time; works on bytes or on str alike.

    Records are noted as buffer positions and turned into line numbers once per buffer, from
    the positions of its line breaks (numpy); runs of whole lines without a quote are split
    in one go, so Python steps only through quoted fields."""

    def __init__(self, quote, escape, sep, keep_lines: bool):
        text = isinstance(sep, str)
        # patterns are written as str and, for bytes, encoded 1:1 (every byte is one latin-1 char)
        as_str = (lambda c: c) if text else (lambda c: None if c is None else c.decode("latin-1"))
        compile_ = re.compile if text else (lambda p: re.compile(p.encode("latin-1")))
        q, e, s = as_str(quote), as_str(escape), as_str(sep)
        self.text = text
        self.Q, self.E, self.S = quote, escape, sep
        self.CR, self.LF = ("\r", "\n") if text else (b"\r", b"\n")
        self.CRLF, self.SP = self.CR + self.LF, " " if text else b" "
        self.rfc = escape is not None and escape == quote
        self.unq = compile_("|".join(re.escape(c) for c in (s, "\r", "\n")))
        if q is not None and e is not None:
            self.unq_q = compile_("|".join(re.escape(c) for c in (s, "\r", "\n", q, e)))
        self.depth, self.prev = 0, _OTHER
        if q is not None:
            # the body of a quoted field up to its next lone quote (or an escape at the end)
            not_q = "[^" + re.escape(q) + "]*"
            if self.rfc:
                body = not_q + "(?:" + re.escape(q * 2) + not_q + ")*"
            elif e is not None:
                plain = "[^" + re.escape(q + e) + "]*"
                body = plain + "(?:" + re.escape(e) + "[\\s\\S]" + plain + ")*"
            else:
                body = not_q
            self.body = compile_(body)
        ws = "".join(chr(c) for c in range(33) if chr(c) not in ("\r", "\n", s))
        self.ws = compile_("[" + re.escape(ws) + "]*")
        self.keep = keep_lines
        self.state, self.base = _REC, 1  # base: the line the current buffer starts on
        self.start_at = self.quote_at = 0  # a position in this buffer, or -line if earlier
        self.records, self.unclosed = 0, None
        self.starts, self.ends = array("i"), array("i")
        self.crlf = self.lf = self.cr = 0

    def _breaks(self, buf) -> tuple[np.ndarray, np.ndarray]:
        """buf's character codes, and the positions of its line breaks: every \\n, and every
        \\r not followed by \\n."""
        if self.text:
            a = np.frombuffer(buf.encode("utf-32-le", "surrogatepass"), dtype="<u4")
        else:
            a = np.frombuffer(buf, dtype=np.uint8)
        lf, cr = a == 10, a == 13
        cr[:-1] &= ~lf[1:]
        return a, np.flatnonzero(lf | cr)

    def _newline(self, buf, i: int) -> int:
        """Counts the newline at i by kind; returns the position after it."""
        if buf[i : i + 1] == self.CR:
            if buf[i + 1 : i + 2] == self.LF:
                self.crlf += 1
                return i + 2
            self.cr += 1
        else:
            self.lf += 1
        return i + 1

    def _plain(self, buf, pos, end, final, codes, breaks, spans) -> int:
        """Fast path: each whole line before the next quote is one record (or empty), found
        with numpy; returns where the first line holding a quote starts."""
        q = buf.find(self.Q, pos, end) if self.Q is not None else -1
        if q < 0 and final:
            stop = end
        else:
            lim = q if q >= 0 else end
            r = max(buf.rfind(self.LF, pos, lim), buf.rfind(self.CR, pos, lim))
            if r < pos:
                return pos
            stop = r + 2 if buf[r : r + 2] == self.CRLF else r + 1
        lo, hi = np.searchsorted(breaks, [pos, stop])
        cuts = breaks[lo:hi]
        begin = np.concatenate(([pos], cuts + 1))  # line k runs from begin[k] to cuts[k]
        finish = cuts - ((cuts > 0) & (codes[cuts] == 10) & (codes[np.maximum(cuts - 1, 0)] == 13))
        if begin[-1] < stop:  # the file's last line, without a newline
            finish = np.append(finish, stop)
        begin = begin[: len(finish)]
        filled = begin[finish > begin]
        self.records += len(filled)
        if self.keep and len(filled):
            if spans[-1][0]:  # the records before these, in order
                spans.append(([], []))
            spans[-1:-1] = [(filled, filled)]  # a plain record starts and ends on its line
        crlf = buf.count(self.CRLF, pos, stop)
        self.crlf += crlf
        self.lf += buf.count(self.LF, pos, stop) - crlf
        self.cr += buf.count(self.CR, pos, stop) - crlf
        return stop

    def run(self, buf, final: bool) -> int:
        """Scans buf; returns the position up to which it is consumed. Unless final, the last
        character stays unconsumed, so a quote, escape or \\r can always see the next one."""
        n = len(buf)
        end = n if final else n - 1
        codes, breaks = self._breaks(buf)
        # (start positions, end positions) of the records found, in order; the last pair are
        # the lists the loop below appends to
        spans: list = [([], [])]
        pos = 0
        Q, E, S, CR, LF, SP = self.Q, self.E, self.S, self.CR, self.LF, self.SP
        state, keep = self.state, self.keep
        while pos < end:
            if state == _REC:
                pos = self._plain(buf, pos, end, final, codes, breaks, spans)
                if pos >= end:
                    break
                c = buf[pos : pos + 1]
                if c in (CR, LF):  # an empty line
                    pos = self._newline(buf, pos)
                    continue
                self.start_at = pos
                state = _FIELD
            if state == _FIELD:
                c = buf[pos : pos + 1]
                if c == Q:
                    self.quote_at = pos
                    state = _QUOT
                    pos += 1
                    continue
                if c == S:
                    pos += 1
                    continue
                if c in (CR, LF):
                    i = pos
                else:
                    m = self.unq.search(buf, pos, end)
                    if m is None:
                        state, pos = _UNQ, end
                        break
                    i = m.start()
                    if buf[i : i + 1] == S:
                        pos = i + 1
                        continue
            elif state == _UNQ:
                m = self.unq.search(buf, pos, end)
                if m is None:
                    pos = end
                    break
                i = m.start()
                if buf[i : i + 1] == S:
                    pos = i + 1
                    state = _FIELD
                    continue
            elif state == _UNQ_Q:
                m = self.unq_q.search(buf, pos, end)
                if m is None:
                    if pos < end:
                        self.prev = _OTHER
                    pos = end
                    break
                i = m.start()
                c = buf[i : i + 1]
                prev = self.prev if i == pos else _OTHER
                pos = i + 1
                if c == Q:
                    self.prev = _OTHER if prev == _AFTER_E else _AFTER_Q
                elif c == E:
                    self.depth += prev == _AFTER_Q
                    self.prev = _AFTER_E if prev == _OTHER else _OTHER
                else:  # the separator or newline is data here
                    if c == CR and buf[pos : pos + 1] == LF:
                        pos += 1
                    self.depth -= 1
                    self.prev = _OTHER
                    if not self.depth:
                        state = _QUOT
                continue
            elif state == _QUOT:
                pos = self.body.match(buf, pos, end).end()
                if pos >= end:
                    break
                state = _QCLOSE if buf[pos : pos + 1] == Q else _QESC
                pos += 1
                continue
            elif state == _QCLOSE:
                c = buf[pos : pos + 1]
                pos += 1
                if c == Q:  # a doubled quote is data; univocity then reads on as quoted only
                    # when the quote is its own escape, else it looks at the next one again
                    state = _QUOT if self.rfc else _QCLOSE
                    continue
                if c == S:
                    state = _FIELD
                    continue
                if c in (CR, LF):
                    i = pos - 1
                elif c == E:
                    state, self.depth, self.prev = _UNQ_Q, 1, _OTHER
                    continue
                else:
                    state = _WS if c <= SP else _UNQ
                    continue
            elif state == _QESC:
                c = buf[pos : pos + 1]
                if c in (Q, E):
                    pos += 1
                state = _QUOT
                continue
            else:  # _WS: whitespace after a closing quote is skipped
                pos = self.ws.match(buf, pos, end).end()
                if pos >= end:
                    break
                c = buf[pos : pos + 1]
                if c == S:
                    state = _FIELD
                    pos += 1
                    continue
                if c != CR and c != LF:
                    state = _UNQ
                    continue
                i = pos
            # here the record ends at the newline at i
            self.records += 1
            if keep:
                spans[-1][0].append(self.start_at)
                spans[-1][1].append(i)
            pos = self._newline(buf, i)
            state = _REC
        if final and state != _REC:
            if state in (_QUOT, _QESC):
                self.unclosed = self._line_of(self.quote_at, breaks)
            self.records += 1
            if keep:
                spans[-1][0].append(self.start_at)
                spans[-1][1].append(n - 1)
            state = _REC
        self.state = state
        if keep:
            for s, e in spans:
                self.starts.extend(self._lines_of(np.asarray(s, np.int64), breaks))
                self.ends.extend(self._lines_of(np.asarray(e, np.int64), breaks))
        # what is still open keeps its lines, as this buffer's positions are about to go
        self.start_at = -self._line_of(self.start_at, breaks)
        self.quote_at = -self._line_of(self.quote_at, breaks)
        self.base += int(np.searchsorted(breaks, pos))
        return pos

    def _lines_of(self, at: np.ndarray, breaks: np.ndarray) -> array:
        lines = np.where(at < 0, -at, self.base + np.searchsorted(breaks, at))
        return array("i", lines.astype(np.int32).tobytes())

    def _line_of(self, at: int, breaks: np.ndarray) -> int:
        return -at if at < 0 else self.base + int(np.searchsorted(breaks, at))

    def result(self) -> ScanResult:
        return ScanResult(
            records=self.records,
            start_lines=np.frombuffer(self.starts, dtype=np.int32),
            end_lines=np.frombuffer(self.ends, dtype=np.int32),
            unclosed_quote_line=self.unclosed,
            newlines={"crlf": self.crlf, "lf": self.lf, "cr": self.cr},
        )


def _codec(encoding: str) -> str:
    """Python's name for the encoding."""
    try:
        return codecs.lookup(encoding).name
    except LookupError:
        raise ConfigError(
            f"ingest.encoding {encoding!r} is not an encoding Python knows; use e.g. "
            "utf-8, iso-8859-1 or utf-16"
        ) from None


def _byte_scannable(name: str) -> bool:
    """UTF-8, or a single-byte encoding in which ASCII bytes are ASCII characters."""
    if name in ("utf-8", "utf-8-sig"):
        return True
    dec = codecs.getincrementaldecoder(name)
    try:
        chars = [dec(errors="replace").decode(bytes([b])) for b in range(256)]
    except (TypeError, ValueError):  # not a bytes-to-text codec: scanned as text, or refused
        return False
    return all(len(c) == 1 for c in chars) and all(ord(chars[b]) == b for b in range(128))


def _chars(quote: str, escape: str, sep: str) -> tuple[str | None, str | None, str]:
    """Spark's options as characters; an empty quote or escape (or NUL) turns it off."""
    if len(sep) != 1:
        raise ConfigError(
            f"ingest.csv.sep {sep!r}: the record count check needs a one-character separator; "
            "set ingest.csv.sep to one character"
        )
    for key, value in (("quote", quote), ("escape", escape)):
        if len(value) > 1:
            raise ConfigError(f"ingest.csv.{key} {value!r} must be one character (or empty: none)")
    q = quote if quote not in ("", "\0") else None
    e = escape if escape not in ("", "\0") else None
    if q is not None and q in ("\r", "\n", sep):
        raise ConfigError(
            f"ingest.csv.quote {quote!r} is also a separator or newline; set it to '\"'"
        )
    return q, e, sep


def scan_records(
    stream: BinaryIO,
    quote: str = '"',
    escape: str = '"',
    sep: str = ",",
    encoding: str = "utf-8",
    chunk_size: int = CHUNK,
    keep_lines: bool = True,
) -> ScanResult:
    """Counts the records of a CSV file read from a binary stream (already decompressed),
    in chunks of `chunk_size`; memory stays flat apart from the 8 bytes per record of the
    line arrays, which `keep_lines=False` leaves out. Options are Spark's (an empty quote or
    escape turns it off); one it cannot follow is a ConfigError naming the setting."""
    q, e, s = _chars(quote, escape, sep)
    name = _codec(encoding)
    if _byte_scannable(name) and all(c is None or len(c.encode(name)) == 1 for c in (q, e, s)):
        enc = functools.partial(str.encode, encoding=name)
        scanner = _Scanner(*(None if c is None else enc(c) for c in (q, e)), enc(s), keep_lines)
        decode = None
        bom = UTF8_BOM if name in ("utf-8", "utf-8-sig") else None
    else:
        scanner = _Scanner(q, e, s, keep_lines)
        decode = codecs.getincrementaldecoder(name)(errors="replace").decode
        bom = "\ufeff"
    buf = b"" if decode is None else ""
    started = False
    while True:
        data = stream.read(chunk_size)
        final = not data
        buf += data if decode is None else decode(data, final)
        if not started:
            if len(buf) < 3 and not final:
                continue  # too short yet to tell whether it starts with a BOM
            if bom is not None and buf.startswith(bom):
                buf = buf[len(bom) :]
            started = True
        pos = scanner.run(buf, final)
        if final:
            return scanner.result()
        buf = buf[pos:]


# --- files: opened decompressed, on any filesystem pyarrow knows ---------------------------------


class _Inflate:
    """A read(n) stream over Hadoop's DefaultCodec (.deflate: a zlib stream)."""

    def __init__(self, raw):
        self.raw, self.z, self.out = raw, zlib.decompressobj(), b""

    def read(self, n: int) -> bytes:
        while len(self.out) < n and not self.z.eof:
            data = self.raw.read(n)
            if not data:
                break
            self.out += self.z.decompress(data)
        out, self.out = self.out[:n], self.out[n:]
        return out


@contextlib.contextmanager
def open_file(path: str) -> Iterator[BinaryIO]:
    """The file's contents as a binary stream, decompressed as Spark does by the file's name."""
    import pyarrow as pa
    import pyarrow.fs as pafs

    from sparkloom.pipelines.catalog import local_path

    if path.startswith("file:"):
        path = local_path(path)
    if "://" in path:
        # Hadoop's s3a:// and s3n:// are the same buckets as pyarrow's s3://
        scheme, rest = path.split("://", 1)
        uri = f"s3://{rest}" if scheme in ("s3a", "s3n") else path
        fs, inner = pafs.FileSystem.from_uri(uri)
    else:
        fs, inner = pafs.LocalFileSystem(), path
    name = path.rsplit("/", 1)[-1]
    if name.endswith(HADOOP_FRAMED):
        raise DataError(
            f"{path}: records of Hadoop-framed {name.rsplit('.', 1)[-1]} files cannot be counted "
            "outside Spark; recompress the input as .gz, .bz2 or .zst"
        )
    with fs.open_input_stream(inner, compression=None) as raw:
        if name.endswith(".gz"):
            import gzip

            yield gzip.GzipFile(fileobj=raw, mode="rb")
        elif name.endswith(".bz2"):
            import bz2

            yield bz2.BZ2File(raw, mode="rb")
        elif name.endswith(".zst"):
            yield pa.CompressedInputStream(raw, "zstd")
        elif name.endswith(".deflate"):
            yield _Inflate(raw)
        else:
            yield raw


def scan_path(path: str, **options) -> ScanResult:
    """`scan_records` of one file, by path or URI (file:, hdfs://, s3://, ...)."""
    with open_file(path) as stream:
        return scan_records(stream, **options)


# --- many files, on the executors --------------------------------------------------------------

SCAN_SCHEMA = (
    "path string, records long, start_lines array<int>, end_lines array<int>, "
    "unclosed_quote_line int, crlf long, lf long, cr long, error string"
)


def _scan_partition(
    batches: Iterator[pd.DataFrame], files: list[str], options: dict
) -> Iterator[pd.DataFrame]:
    """mapInPandas over ids into `files`: one row per file, an unreadable one with `error`."""
    import pandas as pd

    for pdf in batches:
        for i in pdf["id"].tolist():
            path = files[i]
            try:
                r = scan_path(path, **options)
            except (OSError, EOFError, ValueError, zlib.error, DataError) as e:
                row = {"path": path, "records": None, "start_lines": None, "end_lines": None,
                       "unclosed_quote_line": None, "crlf": None, "lf": None, "cr": None,
                       "error": f"{type(e).__name__}: {e}"}  # fmt: skip
            else:
                row = {"path": path, "records": r.records, "start_lines": r.start_lines,
                       "end_lines": r.end_lines, "unclosed_quote_line": r.unclosed_quote_line,
                       **r.newlines, "error": None}  # fmt: skip
            yield pd.DataFrame([row])


def scan_files_df(
    spark: SparkSession,
    files: list[str],
    quote: str = '"',
    escape: str = '"',
    sep: str = ",",
    encoding: str = "utf-8",
    keep_lines: bool = True,
) -> DataFrame:
    """One row per file (SCAN_SCHEMA), scanned in parallel on the executors. Connect-safe: a
    range of ids and mapInPandas, no RDDs; each task opens its files through pyarrow.fs."""
    _chars(quote, escape, sep)  # bad options fail here, on the driver, not in every task
    _codec(encoding)
    options = {"quote": quote, "escape": escape, "sep": sep, "encoding": encoding,
               "keep_lines": keep_lines}  # fmt: skip
    scan = functools.partial(_scan_partition, files=list(files), options=options)
    ids = spark.range(0, len(files), 1, max(1, min(len(files), 256)))
    return ids.mapInPandas(scan, SCAN_SCHEMA)


def scan_files(spark: SparkSession, files: list[str], **options) -> dict[str, ScanResult]:
    """`scan_records` of every file, keyed by the path as given; an unreadable file fails
    with a DataError naming it."""
    if not files:
        return {}
    table = scan_files_df(spark, files, **options).toArrow()
    rows = table.select(["path", "records", "unclosed_quote_line", "crlf", "lf", "cr", "error"])
    rows = rows.to_pylist()
    bad = [r for r in rows if r["error"] is not None]
    if bad:
        raise DataError(
            f"cannot read {bad[0]['path']} to count its records ({bad[0]['error']}); "
            f"fix or remove the file ({len(bad)} unreadable file(s))"
        )
    starts, ends = (_int_lists(table.column(c)) for c in ("start_lines", "end_lines"))
    return {
        r["path"]: ScanResult(
            records=r["records"],
            start_lines=s,
            end_lines=e,
            unclosed_quote_line=r["unclosed_quote_line"],
            newlines={"crlf": r["crlf"], "lf": r["lf"], "cr": r["cr"]},
        )
        for r, s, e in zip(rows, starts, ends, strict=True)
    }


def _int_lists(column) -> list[np.ndarray]:
    """An Arrow list<int32> column as one numpy array per row, without a Python int per line."""
    lists = column.combine_chunks()
    values = lists.values.to_numpy(zero_copy_only=False)
    offsets = lists.offsets.to_numpy()
    return [values[offsets[i] : offsets[i + 1]] for i in range(len(lists))]
