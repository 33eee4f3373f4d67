"""The public API: what the README and docs show users exists, is exported and is documented."""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest

import jaxgpt

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# `jaxgpt.X.Y` in prose or code; a trailing dot (end of a sentence) is not part of the name.
MENTION = re.compile(r"\bjaxgpt(?:\.[A-Za-z_][A-Za-z0-9_]*)+")
# Names the docs use as `jaxgpt.X` in code (`import jaxgpt` then `jaxgpt.X(...)`): top level.
SHOWN_AT_TOP = ["forward", "generate", "get_preset", "get_tokenizer", "init_params", "load_hf"]


def resolve(dotted: str) -> object:
    """The object a dotted name refers to: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:n]))
        except ModuleNotFoundError:
            continue
        for attr in parts[n:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


def mentions() -> list[tuple[str, str]]:
    found = set()
    for doc in DOCS:
        for name in MENTION.findall(doc.read_text(encoding="utf-8")):
            found.add((doc.name, name))
    return sorted(found)


def test_every_exported_name_exists_and_is_documented():
    assert len(set(jaxgpt.__all__)) == len(jaxgpt.__all__)
    for name in jaxgpt.__all__:
        obj = getattr(jaxgpt, name)
        if callable(obj):
            doc = inspect.getdoc(obj) or ""
            assert len(doc) > 20, f"jaxgpt.{name} has no docstring"


def test_public_functions_of_the_package_are_exported():
    """Every public function or class bound in `jaxgpt` (not a submodule) is in `__all__`."""
    public = {
        name
        for name, obj in vars(jaxgpt).items()
        if not name.startswith("_") and not inspect.ismodule(obj)
    }
    assert public == set(jaxgpt.__all__)


@pytest.mark.parametrize("name", SHOWN_AT_TOP)
def test_names_shown_at_top_level_are_exported(name):
    assert name in jaxgpt.__all__
    assert getattr(jaxgpt, name) is resolve(f"jaxgpt.{name}")


def test_generate_is_the_decode_loop():
    from jaxgpt.decode import generate

    assert jaxgpt.generate is generate


@pytest.mark.parametrize("doc,name", mentions(), ids=[f"{d}:{n}" for d, n in mentions()])
def test_every_name_the_docs_mention_resolves(doc, name):
    # A doc may name a file (`jaxgpt.cli.common`) or a package of experiments; all must resolve.
    try:
        resolve(name)
    except (ModuleNotFoundError, AttributeError) as err:
        pytest.fail(f"{doc} mentions {name}, which does not resolve: {err}")


def test_the_docs_mention_something():
    """The scan above really reads the docs (a broken pattern would make it vacuous)."""
    names = {n for _, n in mentions()}
    assert {"jaxgpt.generate", "jaxgpt.load_hf", "jaxgpt.forward"} <= names
