"""Load test of the service on loopback with Locust: throughput and latency at 1, 8 and 32 clients.

    .venv/bin/python tools/lock.py install -e '.[bench]'   # uv pip install -c requirements.lock
    BENTOML_HOME=$PWD/.bentoml .venv/bin/python bench/load_service.py \
        --image data/raw/synthetic/images/test/test_000000.png
    .venv/bin/python bench/load_service.py --image ... --model artifacts/cir_cot_model/runs/<key>/model

``--model`` serves a saved model (a folder ``CirCoTModel.save`` wrote) instead: it is promoted in a
temporary model store and the test split of ``--gallery`` indexed for it.

Serves the production model of ``--dataset`` (it and its gallery index must exist: ``make run``
makes them when the gate promotes; docs/troubleshooting.md) on 127.0.0.1, once with adaptive batching
and once without (``CIRCOT_ADAPTIVE_BATCHING=0``: the encoder takes one request at a time), and runs
headless Locust against ``/embed_image``, no-CoT ``/search`` and CoT ``/search`` for ``--seconds``
per setting (bounded in time; nothing but loopback is contacted). Prints requests/s, p50/p95/p99,
failures and, per endpoint and client count, the throughput with batching over without.
"""

import argparse
import csv
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(env: dict, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bentoml", "serve", "serving.service:CirCoTService", "--host",
                             "127.0.0.1", "--port", str(port)], cwd=REPO, env=env, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=5) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            pass
        time.sleep(1)
    proc.kill()
    raise SystemExit(f"the service did not become ready; see {log}")


SETUP = """
import sys
from model_code import registry
from model_code.data import read_dataset
from model_code.index import GalleryImage, GalleryIndex
from model_code.model.cir_cot import CirCoTModel
model_dir, root, index_uri, dataset = sys.argv[1:5]
m = CirCoTModel.load(model_dir, device="cpu")
registry.promote(model_dir, version=m.version, dataset=dataset, labels={})
bench = read_dataset(dataset, root)
test = bench.images[bench.images.split == "test"]
images = [GalleryImage(i, "test", root + "/" + p) for i, p in zip(test.image_id, test.path)]
GalleryIndex(index_uri, dataset).build(lambda ps: m.embed_images(ps), images, model_version=m.version)
"""


def setup_store(model: str, gallery: str, dataset: str, workdir: Path) -> dict:
    """A temporary model store with ``model`` in production and its index: the environment to serve them."""
    env = {**os.environ, "BENTOML_HOME": str(workdir / "bentoml"), "CIRCOT_INDEX_URI": str(workdir / "lancedb"),
           "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", SETUP, str(Path(model).resolve()), str(Path(gallery).resolve()),
                    str(workdir / "lancedb"), dataset], cwd=REPO, env=env, check=True)
    return env


def locust(url: str, target: str, users: int, seconds: int, image: str, workdir: Path) -> dict:
    prefix = workdir / f"{target}-{users}"
    env = {**os.environ, "LOAD_TARGET": target, "LOAD_IMAGE": image}
    subprocess.run([sys.executable, "-m", "locust", "-f", str(REPO / "bench" / "locustfile.py"), "--headless",
                    "-u", str(users), "-r", str(users), "-t", f"{seconds}s", "--host", url, "--csv", str(prefix),
                    "--only-summary", "--stop-timeout", "30"], env=env, capture_output=True, text=True,
                   timeout=seconds + 120)
    with open(f"{prefix}_stats.csv") as f:
        total = next(r for r in csv.DictReader(f) if r["Name"] == "Aggregated")
    return {"rps": float(total["Requests/s"]), "p50": float(total["50%"]), "p95": float(total["95%"]),
            "p99": float(total["99%"]), "n": int(total["Request Count"]), "failures": int(total["Failure Count"])}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image", required=True, help="a reference image to upload")
    p.add_argument("--dataset", default="synthetic")
    p.add_argument("--users", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--seconds", type=int, default=20)
    p.add_argument("--targets", nargs="+", default=["embed_image", "search_no_cot", "search_cot"],
                   help="what to load: embed_image, search_no_cot, search_cot")
    p.add_argument("--model", help="serve this saved model (promoted in a temporary store) instead")
    p.add_argument("--gallery", default="data/raw/synthetic", help="with --model: the dataset folder to index")
    p.add_argument("--cot-users", type=int, nargs="+", default=[1, 8], help="client counts of search_cot")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    workdir = Path(tempfile.mkdtemp())
    base_env = setup_store(args.model, args.gallery, args.dataset, workdir) if args.model else dict(os.environ)
    rows = []
    for batching in ("1", "0"):
        env = {**base_env, "CIRCOT_ADAPTIVE_BATCHING": batching, "CIRCOT_SERVE_DATASET": args.dataset,
               "PYTHONPATH": str(REPO)}
        proc, url = serve(env, workdir / f"serve-{batching}.log")
        try:
            for target in args.targets:
                for users in args.cot_users if target == "search_cot" else args.users:
                    rows.append((target, "on" if batching == "1" else "off", users,
                                 locust(url, target, users, args.seconds, args.image, workdir)))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    print(summary(rows))
    return 0


def summary(rows: list[tuple[str, str, int, dict]]) -> str:
    """The closing table, a row per (endpoint, batching "on"/"off", clients, :func:`locust`'s figures), and
    per endpoint and client count measured both ways, the throughput with batching over without."""
    lines = ["\n| endpoint | adaptive batching | clients | requests/s | p50 ms | p95 ms | p99 ms | requests "
             "| failures |", "|---|---|---|---|---|---|---|---|---|"]
    for target, batching, users, r in rows:
        lines.append(f"| {target} | {batching} | {users} | {r['rps']:.1f} | {r['p50']:.0f} | {r['p95']:.0f} "
                     f"| {r['p99']:.0f} | {r['n']} | {r['failures']} |")
    on = {(t, u): r["rps"] for t, b, u, r in rows if b == "on"}
    off = {(t, u): r["rps"] for t, b, u, r in rows if b == "off"}
    for t, u in sorted(on.keys() & off.keys()):
        lines.append(f"# {t}, {u} clients: batching on / off = {on[t, u] / max(off[t, u], 1e-9):.2f}x")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
