"""Load on `convlad serve`: many concurrent clients on loopback, micro-batched against one query per
forward pass, measured in the same run (part ``serve`` of ``make bench``).

    python benchmarks/load.py INDEX [--clients 200] [--seconds 60]

Each client posts real photos to /api/search in a loop, for a fixed time and at most a fixed
number of requests (the loop stops by itself), only to 127.0.0.1.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _vm(pid: int, key: str) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    return float("nan")


async def _clients(url: str, photos: list[bytes], clients: int, seconds: float, max_requests: int) -> dict:
    import httpx

    latencies, errors, done = [], 0, 0
    stop = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=120) as client:
        async def one(cid: int):
            nonlocal errors, done
            rng = random.Random(cid)
            while time.monotonic() < stop and done < max_requests:
                done += 1
                data = photos[rng.randrange(len(photos))]
                t = time.perf_counter()
                try:
                    r = await client.post(url + "/api/search?k=10", files={"image": ("q.jpg", data, "image/jpeg")})
                    ok = r.status_code == 200 and len(r.json()["results"]) == 10
                except Exception:  # noqa: BLE001 - counted as an error
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - t)
                else:
                    errors += 1

        t0 = time.monotonic()
        await asyncio.gather(*(one(i) for i in range(clients)))
        wall = time.monotonic() - t0
    lat = np.array(latencies) * 1e3
    return {"clients": clients, "seconds": round(wall, 1), "requests": len(latencies) + errors, "errors": errors,
            "qps": len(latencies) / wall,
            **{f"p{q}_ms": float(np.percentile(lat, q)) if len(lat) else None for q in (50, 95, 99)}}


def measure(index: str, photos: list[str], clients: int = 200, seconds: float = 60, max_requests: int = 100_000,
            batched: bool = True) -> dict:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    args = [] if batched else ["--batch-window-ms", "0", "--max-batch", "1"]
    proc = subprocess.Popen([sys.executable, "-m", "convlad.cli", "serve", index, "--port", str(port), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        import httpx

        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(url + "/api/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"convlad serve did not start: {proc.stderr.read()[-2000:]}")
                time.sleep(0.3)
        data = [Path(p).read_bytes() for p in photos]
        asyncio.run(_clients(url, data[:4], 2, 3, 50))  # warm-up
        out = asyncio.run(_clients(url, data, clients, seconds, max_requests))
        stats = httpx.get(url + "/api/stats").json()
        out.update(batched=batched, device=stats["device"], mean_batch=stats["mean_batch"], rss_mb=_vm(proc.pid, "VmRSS"),
                   peak_rss_mb=_vm(proc.pid, "VmHWM"))
        return out
    finally:
        proc.terminate()
        proc.wait(20)


def compare(index: str, photos: list[str], clients: int = 200, seconds: float = 60) -> dict:
    """One query per forward pass, then micro-batched, the same load on each."""
    single = measure(index, photos, clients, seconds, batched=False)
    batched = measure(index, photos, clients, seconds, batched=True)
    return {"single": single, "batched": batched, "qps_ratio": batched["qps"] / single["qps"],
            "p99_ratio": batched["p99_ms"] / single["p99_ms"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("index")
    ap.add_argument("--photos", required=True, help="folder of query photos")
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=60)
    a = ap.parse_args()
    photos = sorted(str(p) for p in Path(a.photos).glob("*.jpg"))
    print(json.dumps(compare(a.index, photos, a.clients, a.seconds), indent=1))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
