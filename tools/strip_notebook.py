"""Removes outputs, execution counts and execution timing from Jupyter notebooks, in place.

    python tools/strip_notebook.py notebooks/quickstart.ipynb           # strip
    python tools/strip_notebook.py --check notebooks/*.ipynb             # exit 1 if any is not stripped

Committed notebooks carry no outputs: diffs stay readable, and tests/test_notebook.py checks it.
Only the standard library is used; the JSON layout matches nbformat's (indent 1, trailing newline).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def problems(notebook: dict[str, Any]) -> list[str]:
    """What would be stripped: one line per code cell with outputs, a count or timing metadata."""
    found = []
    for index, cell in enumerate(notebook.get("cells", [])):
        if cell.get("cell_type") != "code":
            continue
        if cell.get("outputs"):
            found.append(f"cell {index}: {len(cell['outputs'])} outputs")
        if cell.get("execution_count") is not None:
            found.append(f"cell {index}: execution_count {cell['execution_count']}")
        if "execution" in cell.get("metadata", {}):
            found.append(f"cell {index}: execution timing metadata")
    return found


def strip(notebook: dict[str, Any]) -> dict[str, Any]:
    for cell in notebook.get("cells", []):
        if cell.get("cell_type") == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
            cell.get("metadata", {}).pop("execution", None)
    return notebook


def _read(path: Path) -> dict[str, Any]:
    try:
        notebook = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SystemExit(f"{path}: no such file") from None
    except json.JSONDecodeError as error:
        raise SystemExit(f"{path}: not a notebook (invalid JSON: {error})") from None
    if not isinstance(notebook, dict) or "cells" not in notebook:
        raise SystemExit(f"{path}: not a notebook (no 'cells' list)")
    return notebook


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--check", action="store_true", help="only report; exit 1 if a notebook has outputs")
    args = parser.parse_args(argv)
    dirty = 0
    for path in args.notebooks:
        notebook = _read(path)
        found = problems(notebook)
        if not found:
            continue
        dirty += 1
        if args.check:
            print(f"{path}: not stripped ({'; '.join(found[:5])}{' ...' if len(found) > 5 else ''}); "
                  f"run: python tools/strip_notebook.py {path}")
        else:
            path.write_text(json.dumps(strip(notebook), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
            print(f"{path}: stripped {len(found)} items")
    return 1 if args.check and dirty else 0


if __name__ == "__main__":
    sys.exit(main())
