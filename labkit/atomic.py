"""Nothing the kit writes is ever half-written: write beside the target under a unique name, then rename.

A rename within one directory is atomic for files. A directory cannot be renamed over a non-empty one, so an old
directory is first moved aside under a unique name, the new one moved in, and the old one deleted (restored if the
move fails): a reader sees the old version or the new one, never a mix. Unique names (not ``path + ".tmp"``) let
two writers of the same target run at once without clobbering each other's half-written files.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _sibling(final: Path, tag: str, suffix: str = "") -> Path:
    return final.with_name(f".{final.name}.{tag}-{uuid.uuid4().hex[:12]}{suffix}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def commit(tmp: Path, final: Path) -> Path:
    """Move a finished ``tmp`` (file or directory) to ``final``, replacing what was there."""
    if final.is_dir() and not final.is_symlink():
        old = _sibling(final, "old")
        final.rename(old)
        try:
            tmp.rename(final)
        except BaseException:
            old.rename(final)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    return final


@contextmanager
def atomic(final: str | Path, *, directory: bool = False, suffix: str = "") -> Iterator[Path]:
    """``with atomic(path) as tmp: write(tmp)`` — on success ``tmp`` replaces ``path``; on any error it is
    removed and ``path`` is untouched. ``directory=True`` gives an empty directory to write into; ``suffix``
    keeps an extension tools insist on (``".onnx"``). A temp file is *not* created: the writer creates it."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent)) if directory \
        else _sibling(final, "tmp", suffix)
    try:
        yield tmp
        commit(tmp, final)
    except BaseException:
        _remove(tmp)
        raise


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` atomically; the file gets the permissions the user's umask gives any new file."""
    with atomic(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
        with os.fdopen(fd, "w") as f:
            f.write(text)
    return Path(path)
