"""Crash-safe results files: atomic writes and an append-only journal of finished cells.

Every results file (md, csv, json, png, parquet, toml) is written to a temporary file in the same
directory, flushed and fsync'd, then renamed over the target (`os.replace`, atomic on POSIX), and
the directory is fsync'd so the rename survives a power cut. A reader therefore sees the old file
or the new one, never a truncated one; a process killed mid-write leaves at most a hidden
`.<name>.<random>.tmp` file behind (removed when the write fails with an exception).

    atomic_write_text(path, text)        atomic_write_bytes(path, data)
    atomic_write_json(path, obj)         atomic_csv(path, df)            # a pandas DataFrame
    atomic_csv_rows(path, rows)          atomic_savefig(fig, path)       # dict rows / matplotlib
    with atomic_open(path, "w") as fh:   # anything that writes to a file object
    atomic_write_with(path, writer)      # anything that wants a path: writer(tmp_path)

Experiments that loop over many cells record each finished cell in a `Journal`: one JSON object
per line, written with a single write() and fsync'd before the next cell starts. On open the
journal reads back the completed cells; a torn last line (the process was killed mid-write) is cut
off, so a re-run with `--resume` skips exactly the finished cells and re-runs the one in flight.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import fcntl
import json
import os
import secrets
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from .errors import PrimasimError, SpecError

__all__ = ["Journal", "JournalBusyError", "atomic_csv", "atomic_csv_rows", "atomic_open", "atomic_savefig",
           "atomic_write_bytes", "atomic_write_json", "atomic_write_text", "atomic_write_with", "json_default",
           "read_journal"]

PathLike = str | os.PathLike[str]


# ------------------------------------------------------------------------------ atomic writes
def _target(path: PathLike) -> Path:
    p = Path(path)
    if p.is_symlink():  # write through a link, do not replace the link with a file
        p = p.resolve()
    return p


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a directory; the rename is still atomic
        pass
    finally:
        os.close(fd)


def _temp_path(target: Path) -> tuple[Path, int]:
    """A new, exclusive temp file next to `target`, created with mode 0666 & ~umask (like open()).

    The folder is created if missing: an `--out DIR` that does not exist yet is not an error."""
    target.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        except FileExistsError:
            continue
        return tmp, fd


def _commit(tmp: Path, target: Path) -> None:
    os.replace(tmp, target)
    _fsync_dir(target.parent)


@contextlib.contextmanager
def atomic_open(path: PathLike, mode: str = "w", *, encoding: str | None = None,
                newline: str | None = None) -> Iterator[IO[Any]]:
    """`open(path, mode)` whose result appears at `path` only when the block ends without an error.

    Modes "w" (text; utf-8 unless `encoding` says otherwise) and "wb". The temp file is fsync'd
    before it replaces `path`; on an exception it is removed and `path` is left untouched."""
    if mode not in ("w", "wb", "wt"):
        raise ValueError(f"atomic_open writes whole files: mode must be 'w' or 'wb', not {mode!r}")
    target = _target(path)
    tmp, fd = _temp_path(target)
    try:
        if "b" in mode:
            fh: IO[Any] = os.fdopen(fd, "wb")
        else:
            fh = os.fdopen(fd, "w", encoding=encoding or "utf-8", newline=newline)
        with fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        _commit(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_with(path: PathLike, writer: Callable[[Path], object]) -> Path:
    """Call `writer(tmp)` to write a temp file, fsync it, then rename it to `path`.

    For libraries that insist on a path (pandas.to_parquet, ...). The temp name ends in `.tmp`, so
    a writer must not infer the format from the extension."""
    target = _target(path)
    tmp, fd = _temp_path(target)
    os.close(fd)
    try:
        writer(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        _commit(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return target


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically (all or nothing, even if the process is killed)."""
    with atomic_open(path, "wb") as fh:
        fh.write(data)
    return Path(path)


