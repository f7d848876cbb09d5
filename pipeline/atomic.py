"""Atomic file and directory writes: a reader sees the old output or the new one, never half of one.

Temporaries sit beside their target, named ``.<target name>.<writer pid>.<random>.tmp``: a writer
killed with SIGKILL leaves one behind, and the next write of that target removes the ones whose
writer is gone (a live writer's are left alone). Outputs get the modes open() and mkdir() give
(0o666 / 0o777 less the umask), not mkstemp's private 0o600.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import json
import os
import shutil
import stat
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def umask() -> int:
    """The process's umask, read without changing it: os.umask() can only be read by setting it, and a
    thread creating a file meanwhile would get the wrong mode."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status") as status:  # Linux >= 4.7
            return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    with tempfile.TemporaryDirectory() as folder:  # elsewhere: what a new file's mode loses
        probe = os.path.join(folder, "probe")
        os.close(os.open(probe, os.O_CREAT | os.O_WRONLY, 0o777))
        return 0o777 & ~stat.S_IMODE(os.stat(probe).st_mode)


def default_mode(folder: bool = False) -> int:
    """The mode open() (0o666) or mkdir() (0o777) would give a new file or folder here."""
    return (0o777 if folder else 0o666) & ~umask()


def _writer_pid(entry: str, target: str) -> int | None:
    """The writer's pid when `entry` is a temporary of `target` (``.<target>.<pid>.<one word>.tmp``)."""
    prefix = f".{target}."
    if not (entry.startswith(prefix) and entry.endswith(".tmp")):
        return None
    parts = entry[len(prefix):-len(".tmp")].split(".")
    return int(parts[0]) if len(parts) == 2 and parts[0].isdigit() else None  # never another target's


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale(path: str | Path) -> list[Path]:
    """Delete the temporaries of `path` whose writer is no longer running (killed mid-write); returns
    them. A writer in another PID namespace sharing the folder would look dead: the stages never run so."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    stale = [entry for entry in path.parent.iterdir()
             if (pid := _writer_pid(entry.name, path.name)) is not None and not _alive(pid)]
    for entry in stale:
        _remove(entry)
    return stale


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        entry.unlink(missing_ok=True)


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}."


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)` on a temporary file beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    fd, tmp_name = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, default_mode())  # after `write`, which may have recreated the file
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@functools.lru_cache(maxsize=1)
def _renameat2():
    """libc's renameat2 (glibc >= 2.28), or None."""
    with contextlib.suppress(OSError, AttributeError):
        function = ctypes.CDLL(None, use_errno=True).renameat2
        function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        return function
    return None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux RENAME_EXCHANGE); False where that is unsupported."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # an old kernel, or a file system without it
        return False
    raise OSError(code, os.strerror(code), str(b))


def _swap_in(tmp: Path, path: Path) -> None:
    """Put folder `tmp` at `path`; the old `path`, if any, is deleted. Without RENAME_EXCHANGE a kill
    between the two renames leaves no `path` (its old version sits in a temporary)."""
    if path.exists() and _exchange(tmp, path):
        _fsync_dir(path.parent)
        _remove(tmp)  # now the old version; a kill here leaves it stale
        return
    old = None
    if path.exists():
        old = path.with_name(f"{_temp_prefix(path)}old.tmp")
        _remove(old)  # a dead writer's, whose pid this process now has
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    if old is not None:
        _remove(old)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it replaces `path` whole, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        tmp.chmod(default_mode(folder=True))  # mkdtemp makes it private; the output is an ordinary folder
        for file in tmp.rglob("*"):
            if file.is_file():
                with open(file, "rb") as handle:
                    os.fsync(handle.fileno())
        _swap_in(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def remove_tree(path: str | Path) -> None:
    """Delete folder `path` whole or not at all: renamed to a temporary first, so a kill midway never
    leaves part of it at `path` (the next write of `path` removes the rest)."""
    path = Path(path)
    if not path.exists():
        return
    gone = path.with_name(f"{_temp_prefix(path)}gone.tmp")
    _remove(gone)
    os.replace(path, gone)
    _fsync_dir(path.parent)
    _remove(gone)


@contextlib.contextmanager
def file_lock(path: str | Path, timeout_s: float, busy: Callable[[Path], Exception] | None = None) -> Iterator[None]:
    """An exclusive flock on `path` (created if need be), waited for up to `timeout_s` seconds, then
    `busy(path)` is raised (default TimeoutError). The kernel releases it when the holder dies, so a
    kill -9 never leaves it held."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as handle:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise (busy(path) if busy else TimeoutError(f"{path} is still locked after {timeout_s:.0f} s")) from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
