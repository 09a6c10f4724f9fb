"""The generated API reference (docs/reference.md) and its docstring conversion (docs/griffe_rst.py).

Checked without building the site (CI's ``mkdocs build --strict`` renders it): every public
name is on the reference page, and the reST markup of every docstring in the package becomes
Markdown.
"""

from __future__ import annotations

import importlib
import importlib.util
import re

import pytest

from helpers import DOCS, ROOT, SRC, TESTS

REFERENCE = DOCS / "reference.md"
PUBLIC_PACKAGES = ("lalora_curv", "lalora_curv.tasks", "lalora_curv.baselines")


def resolve(identifier: str) -> object:
    """The object a ``::: identifier`` block renders: as for griffe, a submodule of that name
    wins over a package attribute (``lalora_curv.train`` is the module, not the function)."""
    parts = identifier.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise ModuleNotFoundError(identifier)


def test_reference_page_documents_every_public_name():
    identifiers = re.findall(r"^::: (\S+)", REFERENCE.read_text(), flags=re.MULTILINE)
    assert identifiers, f"no ::: blocks in {REFERENCE}"
    rendered = {id(resolve(identifier)) for identifier in identifiers}
    missing = [
        f"{package}.{name}"
        for package in PUBLIC_PACKAGES
        for name in importlib.import_module(package).__all__
        if id(getattr(importlib.import_module(package), name)) not in rendered
    ]
    assert not missing, f"add a ::: block to docs/reference.md for {missing}"


def load_converter():
    pytest.importorskip("griffe")  # the docs extra
    spec = importlib.util.spec_from_file_location("griffe_rst", DOCS / "griffe_rst.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rst_to_markdown_cases():
    convert = load_converter().rst_to_markdown
    assert convert("See :func:`~lalora_curv.fit_precision` and :mod:`lalora_curv.precision`.") == (
        "See `fit_precision` and `lalora_curv.precision`."
    )
    assert convert("the paper's :math:`\\sum_s \\Lambda_s`") == "the paper's $\\sum_s \\Lambda_s$"
    assert convert("Pooled:\n\n.. math:: P = Q\n\nwith N") == "Pooled:\n\n$$\nP = Q\n$$\n\nwith N"
    two = ".. math::\n\n    a = b,\n      c = d\n\n    e = f\nwith x"
    assert convert("K-FAC:\n\n" + two) == (
        "K-FAC:\n\n$$\na = b,\n  c = d\n$$\n\n$$\ne = f\n$$\n\nwith x"
    )
    assert convert("Usage::\n\n    with x:\n        y") == "Usage:\n\n    with x:\n        y"
    assert convert("No markup: a dict {k: v}.") == "No markup: a dict {k: v}."


def test_every_docstring_converts():
    """No reST left in any docstring of the package after the conversion mkdocs applies."""
    converter = load_converter()
    import griffe

    package = griffe.load("lalora_curv", search_paths=[str(SRC)])
    stack, seen = [package], 0
    while stack:
        obj = stack.pop()
        stack += [m for m in obj.members.values() if not m.is_alias]
        if obj.docstring is None:
            continue
        seen += 1
        text = converter.rst_to_markdown(obj.docstring.value)
        residue = re.findall(r":[a-z]+:`|\.\. math::|::$", text, flags=re.MULTILINE)
        assert not residue, f"{obj.path}: {residue} left in\n{text}"
        assert text.count("$$") % 2 == 0, f"{obj.path}: unbalanced $$ in\n{text}"
    assert seen > 100


def test_every_test_a_user_page_cites_exists():
    """The setup tables of docs/your-data.md name the test behind each claim: each exists."""
    page = (DOCS / "your-data.md").read_text()
    cited = set(re.findall(r"`(test_\w+)`", page))
    assert len(cited) > 10
    defined = set()
    for f in TESTS.rglob("test_*.py"):
        defined |= set(re.findall(r"^def (test_\w+)", f.read_text(), flags=re.MULTILINE))
    assert cited <= defined, sorted(cited - defined)
    for path in re.findall(r"`(tests/(?:\w+/)*test_\w+\.py)`", page):
        assert (ROOT / path).is_file(), path
