"""Writing files and directories so that they appear complete or not at all.

Every file jaxgpt writes for a user to keep (run files, metrics, reports, prepared data, exported
models, answers, shards) goes through here: it is written under a temporary name beside its final
place, flushed to disk, and renamed over the old one. A reader, or a process killed midway, sees
the old content or the new, never a mix, and a failed write leaves no stray file behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from jaxgpt.errors import InputError


@contextlib.contextmanager
def staged_file(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """A handle on a temporary file that replaces `path` when the block ends without an error.

    `mode` is "w" (UTF-8 text) or "wb".
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    """Replace `path` by `text` (UTF-8) atomically."""
    with staged_file(path) as handle:
        handle.write(text)


@contextlib.contextmanager
def staged_directory(path: str | Path, what: str = "the directory") -> Iterator[Path]:
    """A new temporary directory beside `path` that replaces `path` when the block succeeds.

    An existing `path` is moved aside first (a rename cannot replace a non-empty directory) and
    deleted only once the new one is in place; on an error the temporary directory is removed
    and `path` is left as it was. A place where nothing can be created is an InputError naming
    `what` is being written.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    except OSError as err:
        raise InputError(f"cannot create {what} {path}: {err.strerror or err}") from err
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary directory
        if path.is_dir():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            tmp.rename(path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
