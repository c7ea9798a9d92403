"""Load test of ``clipforge serve``: mixed requests from many concurrent clients, latency per kind, errors, RSS.

Starts ``clipforge serve`` as a subprocess on 127.0.0.1 (a free port) over an index, then for
each client count runs ``--requests`` requests (or stops after ``--max-seconds``) from that many
concurrent asyncio clients (httpx), each picking its next request at random from a fixed mix:

- ``text``: ``GET /search?q=...`` (a random shapes caption), k=10
- ``upload``: ``POST /search/image`` with a PNG (a shapes render not in the index), k=10
- ``similar``: ``GET /search/similar/ID``, k=10
- ``thumb``: ``GET /image/ID?size=S`` with a random id and size (so most are decoded, not cached)

Reported per client count and kind: requests, p50 and p99 latency (ms) as the clients see it, the
server's own time for the same requests (the ``took_ms`` its JSON answers carry: from the handler's
start to its answer, so batching waits and search included, HTTP and queueing before the handler
not; thumbnails carry none), errors (any answer but 200, counted by status, and failed
connections), the CPU seconds the clients (this process) and the server (all its processes) used
during the level, and the server's RSS before the first level, after each level, and its peak
(VmHWM), from ``/proc/PID/status``. The clients share the machine with the server: where the two
latencies differ by more than the server's time, the requests waited in HTTP handling, in a queue
or for a CPU. ``--trace CSV`` writes every request (start time in its level, latency, the server's
time) to see when the slow ones happen. The clients' process freezes its start-up objects
(:func:`gc.freeze`) before the levels, so that its own garbage collections do not count as latency.

Without ``--index``, the index is built first: ``--images`` shapes renders (``--image-size``
px) embedded by ``tiny`` with random weights (latency does not depend on what a model learned).
``--pad-to N`` then grows that index to N rows with synthetic embeddings clustered around the real
ones (:func:`pad_index`), to load-test search over a large collection without embedding N images;
``--ann hnsw`` (or ivf, ivfpq, auto) gives the padded index an approximate search index, built and
tuned as ``clipforge index --index KIND`` does, in place of exact search.
Nothing leaves 127.0.0.1; request counts and durations are bounded.

    nice python benchmarks/bench_serve_load.py [--clients 20 50] [--requests 600] [--max-seconds 60] \
        [--pad-to 100000 [--ann hnsw]] [--mix text=1]
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import io
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

MIX = {"text": 0.4, "upload": 0.2, "similar": 0.2, "thumb": 0.2}


def _descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (``--workers`` processes and their helpers), from /proc's children lists."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:  # exited meanwhile
            continue
    return found


def rss_mb(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM in MB summed over the server's processes (the peak sum is an upper bound of the peak)."""
    out = {"VmRSS": 0.0, "VmHWM": 0.0}
    for p in _descendants(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith(("VmRSS:", "VmHWM:")):
                        out[line.split(":")[0]] += int(line.split()[1]) / 1024
        except OSError:
            continue
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and every process below it, from ``/proc/PID/stat``."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for p in _descendants(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime (fields 14 and 15 of proc(5))
    return total


def build_index(root: Path, n: int, image_size: int) -> Path:
    """``n`` shapes renders in ``root/images``, indexed by a random ``tiny`` saved in ``root/model``."""
    from PIL import Image

    import clipforge
    from clipforge.data.shapes import ShapesGenerator
    from clipforge.models import save_model
    from clipforge.serve import build_index as build
    from clipforge.serve import scan_folders

    model_dir = save_model(clipforge.create_model("tiny", seed=0), root / "model")
    images = root / "images"
    images.mkdir(parents=True)
    gen = ShapesGenerator("val", seed=0, image_size=image_size)
    for i in range(n):
        Image.fromarray(gen.sample(i).image).save(images / f"img{i:04d}.png")
    model, _, preprocess = clipforge.load(model_dir)
    cands, roots = scan_folders([images])
    build(model, preprocess, root / "index", cands, model_source=model_dir, folder_roots=roots,
          source={"kind": "images", "paths": [str(r) for r in roots]}, progress=False)
    return root / "index"


def pad_index(index: Path, total: int, seed: int = 0, ann: str = "flat") -> None:
    """Grow a built index to ``total`` rows with synthetic embeddings (benchmark only: search cost
    depends on the row count, not on what the rows show). Row ``i`` >= the real count copies the
    metadata of real image ``j = i mod real`` (so thumbnails and similar-item searches still
    resolve to a file) under a new key, and its embedding is real embedding ``j`` plus Gaussian
    noise of norm ~0.5, normalized: clusters around real images, not i.i.d. vectors.

    ``ann``: the search index over all ``total`` rows (``flat``: exact search; ``hnsw``, ``ivf``,
    ``ivfpq``, ``auto``), built and tuned to clipforge's recall target by the same
    :func:`clipforge.serve.index.update_ann` that ``clipforge index --index KIND`` uses."""
    import pyarrow.parquet as pq

    manifest = json.loads((index / "manifest.json").read_text())
    emb = np.load(index / "embeddings.npy")
    real = emb.shape[0]
    if total <= real:
        return
    rng = np.random.default_rng(seed)
    src = np.arange(real, total) % real
    noise = rng.standard_normal((total - real, emb.shape[1])).astype(np.float32) * (0.5 / np.sqrt(emb.shape[1]))
    extra = emb[src].astype(np.float32) + noise
    extra /= np.linalg.norm(extra, axis=1, keepdims=True)
    vectors = np.concatenate([emb, extra.astype(emb.dtype)])
    np.save(index / "embeddings.npy", vectors)
    table = pq.read_table(index / "metadata.parquet").to_pydict()
    for col, values in table.items():
        copied = [values[j] for j in src]
        if col == "id":
            copied = list(range(real, total))
        elif col == "key":
            copied = [f"{values[j]}#synthetic{i}" for i, j in zip(range(real, total), src)]
        table[col] = values + copied
    import pyarrow as pa

    schema = pq.read_schema(index / "metadata.parquet")
    pq.write_table(pa.table(table, schema=schema), index / "metadata.parquet")
    manifest["count"] = total
    if ann != "flat":
        import faiss

        from clipforge.serve.ann import ANN_FILE, RECALL_TARGET
        from clipforge.serve.index import update_ann

        ann_index, record = update_ann(index, vectors, None,
                                       {"index": ann, "max_memory": None, "recall_target": RECALL_TARGET})
        if ann_index is not None:
            faiss.write_index(ann_index, str(index / ANN_FILE))
        manifest["ann"] = record
    (index / "manifest.json").write_text(json.dumps(manifest, indent=2))


def query_material(n_uploads: int, image_size: int):
    from PIL import Image

    from clipforge.data.shapes import ShapesGenerator

    gen = ShapesGenerator("train", seed=123, image_size=image_size)  # other images than the index's
    uploads, captions = [], []
    for i in range(n_uploads):
        s = gen.sample(i)
        buf = io.BytesIO()
        Image.fromarray(s.image).save(buf, "PNG")
        uploads.append(buf.getvalue())
        captions.append(s.captions[0])
    return uploads, captions


async def run_level(base: str, clients: int, requests: int, max_seconds: float, count: int, uploads, captions,
                    seed: int, mix: dict[str, float] | None = None) -> tuple[dict, float]:
    import httpx

    rng = random.Random(seed)
    mix = MIX if mix is None else mix
    kinds = list(mix)
    plan = rng.choices(kinds, weights=[mix[k] for k in kinds], k=requests)
    results: dict[str, list] = defaultdict(list)  # kind -> [(seconds, status, server ms or None, start s)]
    next_i = 0
    deadline = time.monotonic() + max_seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as http:
        async def one(kind: str, r: random.Random):
            if kind == "text":
                return await http.get("/search", params={"q": r.choice(captions), "k": 10})
            if kind == "upload":
                return await http.post("/search/image", params={"k": 10},
                                       files={"file": ("q.png", r.choice(uploads), "image/png")})
            if kind == "similar":
                return await http.get(f"/search/similar/{r.randrange(count)}", params={"k": 10})
            return await http.get(f"/image/{r.randrange(count)}", params={"size": r.choice((64, 96, 128, 160))})

        async def client(c: int):
            nonlocal next_i
            r = random.Random(seed * 1000 + c)
            while next_i < len(plan) and time.monotonic() < deadline:
                kind = plan[next_i]
                next_i += 1
                t0 = time.perf_counter()
                server_ms = None
                try:
                    answer = await one(kind, r)
                    status = answer.status_code
                    if status == 200 and kind != "thumb":
                        server_ms = answer.json().get("took_ms")
                except httpx.HTTPError as e:
                    status = type(e).__name__
                results[kind].append((time.perf_counter() - t0, status, server_ms, t0 - level_t0))

        level_t0 = t0 = time.perf_counter()  # the requests' start times in the trace count from here
        await asyncio.gather(*(client(c) for c in range(clients)))
        return results, time.perf_counter() - t0


TRACE_COLUMNS = ["clients", "kind", "start_s", "latency_ms", "server_ms", "status"]


def trace_rows(clients: int, results: dict[str, list]) -> list[tuple]:
    """One ``--trace`` row per request of a level's ``results`` (as :func:`run_level` returns them), in the order
    the requests started."""
    rows = [(clients, kind, f"{start:.4f}", f"{sec * 1000:.2f}", "" if own is None else own, status)
            for kind, res in results.items() for sec, status, own, start in res]
    return sorted(rows, key=lambda row: float(row[2]))


def write_trace(path: Path, rows: list[tuple]) -> None:
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(TRACE_COLUMNS)
        w.writerows(rows)


def table(rows: list[list[str]], header: list[str]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def parse_mix(text: str) -> dict[str, float]:
    """``text=0.4,upload=0.2,...`` (kinds of MIX, non-negative weights, at least one positive)."""
    mix = {}
    for part in text.split(","):
        kind, _, weight = part.partition("=")
        if kind.strip() not in MIX:
            raise argparse.ArgumentTypeError(f"unknown request kind {kind.strip()!r}; kinds: {', '.join(MIX)}")
        try:
            mix[kind.strip()] = float(weight)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r} is not KIND=WEIGHT") from None
    if any(w < 0 for w in mix.values()) or not any(w > 0 for w in mix.values()):
        raise argparse.ArgumentTypeError(f"weights must be >= 0 and one of them > 0, got {text!r}")
    return mix


def main() -> None:
    from clipforge.serve.ann import KINDS

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--index", help="serve this index (default: build one from shapes renders)")
    ap.add_argument("--images", type=int, default=300, help="images in the built index (default 300)")
    ap.add_argument("--image-size", type=int, default=256, help="side of the rendered images (default 256)")
    ap.add_argument("--pad-to", type=int, default=0, metavar="N",
                    help="grow the built index to N rows with synthetic embeddings around the real ones (pad_index)")
    ap.add_argument("--ann", default="flat", choices=KINDS,
                    help="with --pad-to: the search index over the padded rows, built and tuned as `clipforge index "
                         "--index KIND` does (default flat: exact search)")
    ap.add_argument("--clients", type=int, nargs="+", default=[20, 50], help="concurrent clients per level")
    ap.add_argument("--requests", type=int, default=600, help="requests per level (default 600)")
    ap.add_argument("--max-seconds", type=float, default=60, help="stop a level after this long (default 60)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mix", type=parse_mix, default=MIX,
                    help="request kinds and weights, e.g. text=1 for text queries only (default "
                         + ",".join(f"{k}={w:g}" for k, w in MIX.items()) + ")")
    ap.add_argument("--trace", type=Path, metavar="CSV",
                    help="write one row per request (clients, kind, start s into the level, latency ms, server ms, "
                         "status) to this CSV, to see when slow requests happen")
    ap.add_argument("--serve-args", nargs=argparse.REMAINDER, default=[],
                    help="more clipforge serve options, e.g. --decode-workers 4 (last on the line)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
        t0 = time.perf_counter()
        index = Path(args.index) if args.index else build_index(Path(tmp), args.images, args.image_size)
        if args.pad_to:
            if args.index:
                raise SystemExit("--pad-to grows the index this script builds; leave out --index")
            pad_index(index, args.pad_to, args.seed, ann=args.ann)
        elif args.ann != "flat":
            raise SystemExit("--ann builds the search index of a padded index; give --pad-to N too")
        from clipforge.serve import open_index
        from clipforge.train.distributed import free_port

        count = len(open_index(index))
        print(f"index {index}: {count} images (ready in {time.perf_counter() - t0:.1f} s)", file=sys.stderr)
        uploads, captions = query_material(32, args.image_size)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "clipforge.cli.main", "serve", str(index), "--port", str(port),
               "--log-level", "warning", *args.serve_args]
        server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            import httpx

            deadline = time.monotonic() + 120
            while True:
                if server.poll() is not None:
                    raise SystemExit(f"clipforge serve exited: {server.stderr.read()[-2000:]}")
                try:
                    if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit("clipforge serve did not answer /health within 120 s")
                time.sleep(0.2)
            health = httpx.get(f"{base}/health", timeout=10).json()
            # one request of each kind, so that first-call costs are not in the numbers
            asyncio.run(run_level(base, 1, len(MIX) * 3, 30, count, uploads, captions, seed=99))
            # The load generator's own full garbage collections (it imported torch and built the index: ~100-130 ms
            # each, measured with gc.callbacks) would stall every client's reading of its answer and count as
            # server latency; freeze what it holds now, as `clipforge serve` does for itself.
            gc.collect()
            gc.freeze()
            before = rss_mb(server.pid)
            rows, rss_rows = [], [["before", f"{before['VmRSS']:.0f}", f"{before['VmHWM']:.0f}"]]
            trace = [] if args.trace else None
            for clients in args.clients:
                cpu0, server_cpu0 = os.times(), cpu_seconds(server.pid)
                results, took = asyncio.run(run_level(base, clients, args.requests, args.max_seconds, count, uploads,
                                                      captions, seed=args.seed + clients, mix=args.mix))
                cpu1, server_cpu = os.times(), cpu_seconds(server.pid) - server_cpu0
                client_cpu = cpu1.user + cpu1.system - cpu0.user - cpu0.system
                after = rss_mb(server.pid)
                rss_rows.append([f"after {clients} clients", f"{after['VmRSS']:.0f}", f"{after['VmHWM']:.0f}"])
                total = sum(len(v) for v in results.values())
                if trace is not None:
                    trace += trace_rows(clients, results)
                for kind in args.mix:
                    res = results.get(kind, [])
                    if not res:
                        continue
                    ms = np.array([t for t, *_ in res]) * 1000
                    own = np.array([m for _, _, m, _ in res if m is not None], dtype=float)
                    errors = Counter(str(s) for _, s, *_ in res if s != 200)
                    rows.append([str(clients), kind, str(len(res)), f"{np.percentile(ms, 50):.0f}",
                                 f"{np.percentile(ms, 99):.0f}",
                                 f"{np.percentile(own, 50):.0f} / {np.percentile(own, 99):.0f}" if len(own) else "",
                                 ", ".join(f"{n} x {s}" for s, n in sorted(errors.items())) or "0"])
                rows.append([str(clients), "**all**", str(total), "", "", "",
                             f"{total / took:.1f} req/s in {took:.1f} s; CPU s: clients {client_cpu:.1f}, "
                             f"server {server_cpu:.1f}"])
            if trace is not None:
                write_trace(args.trace, trace)
        finally:
            server.terminate()
            try:
                server.wait(20)
            except subprocess.TimeoutExpired:
                server.kill()
    print(f"\nclipforge serve over {count} images ({health['backend']} search, {health['dim']}-d), mix "
          + ",".join(f"{k}={w:g}" for k, w in args.mix.items()) + ", "
          f"{platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end\n")
    print(table(rows, ["clients", "kind", "requests", "p50 ms", "p99 ms", "server p50 / p99 ms", "errors (non-200)"]))
    print()
    print(table(rss_rows, ["server (all its processes)", "RSS MB", "peak RSS MB"]))


if __name__ == "__main__":
    main()
