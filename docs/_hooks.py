"""mkdocs hooks: the parts of the docs that the code and the README already hold, generated at build time.

A page asks for a part with an HTML comment, which the hook replaces before the page is rendered:

* ``<!-- generate: methods-table -->``: the catalog's methods table (as in the README);
* ``<!-- generate: family rehearsal -->``: every method class of a family in the catalog, each with its
  docstring (mkdocstrings) and its command-line hyperparameters, so a new method appears by itself;
* ``<!-- generate: readme step-overhead-cpu -->``: a generated section of README.md, the text between
  its markers (``<!-- NAME -->`` ... ``<!-- /NAME -->`` or ``<!-- NAME:start -->`` ... ``<!-- NAME:end -->``);
* ``<!-- generate: cli-help -->``: ``synapse --help``, from the experiment program's own parser.

The API reference has a hand-written page for each module named in mkdocs.yml's nav; every other public
module of the package (a top-level ``synapse.<name>`` without a leading underscore, other than the
method families, documented on the method pages, and the experiment program) gets a generated page and
a nav entry, so a new module is never missing from the reference.

A part that cannot be made (an unknown family, a missing README section) stops the build. Whole files
(REPRODUCIBILITY.md, CHANGELOG.md) are included with pymdownx.snippets instead.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import re
from typing import Any, Dict, List

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

API_SECTION = "API reference"
_generated_api: List[str] = []  # modules given a generated page in this build


def _public_modules() -> List[str]:
    import synapse
    from synapse.catalog import FAMILIES

    elsewhere = {"experiments", *FAMILIES}
    return sorted(
        m.name for m in pkgutil.iter_modules(synapse.__path__) if not m.name.startswith("_") and m.name not in elsewhere
    )


def on_config(config: Any, **kwargs: Any) -> Any:
    """Add a nav entry under the API reference for each public module without a page of its own."""
    section = next(
        (item[API_SECTION] for item in config["nav"] if isinstance(item, dict) and API_SECTION in item), None
    )
    if section is None:
        raise PluginError(f"mkdocs.yml's nav has no {API_SECTION!r} section")
    _generated_api.clear()
    for name in _public_modules():
        page = f"api/{name}.md"
        if not os.path.exists(os.path.join(config["docs_dir"], page)):
            section.append({f"synapse.{name}": page})
            _generated_api.append(name)
    return config


def on_files(files: Any, config: Any, **kwargs: Any) -> Any:
    for name in _generated_api:
        content = f"# synapse.{name}\n\n::: synapse.{name}\n    options:\n      show_root_heading: false\n"
        files.append(File.generated(config, f"api/{name}.md", content=content))
    return files


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIRECTIVE = re.compile(r"<!--\s*generate:\s*([\w-]+)(?:\s+([^>]*?))?\s*-->")


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    where = page.file.src_uri
    return DIRECTIVE.sub(lambda m: expand(m.group(1), (m.group(2) or "").strip(), where), markdown)


def expand(kind: str, arg: str, where: str = "?") -> str:
    """The markdown for one directive (``kind`` and its argument)."""
    from synapse import catalog

    if kind == "methods-table":
        return catalog.methods_table()
    if kind == "family":
        if arg not in catalog.FAMILIES:
            raise PluginError(f"{where}: unknown family {arg!r}; the catalog has {catalog.FAMILIES}")
        return family_section(arg)
    if kind == "readme":
        return readme_section(arg, where)
    if kind == "cli-help":
        return cli_help()
    raise PluginError(f"{where}: unknown directive 'generate: {kind}'")


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _range(h: Any) -> str:
    if h.choices is not None:
        return ", ".join(f"`{c}`" for c in h.choices)
    if h.type in (int, float):
        return h.range_text()
    return ""


def family_section(family: str) -> str:
    """Each class the catalog registers under ``family``: its documentation, then its CLI names."""
    from synapse import catalog

    package = importlib.import_module(f"synapse.{family}")
    by_class: Dict[type, List[Any]] = {}
    for spec in catalog.specs():
        if spec.family == family:
            by_class.setdefault(spec.cls, []).append(spec)
    if not by_class:
        raise PluginError(f"the catalog has no method in the family {family!r}")
    parts = []
    for cls, specs in by_class.items():
        public = f"synapse.{family}" if getattr(package, cls.__name__, None) is cls else cls.__module__
        rows = [
            "| `--synapse_type` | hyperparameter (flag) | type | default | accepted | meaning |",
            "|---|---|---|---|---|---|",
        ]
        for spec in specs:
            fixed = ", ".join(f"`{k}={v!r}`" for k, v in spec.fixed.items())
            if fixed:
                rows.append(f"| `{spec.name}` | {fixed} (fixed) | | | | {_cell(spec.summary)} |")
            for h in spec.hparams:
                rows.append(
                    f"| `{spec.name}` | `--{h.name}` | `{h.type.__name__}` | `{h.default!r}` | {_cell(_range(h))} "
                    f"| {_cell(h.help)} |"
                )
        papers = sorted({s.paper for s in specs})
        parts.append(
            f"::: {public}.{cls.__name__}\n"
            "    options:\n"
            "      members: false\n"
            "\n"
            f"**Paper:** {'; '.join(papers)}\n"
            "\n"
            f"**From the command line** (`python cli.py --synapse_type NAME`, or `--method_args key=value`):\n"
            "\n" + "\n".join(rows) + "\n"
        )
    return "\n".join(parts)


def readme_section(name: str, where: str = "?") -> str:
    """The text between README.md's markers for ``name``."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    for start, end in ((f"<!-- {name} -->", f"<!-- /{name} -->"), (f"<!-- {name}:start -->", f"<!-- {name}:end -->")):
        match = re.search(re.escape(start) + r"\n?(.*?)" + re.escape(end), text, flags=re.S)
        if match:
            return match.group(1).strip() + "\n"
    raise PluginError(f"{where}: README.md has no section {name!r} (markers <!-- {name} --> ... <!-- /{name} -->)")


def cli_help() -> str:
    """``synapse --help`` at 100 columns, as a text block."""
    from synapse.experiments.cli import build_parser

    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"
    try:
        text = build_parser().format_help()
    finally:
        if columns is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = columns
    return "```text\n" + text.rstrip() + "\n```\n"
