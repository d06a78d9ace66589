"""Writing an output folder so that no run leaves anything half-written or stale behind.

`build_folder(dst)` is what `convert`, `fuse` and `finetune --full` share: it holds a lock beside the target
for the whole write (a concurrent run to the same target refuses, or with `wait` queues), turns SIGTERM into
an interruption that cleans up like Ctrl-C, removes what a killed run (SIGKILL, power loss) left for this
target, builds under a hidden temporary name that carries the writer's pid, and renames it into place only
when complete. Folders are made with plain `mkdir`, so they get the user's umask.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import Iterator

from .errors import CheckpointError

_HELD: dict[Path, int] = {}  # targets this process has locked (re-entrant: finetune holds, then saves)


def _lock_path(dst: Path) -> Path:
    return dst.parent / f".{dst.name}.lock"


def _open_locked(path: Path, wait: bool) -> int | None:
    """An fd holding an exclusive flock on `path` (None if another process holds it and not `wait`)."""
    import fcntl

    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        try:  # the holder before us may have unlinked the file: then lock the new one
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _holder(path: Path) -> str:
    try:
        pid = path.read_text().strip()
    except OSError:
        pid = ""
    return f"pid {pid}" if pid.isdigit() else "another process"


@contextlib.contextmanager
def target_lock(dst: Path, *, wait: bool = False) -> Iterator[None]:
    """Hold the lock file `.NAME.lock` beside `dst` for the block; removed on exit.

    Another process holding it makes this refuse with one line, or with `wait` wait for it. The kernel drops
    the lock when its holder dies, so a killed run never blocks the next one. Re-entrant within a process.
    """
    dst = Path(dst).absolute()
    if dst in _HELD:
        yield
        return
    path = _lock_path(dst)
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        fd = _open_locked(path, wait=False)
    except OSError as e:
        raise CheckpointError(f"cannot write in {dst.parent} ({e.strerror or e})") from None
    if fd is None:
        who = _holder(path)
        if not wait:
            raise CheckpointError(f"{who} is writing {dst} right now; wait for it to finish or choose "
                                  "another output folder")
        print(f"waiting for {who}, which is writing {dst} ...", file=sys.stderr, flush=True)
        fd = _open_locked(path, wait=True)
    _HELD[dst] = fd
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        del _HELD[dst]
        with contextlib.suppress(OSError):
            os.unlink(path)  # still locked by us, so no other process holds this inode's lock
        os.close(fd)


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises SystemExit(143) in the main thread, so cleanup runs as for Ctrl-C;
    a second SIGTERM during that cleanup is ignored. The previous handler is restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = []

    def handler(signum, frame):
        if not fired:
            fired.append(signum)
            raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale(dst: Path) -> None:
    """Remove the temporary folders a killed writer of `dst` left beside it (their pid is not alive); a
    complete previous folder moved aside mid-swap is put back. A live process's folder is only named."""
    dst = Path(dst).absolute()
    pattern = re.compile(rf"\.{re.escape(dst.name)}\.(tmp|old)-(\d+)-[0-9a-f]+")
    for entry in sorted(dst.parent.iterdir()):
        match = pattern.fullmatch(entry.name)
        if not match or not entry.is_dir():
            continue
        pid = int(match.group(2))
        if pid != os.getpid() and _alive(pid):
            print(f"note: {entry} belongs to a running process (pid {pid}); left in place", file=sys.stderr)
            continue
        if match.group(1) == "old" and (entry / dst.name).is_dir() and not dst.exists():
            os.replace(entry / dst.name, dst)  # the run died between the two renames of a swap
        shutil.rmtree(entry, ignore_errors=True)
        print(f"removed {entry}, left by an interrupted run (pid {pid})", file=sys.stderr)


def remove_stale_files(folder: Path, marker: str) -> None:
    """Remove the files `.….{marker}PID.…` in `folder` whose writer PID is no longer alive."""
    pattern = re.compile(rf"\..*{re.escape(marker)}(\d+)\.[^/]+")
    for entry in sorted(folder.iterdir()):
        match = pattern.fullmatch(entry.name)
        if match and entry.is_file() and not _alive(int(match.group(1))):
            entry.unlink(missing_ok=True)
            print(f"removed {entry}, left by an interrupted run", file=sys.stderr)


def replace_files(moves: dict[Path, Path]) -> None:
    """Rename each file into place with SIGINT and SIGTERM held, so a save is never left half swapped."""
    with _signals_deferred():
        for src, dst in moves.items():
            os.replace(src, dst)


def _temp_dir(dst: Path, kind: str) -> Path:
    path = dst.parent / f".{dst.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"
    path.mkdir()  # mode 0777 less the umask, as any mkdir
    return path


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends (they are delivered then), so a swap is never cut."""
    mask = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, mask)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def install_folder(tmp: Path, dst: Path) -> None:
    """Rename the complete folder `tmp` to `dst`; an existing `dst` is swapped out, and put back on failure."""
    with _signals_deferred():
        if not dst.exists():
            os.replace(tmp, dst)
            return
        old = _temp_dir(dst, "old")
        os.replace(dst, old / dst.name)
        try:
            os.replace(tmp, dst)
        except BaseException:
            os.replace(old / dst.name, dst)  # put the previous folder back
            raise
        finally:
            shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def build_folder(dst: Path, *, replace: bool = False, wait: bool = False, hint: str = "") -> Iterator[Path]:
    """Yield an empty temporary folder beside `dst`; when the block ends without error it becomes `dst`,
    otherwise (an error, Ctrl-C, SIGTERM) it is removed. An existing `dst` is refused unless `replace`;
    `wait` queues behind a concurrent writer of `dst` instead of refusing."""
    dst = Path(dst).absolute()
    with terminate_as_interrupt(), target_lock(dst, wait=wait):
        remove_stale(dst)
        if dst.exists() and not dst.is_dir():
            raise CheckpointError(f"{dst} is a file; choose a folder to write")
        if dst.exists() and not replace:
            raise CheckpointError(f"{dst} already exists; {hint or 'choose a new folder'}")
        tmp = _temp_dir(dst, "tmp")
        try:
            yield tmp
            install_folder(tmp, dst)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def write_error(dst: Path, e: Exception) -> CheckpointError:
    """One line for a failed write of `dst` (MLX says only "Unable to write", so name the likely cause)."""
    reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip() or type(e).__name__
    reason = reason.rstrip(".")
    free = f", {shutil.disk_usage(dst.parent).free / 2**20:.0f} MiB free there" if dst.parent.exists() else ""
    return CheckpointError(f"writing {dst} failed ({reason}{free}); nothing was written: free some space or "
                           "choose another folder")
