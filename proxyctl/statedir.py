"""The state dir: one proxyctl at a time, and a clear word when it cannot be written.

Two proxyctl processes on one state dir would overwrite each other's nginx configs and
end each other's nginx as stale; a lock (flock, released by the kernel whatever way the
holder dies) keeps the second one out.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_FILE = "proxyctl.lock"


class StateDirError(RuntimeError):
    """The state dir is in use or cannot be written; the message says which and why."""


def claim(state_dir: Path) -> int:
    """Create `state_dir` if needed, lock it for this process and write our pid in the lock file.

    Returns the lock's file descriptor: keep it open for as long as the process runs.
    """
    path = state_dir / LOCK_FILE
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise StateDirError(f"cannot use state dir {state_dir}: {exc.filename}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise StateDirError(f"state dir {state_dir} is in use by another proxyctl (pid {holder}); "
                            "give each its own --state-dir") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        raise StateDirError(f"cannot write state dir {state_dir}: {path}: {exc.strerror}") from None
    return fd
