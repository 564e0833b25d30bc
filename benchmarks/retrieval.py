"""Memory bank benchmark: build time, index size, queries per second and recall@k against exact search.

Clustered 512-d unit vectors stand in for CLIP document embeddings (real ones are far from uniform on the sphere:
captions and images of one topic crowd together, which is what makes approximate indexes lose recall). For each bank
size and faiss factory string the script builds a :class:`~cm3leon_lightning.retrieval.index.MemoryBank`, searches
with held-out queries from the same distribution, and compares with exact numpy search.

    python benchmarks/retrieval.py                       # 100k vectors: Flat, IVF-PQ, IVF-SQ8, HNSW
    python benchmarks/retrieval.py --sizes 100000 1000000  # and 1M (about 5 GB of RAM, minutes on 2 cores)

Prints one row per (size, index, search setting); ``--json`` writes them to a file as well.
"""

from __future__ import annotations

import argparse
import json
import time

import faiss
import numpy as np

from cm3leon_lightning.retrieval.index import MemoryBank


def clustered(
    n: int, dim: int, n_clusters: int, spread: float, seed: int, point_seed: int, chunk: int = 100_000
) -> np.ndarray:
    """``n`` unit vectors around ``n_clusters`` random unit centres (Gaussian noise of std ``spread`` per dim).

    The centres depend on ``seed`` only, so bank and queries (other ``point_seed``) share clusters; ``chunk`` bounds
    the temporaries.
    """
    centres = np.random.default_rng(seed).standard_normal((n_clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    rng = np.random.default_rng(point_seed)
    out = np.empty((n, dim), np.float32)
    for i in range(0, n, chunk):
        m = min(chunk, n - i)
        x = centres[rng.integers(n_clusters, size=m)] + spread * rng.standard_normal((m, dim), dtype=np.float32)
        out[i : i + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def exact_topk(bank: np.ndarray, queries: np.ndarray, k: int, chunk: int = 100_000) -> np.ndarray:
    """Exact top-k ids by inner product with numpy, in bank chunks (bounded memory). Returns ``(Q, k)``."""
    best_s = np.full((len(queries), k), -np.inf, np.float32)
    best_i = np.zeros((len(queries), k), np.int64)
    for i in range(0, len(bank), chunk):
        s = queries @ bank[i : i + chunk].T  # (Q, c)
        top = np.argpartition(-s, k - 1, axis=1)[:, :k]
        cand_s = np.concatenate([best_s, np.take_along_axis(s, top, 1)], axis=1)
        cand_i = np.concatenate([best_i, top + i], axis=1)
        order = np.argsort(-cand_s, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(cand_s, order, 1), np.take_along_axis(cand_i, order, 1)
    return best_i


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of the true top-k found in the returned top-k."""
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def run(size: int, factories: list[str], args: argparse.Namespace) -> list[dict[str, object]]:
    """Benchmark every factory on one bank size; returns the result rows."""
    t0 = time.perf_counter()
    x = clustered(size, args.dim, args.clusters, args.spread, args.seed, point_seed=1)
    q = clustered(args.queries, args.dim, args.clusters, args.spread, args.seed, point_seed=2)  # held out
    gen_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    truth = exact_topk(x, q, args.k)
    exact_s = time.perf_counter() - t0
    print(f"# n={size:,}: data {gen_s:.1f}s, numpy exact search of {args.queries} queries {exact_s:.1f}s", flush=True)
    keys = [f"d{i}" for i in range(size)]
    rows = []
    for factory in factories:
        factory = factory.replace("{nlist}", str(args.nlist or max(64, int(4 * np.sqrt(size)) // 64 * 64)))
        t0 = time.perf_counter()
        bank = MemoryBank(args.dim, "bench", factory=factory)
        if not bank.is_trained:
            sample = x[np.random.default_rng(0).choice(size, min(size, args.train_size), replace=False)]
            bank.train(sample)
        bank.add(x, keys)
        build_s = time.perf_counter() - t0
        nbytes = faiss.serialize_index(bank.index).nbytes
        settings = [("-", {})]
        if "IVF" in factory:
            settings = [(f"nprobe={p}", {"nprobe": p}) for p in args.nprobe]
        elif "HNSW" in factory:
            settings = [(f"efSearch={e}", {"ef_search": e}) for e in args.ef_search]
        for label, params in settings:
            bank.set_search_params(**params)
            bank.search(q[:10], args.k)  # warm-up
            t0 = time.perf_counter()
            res = bank.search(q, args.k)
            search_s = time.perf_counter() - t0
            row = {
                "n": size,
                "index": factory,
                "search": label,
                "build_s": round(build_s, 1),
                "index_MiB": round(nbytes / 2**20, 1),
                "qps": round(len(q) / search_s, 1),
                f"recall@{args.k}": round(recall_at_k(res.ids, truth), 4),
            }
            rows.append(row)
            print(
                f"{size:>9,} {factory:<16} {label:<13} build {row['build_s']:>7.1f}s  {row['index_MiB']:>8.1f} MiB  "
                f"{row['qps']:>9.1f} q/s  recall@{args.k} {row[f'recall@{args.k}']:.4f}",
                flush=True,
            )
        del bank
    return rows


def check_counts(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """An argparse error naming the first count out of range (``--queries 0`` printed recall ``nan`` at 0 q/s and
    exited 0; a bank smaller than ``--k`` failed in numpy)."""
    lows = {"--sizes": 1, "--dim": 1, "--queries": 1, "--k": 1, "--clusters": 1, "--nlist": 0, "--nprobe": 1,
            "--ef-search": 1, "--train-size": 1, "--threads": 0}  # fmt: skip
    for flag, low in lows.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if min(value if isinstance(value, list) else [value]) < low:
            p.error(f"argument {flag}: must be >= {low}, got {value}")
    if min(args.sizes) < args.k:
        p.error(f"argument --sizes: every bank needs at least --k {args.k} vectors, got {args.sizes}")


def main() -> None:
    """Parse arguments and run the benchmark."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000], help="bank sizes (add 1000000 for 1M)")
    p.add_argument("--factories", nargs="+", default=["Flat", "IVF{nlist},PQ64", "IVF{nlist},SQ8", "HNSW32"])
    p.add_argument(
        "--large-factories", nargs="+", default=["Flat", "IVF{nlist},PQ64", "IVF{nlist},SQ8"], help="for sizes > 200k"
    )
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--spread", type=float, default=0.03, help="noise std per dimension around a cluster centre")
    p.add_argument("--nlist", type=int, default=0, help="IVF lists; 0: about 4*sqrt(n)")
    p.add_argument("--nprobe", type=int, nargs="+", default=[8, 32])
    p.add_argument("--ef-search", type=int, nargs="+", default=[64, 128])
    p.add_argument(
        "--train-size", type=int, default=32_768, help="rows sampled to train IVF/PQ (PQ training dominates the build)"
    )
    p.add_argument("--threads", type=int, default=0, help="faiss OpenMP threads; 0 keeps faiss's default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="", help="also write the rows to this JSON file")
    args = p.parse_args()
    check_counts(p, args)
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    print(f"# faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads, dim {args.dim}, k {args.k}")
    rows = []
    for size in args.sizes:
        rows += run(size, args.factories if size <= 200_000 else args.large_factories, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
        print(f"# wrote {args.json}")


if __name__ == "__main__":
    main()
