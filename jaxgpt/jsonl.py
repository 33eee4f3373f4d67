"""Reading `.jsonl` files (one JSON value per line) with errors that say where: `file:line`.

Chat data (`jaxgpt.chat.read_conversations`), multiple-choice items (`jaxgpt.eval.read_choices`)
and preference pairs (`jaxgpt.preferences.read_preferences`) all read their lines through
`records`, so a file that is missing, not UTF-8 or not JSON is reported the same way everywhere;
`files` finds the `.jsonl` files of a data set given as one file or a directory.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jaxgpt.errors import InputError, JaxgptError


def files(source: str | Path, what: str, hint: str) -> list[Path]:
    """The .jsonl files of a data set: one file, or every .jsonl under a directory (sorted).

    `what` names the data set in the errors ("chat data"); `hint` says what to pass instead.
    """
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        found = sorted(p for p in path.rglob("*.jsonl") if p.is_file())
        if found:
            return found
        raise InputError(f"{what} directory {path} contains no .jsonl files")
    raise InputError(f"{what} {str(source)!r} does not exist; {hint}")


def digest(paths: list[Path]) -> str:
    """sha256 over the files' bytes, in order: whether data prepared from them is stale."""
    h = hashlib.sha256()
    for path in paths:
        h.update(path.read_bytes())
    return h.hexdigest()


def records(
    path: str | Path, *, what: str = "data", error: type[JaxgptError] = InputError
) -> Iterator[tuple[str, Any]]:
    """Stream `(where, value)` for each non-blank line of a `.jsonl` file; `where` is "file:line".

    A file that cannot be opened, a line that is not UTF-8 and a line that is not JSON raise
    `error` (one line: `what` names the kind of file in the first case, `where` in the others).
    """
    path = Path(path)
    try:
        handle = path.open("rb")
    except OSError as err:
        raise error(f"cannot read {what} {path}: {err.strerror or err}") from err
    with handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as err:
                raise error(f"{where}: not UTF-8 text ({err.reason})") from err
            if not line:
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                raise error(f"{where}: not valid JSON ({err.msg}, column {err.colno})") from err
            yield where, value
