"""benchmarks/report.py fills the docs' marked tables, an emptied one too, never leaving one blank."""

from __future__ import annotations

import pytest

import report
from helpers import DOCS, ROOT


def test_fill_replaces_and_refills_an_emptied_table(tmp_path, monkeypatch):
    monkeypatch.setitem(report.TABLES, "demo", lambda: "| a |\n|---|\n")
    doc = tmp_path / "doc.md"
    filled = "x\n<!-- table:demo -->\n| a |\n|---|\n<!-- /table:demo -->\ny\n"
    for before in (
        "x\n<!-- table:demo -->\n<!-- /table:demo -->\ny\n",  # emptied: was skipped before
        "x\n<!-- table:demo -->\n| stale |\n<!-- /table:demo -->\ny\n",
        filled,
    ):
        doc.write_text(before)
        report.fill(doc)
        assert doc.read_text() == filled


def test_fill_refuses_unknown_and_empty_tables(tmp_path, monkeypatch):
    doc = tmp_path / "doc.md"
    doc.write_text("<!-- table:no-such -->\n<!-- /table:no-such -->\n")
    with pytest.raises(SystemExit, match="no-such"):
        report.fill(doc)
    monkeypatch.setitem(report.TABLES, "blank", lambda: "")
    doc.write_text("<!-- table:blank -->\n| old |\n<!-- /table:blank -->\n")
    with pytest.raises(SystemExit, match="rendered empty"):
        report.fill(doc)
    assert "| old |" in doc.read_text()  # nothing written


def test_every_marked_table_in_the_docs_has_content():
    pages = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
    found = 0
    for page in pages:
        for m in report.MARKERS.finditer(page.read_text()):
            found += 1
            assert m.group(2) in report.TABLES, f"{page.name}: unknown table {m.group(2)}"
            assert m.group(3).strip(), f"{page.name}: table {m.group(2)} is empty"
    assert found >= len(report.TABLES)