def atomic_write_text(path: PathLike, text: str, *, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` atomically. Newlines are written as given (no translation)."""
    with atomic_open(path, "w", encoding=encoding, newline="") as fh:
        fh.write(text)
    return Path(path)


def json_default(obj: Any) -> Any:
    """`json.dumps(default=...)` for numpy scalars and arrays, paths, sets and dataclass-like objects."""
    item = getattr(obj, "item", None)
    if callable(item) and getattr(obj, "shape", None) == ():
        return item()  # numpy scalar
    tolist = getattr(obj, "tolist", None)
    if callable(tolist):
        return tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=str)
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def atomic_write_json(path: PathLike, obj: Any, *, indent: int | None = 2, default: Callable[[Any], Any] | None = None,
                      newline: bool = True, **dumps_kw: Any) -> Path:
    """`json.dumps(obj, indent=indent, default=default)` (+ a final newline) written atomically."""
    text = json.dumps(obj, indent=indent, default=default, **dumps_kw)
    return atomic_write_text(path, text + ("\n" if newline else ""))


def atomic_csv(path: PathLike, df: Any, *, index: bool = False, **to_csv_kw: Any) -> Path:
    """`df.to_csv(path, index=index, **kw)` written atomically; the bytes are those of to_csv(path)."""
    with atomic_open(path, "w", encoding=to_csv_kw.pop("encoding", "utf-8"), newline="") as fh:
        df.to_csv(fh, index=index, **to_csv_kw)
    return Path(path)


def atomic_csv_rows(path: PathLike, rows: Iterable[Mapping[str, Any]], fieldnames: list[str] | None = None) -> Path:
    """`csv.DictWriter` rows (header = `fieldnames`, or the first row's keys) written atomically."""
    rows = list(rows)
    keys = list(fieldnames) if fieldnames is not None else (list(rows[0]) if rows else [])
    with atomic_open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    return Path(path)


def atomic_savefig(fig: Any, path: PathLike, **savefig_kw: Any) -> Path:
    """`fig.savefig(path, **kw)` (matplotlib) written atomically; the format comes from the suffix."""
    fmt = savefig_kw.pop("format", None) or Path(path).suffix.lstrip(".").lower() or "png"
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format=fmt, **savefig_kw)
    return Path(path)


# ------------------------------------------------------------------------------ journal
class JournalBusyError(PrimasimError):
    """Another process has the journal open for writing."""


def _key_fn(key: str | Callable[[dict[str, Any]], str]) -> Callable[[dict[str, Any]], str]:
    if callable(key):
        return key
    return lambda rec: str(rec[key])


def _scan(data: bytes) -> tuple[list[dict[str, Any]], int, int, list[int]]:
    """Parse JSON-lines bytes: (records, length of the sound prefix, torn tail bytes, bad line numbers).

    The sound prefix ends after the last complete line. A last line without its newline is kept
    if it is a whole JSON object (the kill came between the object and its newline), else it is
    torn. Blank lines are skipped; an unreadable line that has its newline is bad (damage)."""
    records: list[dict[str, Any]] = []
    bad: list[int] = []
    pos = 0
    lineno = 0
    n = len(data)
    while pos < n:
        nl = data.find(b"\n", pos)
        end = n if nl < 0 else nl
        line = data[pos:end]
        lineno += 1
        rec: Any = None
        if line.strip():
            try:
                rec = json.loads(line)
            except ValueError:  # JSONDecodeError, UnicodeDecodeError
                rec = None
        if nl < 0:  # the last line has no newline: whole record, or torn
            if isinstance(rec, dict):
                records.append(rec)
                return records, n, 0, bad
            return records, pos, n - pos, bad
        if isinstance(rec, dict):
            records.append(rec)
        elif line.strip():
            bad.append(lineno)
        pos = nl + 1
    return records, n, 0, bad


def read_journal(path: PathLike) -> list[dict[str, Any]]:
    """The complete records of a journal, read-only (a torn last line and bad lines are skipped)."""
    p = Path(path)
    if not p.exists():
        return []
    return _scan(p.read_bytes())[0]


class Journal:
    """Append-only JSON-lines record of finished cells, keyed by `key` (a field name or a function).

    `Journal(path)` opens (or creates) the file for appending, takes an exclusive lock on it (a
    second writer gets JournalBusyError), cuts off a torn last line and loads the complete records
    into `records` (key -> record; a key written twice keeps its last record). `add(record)` writes
    one line with a single write() and fsyncs it. `resume=False` starts afresh: an existing
    journal is kept as `<path>.prev` (renamed, so a killed fresh run never loses the old results).
    """

    def __init__(self, path: PathLike, key: str | Callable[[dict[str, Any]], str] = "cell_id", *,
                 resume: bool = True, default: Callable[[Any], Any] | None = json_default) -> None:
        self.path = Path(path)
        self._key = _key_fn(key)
        self._default = default
        self.records: dict[str, dict[str, Any]] = {}
        self.torn_bytes = 0
        self.bad_lines: list[int] = []
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh: IO[bytes] | None = open(self.path, "ab+")  # noqa: SIM115 - held open for the journal's life
        try:
            self._lock()
            if not resume and self._fh.seek(0, os.SEEK_END) > 0:
                prev = self.path.with_name(self.path.name + ".prev")
                os.replace(self.path, prev)
                _fsync_dir(self.path.parent)
                self._fh.close()
                self._fh = open(self.path, "ab+")  # noqa: SIM115
                self._lock()
            self._load()
        except BaseException:
            self._fh.close()
            self._fh = None
            raise

    def _lock(self) -> None:
        assert self._fh is not None
        try:

            fcntl.flock(self._fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # not POSIX: no lock
            return
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise JournalBusyError("another process is writing this journal", where=str(self.path),
                                       fix="wait for it to finish or stop it; do not run two copies at once") from None
            raise

    def _load(self) -> None:
        assert self._fh is not None
        self._fh.seek(0)
        data = self._fh.read()
        records, good_end, torn, bad = _scan(data)
        for rec in records:
            self.records[self._key(rec)] = rec
        self.torn_bytes, self.bad_lines = torn, bad
        if bad:  # damage inside the file (not a kill mid-append): keep the sound records, say so
            warnings.warn(f"{self.path}: skipped {len(bad)} unreadable line(s) {bad[:5]}; their cells will re-run",
                          stacklevel=3)
            atomic_write_bytes(self.path, b"".join(self._line(r) for r in records))
            self._fh.close()
            self._fh = open(self.path, "ab+")  # noqa: SIM115
            self._lock()
        elif torn or not data.endswith(b"\n") and data:
            self._fh.truncate(good_end)  # cut the torn line off: its cell is simply run again
            if good_end and not data[:good_end].endswith(b"\n"):  # a whole last record, newline missing
                self._fh.seek(0, os.SEEK_END)
                self._fh.write(b"\n")
            self._fh.flush()
            os.fsync(self._fh.fileno())
        self._fh.seek(0, os.SEEK_END)

    def _line(self, record: dict[str, Any]) -> bytes:
        return (json.dumps(record, default=self._default) + "\n").encode()

    # -- the mapping of finished cells
    def __contains__(self, key: object) -> bool:
        return key in self.records

    def __len__(self) -> int:
        return len(self.records)

    def get(self, key: str) -> dict[str, Any] | None:
        return self.records.get(key)

    def add(self, record: dict[str, Any]) -> None:
        """Record one finished cell: one line, one write(), fsync'd before returning."""
        if self._fh is None:
            raise ValueError(f"journal {self.path} is closed")
        key = self._key(record)
        line = self._line(record)
        self._fh.write(line)
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self.records[key] = json.loads(line)  # what a resumed run will read back

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def remove(self) -> None:
        """Close and delete the journal (a finished run whose results are written elsewhere)."""
        self.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def make_dir(path: str | Path, *, what: str, fix: str) -> Path:
    """Create the folder `path` (and its parents) if needed; failing that, one SpecError with `fix`."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SpecError(f"cannot create the {what} ({exc.strerror})", where=str(p), fix=fix) from None
    return p
