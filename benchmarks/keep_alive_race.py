"""The keep-alive race between a uvicorn server and httpx clients, reproduced: how many requests fail when a client
reuses a pooled connection at about the moment the server closes it as idle.

    python benchmarks/keep_alive_race.py [--clients 60] [--spread-ms 40] [--server-keep-alive 5 75]

For each server keep-alive timeout in turn, a uvicorn server (a minimal ASGI app, in a thread of this process)
listens on a free port of 127.0.0.1 and ``--clients`` clients, each an ``httpx.AsyncClient`` with httpx's default
pool (idle connections kept 5 s), each send one request, wait 5 s minus an offset spread evenly over
``--spread-ms`` milliseconds on both sides of 5 s (clients whose wait passes the pool's own expiry open a new
connection), and send a second request on the pooled connection. Printed per timeout: the second requests that
failed, by exception type. ``clipforge serve`` keeps idle connections 75 s (``--keep-alive``), above the clients'
5 s, so it never closes a connection a client still holds as reusable.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import threading
import time


async def _app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    await receive()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"ok"})


async def _client(url: str, wait_s: float) -> str | None:
    import httpx

    async with httpx.AsyncClient() as client:
        (await client.get(url)).raise_for_status()
        await asyncio.sleep(wait_s)
        try:
            (await client.get(url)).raise_for_status()
        except httpx.HTTPError as e:
            return type(e).__name__
    return None


async def _round(url: str, clients: int, spread_s: float, expiry_s: float) -> list[str | None]:
    waits = [expiry_s - spread_s + 2 * spread_s * i / max(1, clients - 1) for i in range(clients)]
    return await asyncio.gather(*(_client(url, w) for w in waits))


def race(keep_alive: float, clients: int, spread_ms: float) -> collections.Counter:
    """Failures of the second requests against a uvicorn server with ``timeout_keep_alive=keep_alive``."""
    import httpx
    import uvicorn

    from clipforge.train.distributed import free_port

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(_app, host="127.0.0.1", port=port, log_level="error",
                                           timeout_keep_alive=keep_alive))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        expiry = httpx.Limits().keepalive_expiry
        results = asyncio.run(_round(f"http://127.0.0.1:{port}/", clients, spread_ms / 1000, expiry))
    finally:
        server.should_exit = True
        thread.join(10)
    return collections.Counter(r or "ok" for r in results)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=60, help="clients per server setting (default 60)")
    ap.add_argument("--spread-ms", type=float, default=40.0,
                    help="their waits spread over 5 s +- this many milliseconds (default 40)")
    ap.add_argument("--server-keep-alive", type=int, nargs="+", default=[5, 75], metavar="SECONDS",
                    help="the server timeouts to try, in turn (default: uvicorn's 5, clipforge serve's 75)")
    args = ap.parse_args()
    print(f"{args.clients} clients, waits 5 s +- {args.spread_ms:g} ms\n")
    print("| server keep-alive s | second requests | failed | failures by type |")
    print("|---:|---:|---:|---|")
    for keep_alive in args.server_keep_alive:
        counts = race(keep_alive, args.clients, args.spread_ms)
        failed = {k: v for k, v in counts.items() if k != "ok"}
        print(f"| {keep_alive} | {sum(counts.values())} | {sum(failed.values())} | "
              f"{', '.join(f'{k} {v}' for k, v in sorted(failed.items())) or '-'} |", flush=True)


if __name__ == "__main__":
    main()
