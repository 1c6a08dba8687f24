"""A griffe extension (mkdocstrings loads it, see mkdocs.yml): two Google-style conventions of Synapse's
docstrings that griffe's parser does not know, rewritten before the docstrings are parsed.

* ``Example:`` (singular) heads the examples, as in Napoleon's Google style; griffe knows only
  ``Examples:`` and would render the doctest lines as Markdown. It becomes ``Examples:``.
* ``good, bad: description`` under ``Args:`` documents several parameters at once; griffe would take
  ``good, bad`` for one unknown parameter. It becomes one entry per name, each with the description.
* Sphinx roles (``:class:`~synapse.buffer.ReservoirBuffer```, ``:meth:`end_task```) become code that
  links to the object's documentation where the site has it (an optional cross-reference: an object
  the site does not document, such as a private one, stays plain code and does not fail the build).
"""

from __future__ import annotations

import re
from typing import Any, List

from griffe import Extension

EXAMPLE = re.compile(r"^(\s*)Example:\s*$")
ARGS_HEADER = re.compile(r"^(\s*)(Args|Arguments|Parameters|Keyword Args|Keyword Arguments):\s*$")
GROUPED = re.compile(r"^(\s+)(\w+(?:\s*,\s*\w+)+):(\s.*)?$")
ROLE = re.compile(r":(?:py:)?(?:func|class|meth|attr|data|mod|exc|obj):`(~?)\.?([\w.]+)(?:\(\))?`")


def _role(match: re.Match) -> str:
    short, target = match.group(1), match.group(2)
    title = target.rsplit(".", 1)[-1] if short else target
    return f'<autoref identifier="{target}" optional><code>{title}</code></autoref>'


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def rewrite(text: str) -> str:
    """``text`` (a docstring) with both conventions rewritten."""
    lines = text.split("\n")
    out: List[str] = []
    args_indent = None  # the indentation of the Args: header while inside that section
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.strip() and args_indent is not None and _indent(line) <= args_indent:
            args_indent = None
        header = ARGS_HEADER.match(line)
        if header:
            args_indent = len(header.group(1))
        grouped = GROUPED.match(line) if args_indent is not None else None
        if grouped and _indent(line) > args_indent:  # type: ignore[operator]
            # The entry's continuation lines are indented deeper than its first line.
            end = i + 1
            while end < len(lines) and (not lines[end].strip() or _indent(lines[end]) > _indent(line)):
                end += 1
            while end > i + 1 and not lines[end - 1].strip():
                end -= 1
            for name in re.split(r"\s*,\s*", grouped.group(2)):
                out.append(f"{grouped.group(1)}{name}:{grouped.group(3) or ''}")
                out.extend(lines[i + 1 : end])
            i = end
            continue
        out.append(EXAMPLE.sub(r"\1Examples:", line))
        i += 1
    return ROLE.sub(_role, "\n".join(out))


class SynapseDocstrings(Extension):
    def on_instance(self, *, obj: Any, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value)
