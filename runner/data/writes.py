"""How the runner writes its own files: under a temporary name that carries the writer's pid, renamed into place
only once complete, with one line when the disk is full.

A run killed outright (SIGKILL, a power cut) cannot remove its temporary entries, so the next run that writes into
the same folder reclaims them: an entry whose writer is no longer running is deleted, one whose writer still runs is
left alone, so two runs may share a cache.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import shutil
from pathlib import Path

from runner.errors import DiskFull
from runner.config.sizes import format_bytes

log = logging.getLogger(__name__)

TEMP = re.compile(r"^\..+\.(?P<pid>\d+)\.tmp$")  # what ``temp_path`` makes: .<name>.<pid>.tmp


def temp_path(final: Path) -> Path:
    """Where ``final`` is written before it is renamed into place: hidden, and named for this process."""
    return final.with_name(f".{final.name}.{os.getpid()}.tmp")


def atomic_write(path: Path, text: str, key: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file: ``path`` is whole or absent, never cut short.

    Raises:
        DiskFull: the disk has no room for it; ``key`` is the setting that picks the folder.
    """
    tmp = temp_path(path)
    data = text.encode("utf-8")
    try:
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # on disk before the name: a power cut leaves the old file or the new, not an empty one
        tmp.replace(path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if is_disk_full(e):
            raise disk_full(key, path.parent, f"writing {path.name}", len(data)) from e
        raise
    return path


def is_disk_full(e: BaseException) -> bool:
    """ENOSPC or EDQUOT, as an OSError or as a library's own error that only quotes it (safetensors)."""
    return getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(e)


def disk_full(key: str, folder: Path, what: str, needed: int) -> DiskFull:
    """One line: the folder, what was being written, the bytes it needs and the bytes free there."""
    return DiskFull(f"{key}: {folder} is full: {what} needs {format_bytes(needed)}, {format_bytes(free_bytes(folder))} "
                    f"is free there; free space on that disk, or set {key} to a folder on a disk with room")


def free_bytes(folder: Path) -> int:
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return 0


def reclaim(folder: Path, pattern: re.Pattern[str] = TEMP) -> list[Path]:
    """Delete the entries of ``folder`` whose names match ``pattern`` (its ``pid`` group) and whose writer is no
    longer running; the entries deleted. Called before this process writes there, so an entry carrying this
    process's own pid is a dead earlier process's (pids are reused, in containers above all)."""
    try:
        entries = list(folder.iterdir())
    except OSError:
        return []
    removed = []
    for entry in entries:
        match = pattern.match(entry.name)
        if not match or _running(int(match["pid"])):
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError:
            continue  # another run reclaimed it first, or it is not ours to remove
        log.info("Removed %s, left by process %s, which is no longer running", entry, match["pid"])
        removed.append(entry)
    return removed


def _running(pid: int) -> bool:
    if pid <= 0 or pid == os.getpid():
        return False  # no writer has pid 0; this process is not writing there now
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    except (OverflowError, ValueError):
        return False  # no such pid can exist
    return True
