"""What a submission may touch while ``labkit grade`` runs it: installed in the learner's kernel before any of
their cells, as a Python audit hook (PEP 578), which cannot be removed once added.

- files: writes, deletes, renames and new directories only inside the submission's own temporary directory;
  reading the kit's exercise modules (its solutions) or the cohort's submissions is refused;
- network: no connection except to this machine's loopback address (the kernel's own channels are ZeroMQ's C code);
- processes: no subprocess, ``os.system``, ``exec`` or fork.

This stops accidents and casual reaching (``open("../alice.ipynb")``, ``shutil.rmtree("/")``, ``requests.get``);
it is not a security boundary: code that calls C directly (``ctypes``) passes under any audit hook
(docs/instructors.md says so).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

_WRITE_EVENTS = {"os.remove", "os.rmdir", "os.mkdir", "os.rename", "os.truncate", "shutil.rmtree", "os.chmod",
                 "os.chown", "os.symlink", "os.link", "os.utime"}
_PROCESS_EVENTS = {"subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
                   "os.forkpty", "pty.spawn"}
_LOOPBACK = ("127.0.0.1", "::1", "localhost")
_DEVICES = ("/dev/null", "/dev/tty", "/dev/stdout", "/dev/stderr")  # writable wherever the kernel runs


def _inside(path: object, root: str) -> bool:
    try:
        full = os.path.realpath(os.fsdecode(path))
    except (TypeError, ValueError):
        return True
    return full == root or full.startswith(root + os.sep)


def install(root: str, forbidden: list[str]) -> None:
    """Confine the running kernel: writes only under ``root``; no reads under any of ``forbidden``."""
    import labkit.exercises as ex

    ex._registry()  # import every exercise module (the solutions) now, before reading them is refused
    root = os.path.realpath(root)
    forbidden = [os.path.realpath(f) for f in forbidden]

    def refuse(what: str) -> None:
        raise PermissionError(f"labkit grade: {what} is not allowed while grading")

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode = args[0], args[1] or "r"
            if isinstance(path, int):  # os.fdopen of a descriptor: judged when the descriptor was opened
                return
            if any(_inside(path, f) for f in forbidden):
                refuse(f"reading {os.fsdecode(path)}")
            writing = any(c in str(mode) for c in "wax+") or (isinstance(args[2], int) and args[2] & (
                os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC))
            if writing and not _inside(path, root) and os.fsdecode(path) not in _DEVICES:
                refuse(f"writing {os.fsdecode(path)} (outside the submission's directory)")
        elif event in _WRITE_EVENTS:
            for path in args[:2]:
                if isinstance(path, (str, bytes, os.PathLike)) and not _inside(path, root):
                    refuse(f"{event} on {os.fsdecode(path)} (outside the submission's directory)")
        elif event in ("socket.connect", "socket.sendto"):
            address = args[1] if event == "socket.connect" else args[-1]
            host = address[0] if isinstance(address, tuple) and address else address
            if host not in _LOOPBACK:
                refuse(f"a network connection to {address!r}")
        elif event == "socket.getaddrinfo" and args[0] not in _LOOPBACK + (None,):
            refuse(f"looking up {args[0]!r} (no network while grading)")
        elif event in _PROCESS_EVENTS:
            refuse(f"starting a process ({event})")

    sys.addaudithook(hook)
    Path(root).mkdir(exist_ok=True)
