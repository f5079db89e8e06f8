"""Writes the recipe reference, docs/recipe.md and docs/recipe.schema.json, from the dataclasses of a recipe.

    python scripts/recipe_reference.py           # rewrite both files
    python scripts/recipe_reference.py --check   # exit 1 if either differs from the code
"""

import argparse
import sys
from pathlib import Path

from rlhf_bilevel.recipe_reference import markdown, schema_text

DOCS = Path(__file__).resolve().parents[1] / "docs"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 on a difference")
    args = parser.parse_args()
    files = {DOCS / "recipe.md": markdown(), DOCS / "recipe.schema.json": schema_text()}
    stale = [path for path, text in files.items() if not path.is_file() or path.read_text(encoding="utf-8") != text]
    if args.check:
        for path in stale:
            print(f"{path} is out of date: run python scripts/recipe_reference.py", file=sys.stderr)
        return 1 if stale else 0
    for path in stale:
        path.write_text(files[path], encoding="utf-8")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
