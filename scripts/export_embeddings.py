#!/usr/bin/env python
"""Export an index as a clip-retrieval embedding folder (npy float16 + aligned metadata parquet).

    python scripts/export_embeddings.py --index DIR --out FOLDER [--part-size N]

Writes ``FOLDER/img_emb/img_emb_{i}.npy`` and ``FOLDER/metadata/metadata_{i}.parquet`` (``image_path``,
``id``, root, relpath, size, mtime_ns, hash, width, height, added_at, ``extra`` JSON), readable by
embedding-reader (``parquet_npy``) and clip-retrieval tooling. The last stdout line is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--index", required=True, metavar="DIR")
    p.add_argument("--out", required=True, metavar="FOLDER")
    p.add_argument("--part-size", type=int, default=1_000_000, metavar="N", help="rows per npy/parquet pair")
    p.add_argument("--verbose", "-v", action="store_true")
    args = p.parse_args(argv)
    if args.part_size < 1:
        p.error("--part-size must be >= 1")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr)
    from index import IndexFormatError
    from index.interchange import export_embeddings

    try:
        parts = export_embeddings(args.index, args.out, part_size=args.part_size)
    except (IndexFormatError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    print(json.dumps({"parts": parts, "out": args.out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
