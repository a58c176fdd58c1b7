"""Load test of the service on loopback with Locust: throughput and latency at 1, 8 and 32 clients, or with
CoT and no-CoT clients together.

    .venv/bin/python tools/lock.py install -e '.[bench]'   # uv pip install -c requirements.lock
    BENTOML_HOME=$PWD/.bentoml .venv/bin/python bench/load_service.py \
        --image data/raw/synthetic/images/test/test_000000.png
    .venv/bin/python bench/load_service.py --image ... --model artifacts/cir_cot_model/runs/<key>/model
    BENTOML_HOME=$PWD/.bentoml .venv/bin/python bench/load_service.py --image ... \
        --cot-users 4 --nocot-users 4 --seconds 60 --token t0k          # mixed traffic

``--model`` serves a saved model (a folder ``CirCoTModel.save`` wrote) instead: it is promoted in a
temporary model store and the test split of ``--gallery`` indexed for it. ``--url`` loads a service
already running (started by hand, or from another checkout) instead of starting one.

Serves the production model of ``--dataset`` (it and its gallery index must exist: ``make run``
makes them when the gate promotes; docs/troubleshooting.md) on 127.0.0.1 and runs headless Locust
against it (bounded in time; nothing but loopback is contacted):

- the sweep (the default): once with adaptive batching and once without
  (``CIRCOT_ADAPTIVE_BATCHING=0``: the model processes take one request at a time), ``/embed_image``,
  no-CoT ``/search`` and CoT ``/search`` for ``--seconds`` per setting and client count; prints
  requests/s, p50/p95/p99, failures and, per endpoint and client count, the throughput with batching
  over without;
- mixed traffic (``--nocot-users``): ``--cot-users`` clients asking CoT ``/search`` and
  ``--nocot-users`` asking no-CoT ``/search`` at the same time, each sending its next call as soon as
  the last is answered (``--honour-retry-after``: after a 503 it first waits the ``Retry-After`` given),
  for ``--seconds``; prints per class the calls, the 200s, the 503s, other answers, answers/s and the
  p50/p95/p99 latency of the answers (200s).
"""

import argparse
import contextlib
import csv
import math
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
    """``bentoml serve`` of the service on a free loopback port, once /readyz answers 200."""
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


def run_locust(args, url: str, users: int, prefix: Path, classes: list[str], env: dict) -> None:
    """Headless Locust: ``users`` of the user ``classes`` of bench/locustfile.py against ``url`` for
    ``args.seconds`` (its statistics in ``<prefix>_stats.csv``)."""
    env = {**os.environ, "LOAD_IMAGE": args.image, **({"LOAD_TOKEN": args.token} if args.token else {}), **env}
    out = subprocess.run([args.locust_python, "-m", "locust", "-f", str(REPO / "bench" / "locustfile.py"),
                          "--headless", "-u", str(users), "-r", str(users), "-t", f"{args.seconds}s", "--host", url,
                          "--csv", str(prefix), "--only-summary", "--stop-timeout", "30", *classes], env=env,
                         capture_output=True, text=True, timeout=args.seconds + 120)
    if not Path(f"{prefix}_stats.csv").exists():
        raise SystemExit(f"locust did not run (exit {out.returncode}): {out.stderr[-2000:]}")


