#!/usr/bin/env python
"""Print the near-duplicate groups of an index as JSON (best copy first: largest width x height).

    python scripts/find_duplicates.py --index DIR [--threshold T] [--limit N]

Output: ``{"threshold", "total_groups", "groups": [[{"id", "path", "width", "height", "size"}, ...]]}``.
``T`` is the cosine similarity at or above which two rows are duplicates (default
:data:`index.duplicates.DEFAULT_THRESHOLD`, measured on the demo model). Exit status 3 for a missing or
unreadable index.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

FIELDS = ("id", "path", "width", "height", "size")


def main(argv: list[str] | None = None) -> int:
    from index.duplicates import DEFAULT_THRESHOLD

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--index", required=True, metavar="DIR")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, metavar="T")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="print at most N groups")
    p.add_argument("--verbose", "-v", action="store_true")
    args = p.parse_args(argv)
    if args.limit is not None and args.limit < 0:
        p.error("--limit must be >= 0")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr)
    from index import Index, IndexFormatError
    from index.duplicates import find_duplicates

    try:
        idx = Index.open(args.index)
    except (FileNotFoundError, IndexFormatError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    with idx:
        groups = find_duplicates(idx, args.threshold)
    shown = groups if args.limit is None else groups[: args.limit]
    out = {
        "threshold": args.threshold,
        "total_groups": len(groups),
        "groups": [[{k: r.get(k) for k in FIELDS} for r in g] for g in shown],
    }
    print(json.dumps(out, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
