"""Atomic file writes (every file the toolkit writes goes through `atomic_write`), directory locks, checksums.

A file is written to a temporary name in the same directory, flushed and fsynced, then renamed
over the final name, so a crash leaves either the old file or the new one, never half of one.
`StagedFiles` does the same for a set of files: all are complete on disk before the first rename.
`FileLock` lets one process at a time work in a directory (prepare: the data directory).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dist_gpt.errors import UserError

_UMASK = os.umask(0)
os.umask(_UMASK)


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def disk_error(path: Path, e: OSError) -> UserError:
    if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return UserError(f"disk full while writing {path}: free space on that filesystem or point the output elsewhere")
    if e.errno == errno.EROFS:
        return UserError(f"cannot write {path}: the filesystem is read-only; choose a writable location")
    if e.errno in (errno.EACCES, errno.EPERM):
        return UserError(f"cannot write {path}: permission denied; choose a writable location")
    return UserError(f"cannot write {path}: {e.strerror or e}")


def read_error(path: Path, e: OSError) -> UserError:
    """One line for a file or folder that cannot be read."""
    if isinstance(e, FileNotFoundError):
        return UserError(
            f"cannot read {path}: it does not exist (any more): was it moved or deleted? Check the path and run again"
        )
    if e.errno in (errno.EACCES, errno.EPERM):
        return UserError(f"cannot read {path}: permission denied; make it readable (chmod +r) or point elsewhere")
    return UserError(f"cannot read {path}: {e.strerror or e}")


def _write_tmp(path: Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` for a temporary name next to `path`, then make the file durable; returns the name."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise disk_error(path.parent, e) from None
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # ordinary file permissions, whatever mode the writer used (safetensors: 0600)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise disk_error(path, e) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _rename(tmp: Path, path: Path) -> None:
    try:
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise disk_error(path, e) from None


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp_path)` and move the result to `path` atomically; clean up on failure."""
    path = Path(path)
    _rename(_write_tmp(path, write), path)


class StagedFiles:
    """Several files replaced together: each is written to a temporary name, and only when all of them are
    complete on disk does `commit()` rename them into place. Leaving the `with` block without commit (an
    error) removes the temporary files, so the old files stay as they were.

        with StagedFiles() as staged:
            staged.write(folder / "a.bin", write_a)
            staged.write(folder / "b.bin", write_b)
            staged.commit()
    """

    def __init__(self) -> None:
        self.pending: list[tuple[Path, Path]] = []  # (temporary name, final name)

    def write(self, path: str | Path, write: Callable[[Path], None]) -> None:
        path = Path(path)
        self.pending.append((_write_tmp(path, write), path))

    def commit(self) -> None:
        while self.pending:
            tmp, path = self.pending.pop(0)
            _rename(tmp, path)

    def __enter__(self) -> StagedFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        for tmp, _ in self.pending:
            tmp.unlink(missing_ok=True)
        self.pending.clear()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def read_json(path: str | Path, what: str = "file") -> Any:
    """Load JSON or raise a UserError naming the file."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{what} {path} is corrupt (not valid JSON: {e})") from None
    except OSError as e:  # a directory in its place, no permission, an I/O error
        raise UserError(f"cannot read {what} {path}: {e.strerror or e}") from None


def sha256_file(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


class FileLock:
    """An exclusive lock held through a file (`fcntl.flock`): one holder at a time, the others wait or fail.

        with FileLock(data_dir / ".lock", f"prepare of {data_dir}"):
            ...  # a second process prints "waiting for another prepare of DIR (PID n)..." and waits here

    The file is created if missing and is not meant to be deleted: the kernel drops the lock when the holding
    process ends, however it ends, so there is nothing stale to clean up. The holder writes its PID into the
    file for the waiting message. `release(remove=True)` deletes the file before unlocking it (for a folder
    that is removed again); a waiter that then gets the lock on the deleted file notices and locks anew.
    """

    def __init__(self, path: str | Path, what: str, log: Callable[[str], None] = print):
        self.path, self.what, self.log = Path(path), what, log
        self.fd: int | None = None

    def holder(self) -> int | None:
        """The PID written by the process holding the lock (None when unknown)."""
        try:
            return int(self.path.read_text().strip() or "x")
        except (OSError, ValueError):
            return None

    def acquire(self, wait: bool = True) -> FileLock:
        """Take the lock; when another process holds it, wait (saying so once) or, with wait=False, raise UserError."""
        said = False
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = self.holder()
                held_by = f" (PID {pid})" if pid else ""
                if not wait:
                    os.close(fd)
                    raise UserError(f"another {self.what} is running{held_by}: wait for it to finish") from None
                if not said:
                    self.log(f"waiting for another {self.what}{held_by}...")
                    said = True
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                except BaseException:
                    os.close(fd)
                    raise
            if self._still_linked(fd):
                self.fd = fd
                self._write_pid()
                return self
            os.close(fd)  # the holder deleted the file before letting go: lock the one at the path now

    def release(self, remove: bool = False) -> None:
        if self.fd is None:
            return
        if remove:
            self.path.unlink(missing_ok=True)
        os.close(self.fd)  # closing the last descriptor drops the lock
        self.fd = None

    def __enter__(self) -> FileLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _open(self) -> int:
        """A descriptor of the lock file, created (with its folder) if missing; read-only where it cannot be written."""
        while True:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except FileNotFoundError:
                continue  # the folder was removed between mkdir and open: make it again
            except OSError as e:
                if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS) or not self.path.is_file():
                    raise
                return os.open(self.path, os.O_RDONLY)  # flock works on a read-only descriptor too

    def _still_linked(self, fd: int) -> bool:
        try:
            st, now = os.fstat(fd), os.stat(self.path)
        except FileNotFoundError:
            return False
        return (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino)

    def _write_pid(self) -> None:
        try:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass  # a read-only lock file, or a full disk: the PID only serves the waiting message
