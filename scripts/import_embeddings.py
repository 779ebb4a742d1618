#!/usr/bin/env python
"""Import a clip-retrieval embedding folder (``img_emb/*.npy`` + ``metadata/*.parquet``) into an index.

    python scripts/import_embeddings.py FOLDER --index DIR [--model NAME] [--mode M] [--metric ip|l2]
        [--index-type auto|flat|ivf-flat|ivf-pq|hnsw]

Rows are named by the parquet's ``root`` + ``relpath`` or ``image_path`` (else ``path`` / ``url``); other
columns (caption, ...) become row fields. ``--model`` / ``--mode`` are recorded in a new index and checked
against an existing one: give the name of the encoder that will embed queries (``load_encoder(...).name``).
Rows already indexed are not added twice. The last stdout line is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from index.faiss_index import INDEX_TYPES


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", metavar="FOLDER")
    p.add_argument("--index", required=True, metavar="DIR")
    p.add_argument("--model", default=None, help="encoder name recorded in / checked against the index")
    p.add_argument("--mode", default=None)
    p.add_argument("--metric", choices=["ip", "l2"], default="ip")
    p.add_argument("--index-type", choices=INDEX_TYPES, default="auto")
    p.add_argument("--verbose", "-v", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr)
    from index import IndexFormatError, IndexLockedError, IndexMismatchError
    from index.interchange import import_embeddings

    try:
        report = import_embeddings(
            args.folder,
            args.index,
            model=args.model,
            mode=args.mode,
            metric=args.metric,
            index_type=args.index_type,
        )
    except (IndexMismatchError, IndexFormatError, IndexLockedError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 4
    if report.skipped_parts:
        print(f"{report.skipped_parts} parts skipped (see the log)", file=sys.stderr)
    print(json.dumps(report.summary()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
