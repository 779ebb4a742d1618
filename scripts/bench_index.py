#!/usr/bin/env python
"""Benchmark index types on clustered synthetic vectors: build time, memory, queries/s, recall@10.

    python scripts/bench_index.py [--n 1000000] [--dim 768] [--types flat,ivf-pq,hnsw] [--queries 1000]

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
    args = p.parse_args()
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    queries = next(clustered(args.queries, args.dim, args.clusters, seed=99))
    work = Path(tempfile.mkdtemp(prefix="bench_index_", dir=args.workdir))
    print(f"n={args.n} dim={args.dim} clusters={args.clusters} queries={args.queries} k={args.k} "
          f"batch={args.batch} faiss_gpus={fx.gpu_count()} "
          f"omp_threads={faiss.omp_get_max_threads()}")  # fmt: skip
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
