#!/usr/bin/env python
"""Benchmark index types on clustered synthetic vectors: build time, memory, queries/s, recall@10.

    python scripts/bench_index.py [--n 1000000] [--dim 768] [--types flat,ivf-pq,hnsw] [--queries 1000]
    python scripts/bench_index.py --filters [--rows 1000000] [--dim 768] [--types ivf-flat] [--queries 200]

``--filters`` instead builds one index per type with synthetic rows (``width`` uniform in 0..99, so
``max_width`` filters keep exactly 1 %, 10 % and 50 % of the rows, independently of the vectors; one row
in 1000 has a caption with "whiteboard") and prints, per selectivity, filtered-search QPS and recall@k
against brute force over the filtered rows next to the unfiltered search, then the latency of hybrid
search (vector + keyword, reciprocal-rank fusion) next to vector-only and keyword-only.

Every type is built through ``index.Index`` (rows in SQLite, float16 vector store, FAISS, atomic
save) in a temporary directory; recall@10 is measured against exact inner-product search on the
same stored (float16) vectors. Prints one table row per type.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from index import Index
from index import faiss_index as fx


def clustered(n: int, dim: int, clusters: int, seed: int, chunk: int = 100_000):
    """Unit vectors around ``clusters`` random centres (yielded in chunks)."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(12345).standard_normal((clusters, dim)).astype(np.float32)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        x = centres[rng.integers(0, clusters, m)] + 0.6 * rng.standard_normal((m, dim), dtype=np.float32)
        yield x / np.linalg.norm(x, axis=1, keepdims=True)


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def ground_truth(folder: Path, queries: np.ndarray, k: int) -> np.ndarray:
    idx = Index.open(folder)
    flat = faiss.IndexFlatIP(idx.dim)
    ids = idx.ids()
    for start in range(0, len(ids), 100_000):
        flat.add(idx.get_vectors(ids[start : start + 100_000]))
    return ids[flat.search(queries, k)[1]]


def bench(kind: str, args: argparse.Namespace, queries: np.ndarray, work: Path) -> dict:
    folder = work / kind
    rss0 = rss_mb()
    t0 = time.perf_counter()
    idx = Index.create(
        folder, args.dim, model="bench", index_type=kind, memory_budget=args.memory_budget << 30
    )
    offset = 0
    for x in clustered(args.n, args.dim, args.clusters, seed=0):
        idx.add(x, [{"path": f"/bench/{i}.jpg"} for i in range(offset, offset + len(x))])
        offset += len(x)
    idx.save(full=True)
    build_s = time.perf_counter() - t0
    idx.close()
    reader = Index.open(folder)
    if args.nprobe or args.ef_search or args.rerank_factor:
        reader.set_search_params(
            nprobe=args.nprobe, ef_search=args.ef_search, rerank_factor=args.rerank_factor
        )
    reader.search(queries[:8], args.k)  # warm-up
    t0 = time.perf_counter()
    found = np.concatenate([reader.search(queries[s : s + args.batch], args.k)[0]
                            for s in range(0, len(queries), args.batch)])  # fmt: skip
    qps = len(queries) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for q in queries[:100]:
        reader.search(q, args.k)
    latency_ms = (time.perf_counter() - t0) / min(100, len(queries)) * 1000
    faiss_mb = (folder / reader.manifest["faiss_file"]).stat().st_size / 2**20
    return {
        "type": kind,
        "factory": reader.manifest["faiss_factory"],
        "build_s": build_s,
        "faiss_mb": faiss_mb,
        "rss_mb": rss_mb() - rss0,
        "qps": qps,
        "latency_ms": latency_ms,
        "found": found,
        "folder": folder,
    }


SELECTIVITY = {"1%": 0, "10%": 9, "50%": 49}  # max_width keeping that share of rows (width = i % 100)


