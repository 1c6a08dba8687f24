"""Regenerate the README's methods table from the catalog: ``python tools/readme_methods.py``."""

import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))

from synapse.catalog import methods_table  # noqa: E402

START, END = "<!-- methods:start -->", "<!-- methods:end -->"

if __name__ == "__main__":
    path = os.path.join(ROOT, "README.md")
    with open(path) as f:
        text = f.read()
    if START not in text or END not in text:
        sys.exit(f"README.md has no {START} ... {END} markers")
    block = f"{START}\n{methods_table()}\n{END}"
    text = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    with open(path, "w") as f:
        f.write(text)
    print("README.md methods table regenerated")
