"""The gallery index at scale: ANN (LanceDB) against exact search done well, on clustered vectors.

    .venv/bin/python bench/index_scale.py --n 1000000 --dim 256            # the tiny model's dimension
    .venv/bin/python bench/index_scale.py --n 100000 --dim 1536            # Qwen2-VL-2B's
    .venv/bin/python bench/index_scale.py --n 200000 --dim 256 --configs ivf_pq:1024:32:32:20   # one setting

Vectors are L2-normalised points of a mixture around ``--clusters`` centres (as real embeddings
cluster around concepts, not uniform noise); queries are fresh draws from the same mixture. The
baseline is exact search done well: every vector in memory, one matrix product and a top-k per query
(torch, float32), as ``model_code.index.exact_topk`` does for small galleries. For each ANN setting
(``type:partitions:sub_vectors:nprobes:refine``) it prints the build time, the query latency p50 /
p99 at k = 10 and 50 (one query at a time, as a service answers them), recall@10 against exact, and
the process's resident memory. Writes only to a temporary folder.
"""

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def clustered(rng, n: int, dim: int, centres: np.ndarray, spread: float) -> np.ndarray:
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        x = centres[rng.integers(0, len(centres), m)] + spread * rng.normal(size=(m, dim)).astype(np.float32)
        out[start:start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def percentiles(times: list[float]) -> tuple[float, float]:
    return float(np.percentile(times, 50) * 1000), float(np.percentile(times, 99) * 1000)


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--clusters", type=int, default=2000)
    p.add_argument("--spread", type=float, default=0.06, help="noise around a centre, per dimension")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--configs", nargs="+", default=["ivf_pq:1024:32:32:20", "ivf_pq:1024:32:64:40"],
                   help="type:partitions:sub_vectors:nprobes:refine (ivf_pq, or ivf_hnsw_sq: sub_vectors unused)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    import lancedb
    import pyarrow as pa
    import torch

    from model_code.index import AnnConfig

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(args.clusters, args.dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    t0 = time.perf_counter()
    vectors = clustered(rng, args.n, args.dim, centres, args.spread)
    queries = clustered(rng, args.queries, args.dim, centres, args.spread)
    print(f"# {args.n:,} x {args.dim} vectors around {args.clusters} centres, {args.queries} queries, "
          f"made in {time.perf_counter() - t0:.0f}s; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"lancedb {lancedb.__version__}")

    # exact search done well: in memory, one matrix product and a top-k per query
    g = torch.from_numpy(vectors)
    exact_top = {}
    times = {10: [], 50: []}
    for k in (10, 50):
        for i, q in enumerate(queries):
            start = time.perf_counter()
            top = torch.topk(g @ torch.from_numpy(q), k).indices
            times[k].append(time.perf_counter() - start)
            if k == 10:
                exact_top[i] = set(top.tolist())
    rows = [("exact (in-memory matmul + top-k)", "-", *percentiles(times[10]), *percentiles(times[50]), 1.0, rss_gib())]

    db = lancedb.connect(tempfile.mkdtemp())
    ids = np.arange(args.n)
    t0 = time.perf_counter()
    table = db.create_table("gallery", data=pa.table({
        "image_id": pa.array(ids.astype(str)),
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), args.dim)}))
    print(f"# table written in {time.perf_counter() - t0:.0f}s")
    flat = []
    for q in queries[:20]:
        start = time.perf_counter()
        table.search(q).distance_type("cosine").limit(10).to_arrow()
        flat.append(time.perf_counter() - start)
    rows.append(("lancedb flat scan (no index)", "-", *percentiles(flat), float("nan"), float("nan"), float("nan"),
                 rss_gib()))

    for spec in args.configs:
        kind, parts, subs, nprobes, refine = spec.split(":")
        ann = AnnConfig(index_type=kind.upper(), num_partitions=int(parts), num_sub_vectors=int(subs),
                        nprobes=int(nprobes), refine_factor=int(refine))
        t0 = time.perf_counter()
        ann.create(table, args.n, args.dim)
        build = time.perf_counter() - t0
        times = {10: [], 50: []}
        hits = 0
        for k in (10, 50):
            for i, q in enumerate(queries):
                start = time.perf_counter()
                found = (table.search(q).distance_type("cosine").nprobes(ann.nprobes).refine_factor(ann.refine_factor)
                         .select(["image_id", "_distance"]).limit(k).to_arrow())
                times[k].append(time.perf_counter() - start)
                if k == 10:
                    hits += len(exact_top[i] & {int(x) for x in found.column("image_id").to_pylist()})
        rows.append((f"{kind} partitions={parts} sub_vectors={subs} nprobes={nprobes} refine={refine}",
                     f"{build:.0f}", *percentiles(times[10]), *percentiles(times[50]), hits / (10 * len(queries)),
                     rss_gib()))

    print("\n| search | build s | p50 ms k=10 | p99 ms k=10 | p50 ms k=50 | p99 ms k=50 | recall@10 | peak RSS GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for name, build, a, b, c, d, recall, mem in rows:
        print(f"| {name} | {build} | {a:.1f} | {b:.1f} | {c:.1f} | {d:.1f} | {recall:.3f} | {mem:.1f} |")
    base = rows[0][2]
    for row in rows[2:]:
        print(f"# {row[0]}: p50 {base / row[2]:.1f}x below exact at recall@10 {row[6]:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
