"""Load test of the service on loopback with Locust: throughput and latency at 1, 8 and 32 clients.

    .venv/bin/pip install -c constraints.txt -e '.[bench]'
    BENTOML_HOME=$PWD/.bentoml .venv/bin/python bench/load_service.py \
        --image data/raw/synthetic/images/test/test_000000.png

Serves the production model of ``--dataset`` (it and its gallery index must exist: ``make run``,
with the gate lowered for the tiny model as README shows) on 127.0.0.1, once with adaptive batching
and once without (``CIRCOT_ADAPTIVE_BATCHING=0``), and runs headless Locust against ``/embed_image``
and no-CoT ``/search`` for ``--seconds`` per setting (bounded in time; nothing but loopback is
contacted), then one client of CoT ``/search``. Prints requests/s, p50/p95/p99 and failures.
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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image", required=True, help="a reference image to upload")
    p.add_argument("--dataset", default="synthetic")
    p.add_argument("--users", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--seconds", type=int, default=20)
    p.add_argument("--targets", nargs="+", default=["embed_image", "search_no_cot", "search_cot"],
                   help="what to load: embed_image (with batching on and off), search_no_cot, search_cot (1 client)")
    args = p.parse_args()
    workdir = Path(tempfile.mkdtemp())
    rows = []
    for batching in ("1", "0"):
        env = {**os.environ, "CIRCOT_ADAPTIVE_BATCHING": batching, "CIRCOT_SERVE_DATASET": args.dataset,
               "PYTHONPATH": str(REPO)}
        proc, url = serve(env, workdir / f"serve-{batching}.log")
        try:
            targets = [t for t in args.targets if t != "search_cot" and (batching == "1" or t == "embed_image")]
            for target in targets:
                for users in args.users:
                    rows.append((target, "on" if batching == "1" else "off", users,
                                 locust(url, target, users, args.seconds, args.image, workdir)))
            if batching == "1" and "search_cot" in args.targets:
                rows.append(("search_cot", "on", 1, locust(url, "search_cot", 1, args.seconds, args.image, workdir)))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    print("\n| endpoint | adaptive batching | clients | requests/s | p50 ms | p95 ms | p99 ms | requests | failures |")
    print("|---|---|---|---|---|---|---|---|---|")
    for target, batching, users, r in rows:
        print(f"| {target} | {batching} | {users} | {r['rps']:.1f} | {r['p50']:.0f} | {r['p95']:.0f} | {r['p99']:.0f} "
              f"| {r['n']} | {r['failures']} |")
    on = {u: r["rps"] for t, b, u, r in rows if t == "embed_image" and b == "on"}
    off = {u: r["rps"] for t, b, u, r in rows if t == "embed_image" and b == "off"}
    for users in on.keys() & off.keys():
        print(f"# embed_image, {users} clients: batching on / off = {on[users] / max(off[users], 1e-9):.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