def locust(args, url: str, target: str, users: int, workdir: Path) -> dict:
    """The sweep's figures of ``users`` clients calling ``target`` (the Aggregated row of Locust's statistics)."""
    prefix = workdir / f"{target}-{users}"
    run_locust(args, url, users, prefix, ["Client"], {"LOAD_TARGET": target})
    with open(f"{prefix}_stats.csv") as f:
        # the corrected clients' one CoT search each to set up is not theirs to count
        row = "/search corrected" if target == "search_corrected" else "Aggregated"
        total = next(r for r in csv.DictReader(f) if r["Name"] == row)
    return {"rps": float(total["Requests/s"]), "p50": float(total["50%"]), "p95": float(total["95%"]),
            "p99": float(total["99%"]), "n": int(total["Request Count"]), "failures": int(total["Failure Count"])}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image", required=True, help="a reference image to upload")
    p.add_argument("--dataset", default="synthetic")
    p.add_argument("--users", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--seconds", type=int, default=20)
    p.add_argument("--targets", nargs="+", default=["embed_image", "search_no_cot", "search_cot"],
                   help="what to load: embed_image, search_no_cot, search_cot, search_corrected (a corrected "
                        "chain: teacher-forced, no decoding)")
    p.add_argument("--model", help="serve this saved model (promoted in a temporary store) instead")
    p.add_argument("--gallery", default="data/raw/synthetic", help="with --model: the dataset folder to index")
    p.add_argument("--cot-users", type=int, nargs="+", default=[1, 8],
                   help="client counts of search_cot; with --nocot-users: the CoT clients of the mixed run (one count)")
    p.add_argument("--nocot-users", type=int,
                   help="mixed traffic: this many no-CoT /search clients together with --cot-users CoT clients")
    p.add_argument("--honour-retry-after", action="store_true",
                   help="mixed traffic: a client that gets a 503 waits its Retry-After before its next call")
    p.add_argument("--token", help="the bearer token: the service started is given it (CIRCOT_API_TOKEN), the "
                                   "clients send it")
    p.add_argument("--url", help="load the service running there instead of starting one (e.g. http://127.0.0.1:3100)")
    p.add_argument("--locust-python", default=sys.executable,
                   help="the Python that runs Locust (one with locust installed; default: this one)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.nocot_users is not None and len(args.cot_users) != 1:
        raise SystemExit("--nocot-users runs one mix: give --cot-users one count")
    workdir = Path(tempfile.mkdtemp())
    base_env = setup_store(args.model, args.gallery, args.dataset, workdir) if args.model else dict(os.environ)
    base_env = {**base_env, "CIRCOT_SERVE_DATASET": args.dataset, "PYTHONPATH": str(REPO),
                **({"CIRCOT_API_TOKEN": args.token} if args.token else {})}
    if args.nocot_users is not None:
        with served(args, base_env, workdir / "serve-mixed.log") as url:
            figures = mixed(args, url, workdir)
        print(mixed_summary(figures, args))
        return 0
    rows = []
    for batching in ("1", "0") if not args.url else ("",):
        with served(args, {**base_env, "CIRCOT_ADAPTIVE_BATCHING": batching}, workdir / f"serve-{batching}.log") as url:
            for target in args.targets:
                for users in args.cot_users if target == "search_cot" else args.users:
                    rows.append((target, {"1": "on", "0": "off", "": "as served"}[batching], users,
                                 locust(args, url, target, users, workdir)))
    print(summary(rows))
    return 0


@contextlib.contextmanager
def served(args, env: dict, log: Path):
    """The URL to load: ``--url``, else a server started with ``env`` (stopped on the way out)."""
    if args.url:
        yield args.url
        return
    proc, url = serve(env, log)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def mixed(args, url: str, workdir: Path) -> dict[str, dict]:
    """CoT and no-CoT clients together for ``args.seconds``: :func:`class_figures` of each class."""
    counts = {"CotUser": args.cot_users[0], "NoCotUser": args.nocot_users}
    record = workdir / "mixed-calls.tsv"
    env = {"LOAD_COT_USERS": str(counts["CotUser"]), "LOAD_NOCOT_USERS": str(counts["NoCotUser"]),
           "LOAD_RECORD": str(record), "LOAD_HONOUR_RETRY_AFTER": "1" if args.honour_retry_after else "0"}
    run_locust(args, url, sum(counts.values()), workdir / "mixed", [c for c, n in counts.items() if n], env)
    calls = [line.split("\t") for line in record.read_text().splitlines() if line.strip()]
    return class_figures([(name, int(status), float(seconds)) for name, status, seconds, _ in calls], args.seconds)


def class_figures(calls: list[tuple[str, int, float]], seconds: float) -> dict[str, dict]:
    """Per class (the request's name, ``/search cot``): calls, 200s, 503s, other answers (no answer
    counted as status 0), answers (200) per second of the run, and the p50/p95/p99 latency of the
    answers in ms (None without answers)."""
    import numpy as np

    out = {}
    for name in sorted({c[0] for c in calls}):
        mine = [(status, s) for n, status, s in calls if n == name]
        ok = [s for status, s in mine if status == 200]
        p50, p95, p99 = (float(v) for v in np.percentile(ok, [50, 95, 99]) * 1000) if ok else (None,) * 3
        out[name] = {"calls": len(mine), "ok": len(ok), "unavailable": sum(status == 503 for status, _ in mine),
                     "other": sum(status not in (200, 503) for status, _ in mine), "answers_s": len(ok) / seconds,
                     "p50": p50, "p95": p95, "p99": p99}
    return out


def mixed_summary(figures: dict[str, dict], args) -> str:
    """The closing table of a mixed run: a row per class, and the command's mix."""
    ms = lambda v: "-" if v is None or math.isnan(v) else f"{v:.0f}"  # noqa: E731
    lines = [f"\n{args.cot_users[0]} CoT + {args.nocot_users} no-CoT clients, {args.seconds} s"
             + (", honouring Retry-After" if args.honour_retry_after else ""),
             "| class | calls | 200 | 503 | other | 200 share | answers/s | p50 ms | p95 ms | p99 ms |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, f in figures.items():
        lines.append(f"| {name} | {f['calls']} | {f['ok']} | {f['unavailable']} | {f['other']} "
                     f"| {100 * f['ok'] / max(f['calls'], 1):.1f} % | {f['answers_s']:.2f} | {ms(f['p50'])} "
                     f"| {ms(f['p95'])} | {ms(f['p99'])} |")
    return "\n".join(lines)


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