def _filtered_truth(idx: Index, queries: np.ndarray, keep: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k ids over the rows ``keep`` (ids), by chunks of stored vectors."""
    best_s = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(queries), 0), dtype=np.int64)
    for start in range(0, len(keep), 100_000):
        ids = keep[start : start + 100_000]
        sims = queries @ idx.get_vectors(ids).T
        all_s = np.concatenate([best_s, sims], 1)
        all_i = np.concatenate([best_i, np.broadcast_to(ids, sims.shape)], 1)
        top = np.argsort(-all_s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(all_s, top, 1), np.take_along_axis(all_i, top, 1)
    return best_i


def _timed(fn, n: int) -> tuple[float, list]:  # noqa: ANN001
    out = [fn(i) for i in range(min(2, n))]  # warm-up
    t0 = time.perf_counter()
    out = [fn(i) for i in range(n)]
    return (time.perf_counter() - t0) / n, out


def bench_filters(kind: str, args: argparse.Namespace, queries: np.ndarray, work: Path) -> None:
    from index import hybrid
    from index.filters import SearchFilters, resolve

    folder = work / f"filters-{kind}"
    t0 = time.perf_counter()
    idx = Index.create(
        folder, args.dim, model="bench", index_type=kind, memory_budget=args.memory_budget << 30
    )
    offset = 0
    for x in clustered(args.rows, args.dim, args.clusters, seed=0):
        rows = [
            {"root": "/bench", "relpath": f"d{i % 1000}/img_{i:07d}.jpg", "width": i % 100, "height": 100,
             "caption": "a whiteboard in a meeting room" if i % 1000 == 500 else None}
            for i in range(offset, offset + len(x))
        ]  # fmt: skip
        idx.add(x, rows)
        offset += len(x)
    idx.save(full=True)
    idx.close()
    build_s = time.perf_counter() - t0
    reader = Index.open(folder)
    if args.nprobe or args.ef_search or args.rerank_factor:
        reader.set_search_params(
            nprobe=args.nprobe, ef_search=args.ef_search, rerank_factor=args.rerank_factor
        )
    print(f"\n{kind}: {reader.manifest['faiss_factory']}, {args.rows} rows, built in {build_s:.1f} s")
    recall_k = f"recall@{args.k}"
    print(f"{'filter':10} {'rows kept':>10} {'resolve ms':>10} {'QPS':>9} {'ms/query':>9} {recall_k:>10}")
    all_ids = reader.ids()
    widths = all_ids % 100  # rows were added in id order from 0
    cases = [("none", None, all_ids)] + [
        (name, {"max_width": w}, all_ids[widths <= w]) for name, w in SELECTIVITY.items()
    ]
    for name, filters, keep in cases:
        t0 = time.perf_counter()  # SQLite -> id set, once per filter (then cached by the index object)
        if filters is not None:
            resolve(reader.store, SearchFilters.coerce(filters), reader.view_generation)
        resolve_ms = (time.perf_counter() - t0) * 1000
        per_query, found = _timed(
            lambda i, f=filters: reader.search(queries[i], args.k, filters=f)[0][0], len(queries)
        )
        truth = _filtered_truth(reader, queries, keep, args.k)
        recall = np.mean(
            [len(set(f.tolist()) & set(t.tolist())) / args.k for f, t in zip(found, truth, strict=True)]
        )
        qps, ms = 1 / per_query, per_query * 1000
        print(f"{name:10} {len(keep):10d} {resolve_ms:10.1f} {qps:9.0f} {ms:9.2f} {recall:10.4f}")
    print(f"{'mode':10} {'ms/query':>9}   (k={args.k}, text 'whiteboard meeting', one query at a time)")
    for mode in ("vector", "keyword", "hybrid"):
        per_query, _ = _timed(
            lambda i, m=mode: hybrid.search(
                reader, k=args.k, mode=m, vector=queries[i], text="whiteboard meeting"
            ),
            min(len(queries), 100),
        )
        print(f"{mode:10} {per_query * 1000:9.2f}")
    reader.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--types", default="flat,ivf-pq,hnsw", help=f"comma-separated, from {fx.INDEX_TYPES}")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--rerank-factor", type=int, default=None, help="PQ exact re-scoring pool, x k")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--batch", type=int, default=64, help="queries per search call")
    p.add_argument("--nprobe", type=int, default=None)
    p.add_argument("--ef-search", type=int, default=None)
    p.add_argument("--memory-budget", type=int, default=8, help="GiB (auto type)")
    p.add_argument("--threads", type=int, default=None, help="FAISS OpenMP threads")
    p.add_argument("--workdir", default=None, help="where to build (default: a temp dir)")
    p.add_argument("--filters", action="store_true", help="benchmark filtered and hybrid search instead")
    p.add_argument("--rows", type=int, default=1_000_000, help="rows of the --filters benchmark")
    args = p.parse_args()
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    queries = next(clustered(args.queries, args.dim, args.clusters, seed=99))
    work = Path(tempfile.mkdtemp(prefix="bench_index_", dir=args.workdir))
    print(f"n={args.n} dim={args.dim} clusters={args.clusters} queries={args.queries} k={args.k} "
          f"batch={args.batch} faiss_gpus={fx.gpu_count()} "
          f"omp_threads={faiss.omp_get_max_threads()}")  # fmt: skip
    if args.filters:
        for kind in args.types.split(","):
            bench_filters(kind.strip(), args, queries, work)
        shutil.rmtree(work)
        return
    results = []
    for kind in args.types.split(","):
        results.append(bench(kind.strip(), args, queries, work))
    truth = ground_truth(results[0]["folder"], queries, args.k)
    header = (
        f"{'type':8} {'factory':24} {'build s':>9} {'faiss MB':>9} {'+RSS MB':>8} {'QPS':>9} {'ms/query':>9} "
    )
    print(header + f"{'recall@' + str(args.k):>10}")
    for r in results:
        rec = np.mean([len(set(f) & set(t)) / args.k for f, t in zip(r["found"], truth, strict=True)])
        print(f"{r['type']:8} {r['factory']:24} {r['build_s']:9.1f} {r['faiss_mb']:9.0f} {r['rss_mb']:8.0f} "
              f"{r['qps']:9.0f} {r['latency_ms']:9.2f} {rec:10.4f}")  # fmt: skip
    shutil.rmtree(work)
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MB")


if __name__ == "__main__":
    main()
