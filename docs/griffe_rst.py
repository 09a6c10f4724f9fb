"""Griffe extension: the reST inline markup of our Google docstrings, as Markdown.

The docstrings follow curvlinops' style (Google sections, ``.. math::`` directives, Sphinx
roles such as ``:func:`~lalora_curv.fit_precision```); mkdocstrings renders Markdown. Before
griffe parses a docstring this rewrites, everywhere in the loaded package,

* ``.. math:: F`` (one line) and ``.. math::`` followed by an indented block into
  ``$$ ... $$`` display math (one block per blank-line-separated equation), rendered by
  pymdownx.arithmatex + MathJax like docs/math.md;
* ``:math:`F``` into inline ``$F$``;
* ``:func:`a.b```, ``:class:`~a.b``` (and the other Python roles) into code, ``a.b`` or,
  with Sphinx's ``~``, the last component ``b``;
* the ``::`` that opens a literal block (``Usage::``) into ``:`` (the indented block after
  it is already a Markdown code block).

Configured in mkdocs.yml (``extensions: [docs/griffe_rst.py]``); excluded from the site.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:func|meth|class|mod|attr|obj|data|exc|const):`(~?)([^`]+)`")
_INLINE_MATH = re.compile(r":math:`([^`]+)`")
_DIRECTIVE = re.compile(r"^(?P<indent>[ \t]*)\.\. math::[ \t]*(?P<rest>.*)$")
_LITERAL = re.compile(r"(\S?)[ \t]*::[ \t]*$", re.MULTILINE)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _display(indent: str, equations: list[list[str]]) -> list[str]:
    """``$$`` blocks at ``indent``, separated and surrounded by blank lines."""
    out = [""]
    for eq in equations:
        out += [f"{indent}$$", *(f"{indent}{line}" for line in eq), f"{indent}$$", ""]
    return out


def _math_blocks(text: str) -> str:
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        m = _DIRECTIVE.match(lines[i])
        if m is None:
            out.append(lines[i])
            i += 1
            continue
        indent, level = m["indent"], len(m["indent"])
        body = [m["rest"].strip()] if m["rest"].strip() else []
        i += 1
        while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > level):
            body.append(lines[i])
            i += 1
        while body and not body[-1].strip():
            body.pop()
        cut = min((_indent(line) for line in body if line.strip()), default=0)
        equations: list[list[str]] = [[]]
        for line in body:
            if line.strip():
                equations[-1].append(line[cut:] if _indent(line) >= cut else line.strip())
            elif equations[-1]:
                equations.append([])
        if out and not out[-1].strip():
            out.pop()
        out += _display(indent, [eq for eq in equations if eq])
    return "\n".join(out).strip("\n")


def rst_to_markdown(text: str) -> str:
    """The docstring ``text`` with reST math and Python roles turned into Markdown."""
    text = _math_blocks(text)
    text = _LITERAL.sub(lambda m: f"{m[1]}:" if m[1] else "", text)
    text = _INLINE_MATH.sub(lambda m: f"${m[1]}$", text)
    return _ROLE.sub(lambda m: f"`{m[2].rsplit('.', 1)[-1] if m[1] else m[2]}`", text)


class RstMarkup(griffe.Extension):
    """Rewrites every docstring of the loaded objects with :func:`rst_to_markdown`."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rst_to_markdown(obj.docstring.value)
