"""Regenerate the README's tables from the catalog (methods; what each asks of the loop):
``python tools/readme_methods.py``."""

import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))

from synapse.catalog import methods_table, usage_table  # noqa: E402

TABLES = {"methods": methods_table, "usage": usage_table}

if __name__ == "__main__":
    path = os.path.join(ROOT, "README.md")
    with open(path) as f:
        text = f.read()
    for name, table in TABLES.items():
        start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
        if start not in text or end not in text:
            sys.exit(f"README.md has no {start} ... {end} markers")
        block = f"{start}\n{table()}\n{end}"
        text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _, block=block: block, text, flags=re.S)
    with open(path, "w") as f:
        f.write(text)
    print("README.md tables regenerated")
