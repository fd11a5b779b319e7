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


def _poll_health(url: str, seconds: float) -> list[float]:
    """GET /api/health every 100 ms for ``seconds``: each answer's latency (inf for a failure)."""
    import httpx

    lat, stop = [], time.monotonic() + seconds
    with httpx.Client(timeout=30) as client:
        while time.monotonic() < stop:
            t = time.perf_counter()
            try:
                ok = client.get(url + "/api/health").status_code == 200
            except httpx.HTTPError:
                ok = False
            lat.append(time.perf_counter() - t if ok else 1e9)
            time.sleep(0.1)
    return lat


async def _clients(url: str, photos: list[bytes], clients: int, seconds: float, max_requests: int) -> dict:
    """``clients`` loops posting photos until ``seconds`` or ``max_requests``; a 503 is honoured by
    waiting its Retry-After. Meanwhile /api/health is polled every 100 ms: its worst latency."""
    import httpx

    latencies, statuses, bad, done = [], {}, 0, 0
    stop = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients + 1, max_keepalive_connections=clients + 1)
    async with httpx.AsyncClient(limits=limits, timeout=120) as client:
        async def one(cid: int):
            nonlocal bad, done
            rng = random.Random(cid)
            while time.monotonic() < stop and done < max_requests:
                done += 1
                data = photos[rng.randrange(len(photos))]
                t = time.perf_counter()
                try:
                    r = await client.post(url + "/api/search?k=10", files={"image": ("q.jpg", data, "image/jpeg")})
                    status = r.status_code
                except Exception:  # noqa: BLE001 - counted as a failure
                    status = "no answer"
                statuses[status] = statuses.get(status, 0) + 1
                if status == 200 and len(r.json()["results"]) == 10:
                    latencies.append(time.perf_counter() - t)
                elif status == 503 and r.headers.get("content-type") == "application/json" and \
                        r.headers.get("retry-after", "").isdigit() and "error" in r.json():
                    await asyncio.sleep(int(r.headers["retry-after"]))
                else:
                    bad += 1

        # health is polled from a process of its own: in this one, the 200 clients' own event loop
        # would add its delays to what the server takes
        poller = subprocess.Popen([sys.executable, __file__, "--poll-health", url, str(seconds)],
                                  stdout=subprocess.PIPE, text=True)
        t0 = time.monotonic()
        await asyncio.gather(*(one(i) for i in range(clients)))
        wall = time.monotonic() - t0
        health = json.loads(poller.communicate(timeout=120)[0] or "[]")
    lat = np.array(latencies) * 1e3
    return {"clients": clients, "seconds": round(wall, 1), "requests": sum(statuses.values()),
            "statuses": {str(k): v for k, v in sorted(statuses.items(), key=str)}, "errors": bad,
            "qps": len(latencies) / wall, "health_worst_ms": 1e3 * max(health) if health else None,
            **{f"p{q}_ms": float(np.percentile(lat, q)) if len(lat) else None for q in (50, 95, 99)}}


def measure(index: str, photos: list[str], clients: int = 200, seconds: float = 60, max_requests: int = 100_000,
            batched: bool = True, args: tuple = ()) -> dict:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    args = [*([] if batched else ["--batch-window-ms", "0", "--max-batch", "1"]), *args]
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
        out.update(batched=batched, args=list(args), device=stats["device"], mean_batch=stats["mean_batch"],
                   precision=stats["precision"], compiled=stats["compiled"], cpu_flags=stats["cpu_flags"],
                   rss_mb=_vm(proc.pid, "VmRSS"), peak_rss_mb=_vm(proc.pid, "VmHWM"))
        return out
    finally:
        proc.terminate()
        proc.wait(20)


# the server as it was before it compiled and chose its precision: one query per eager fp32 pass
ONE_PER_PASS = ("--precision", "fp32", "--compile", "off")


def compare(index: str, photos: list[str], clients: int = 200, seconds: float = 60) -> dict:
    """The default server (micro-batched, compiled, precision auto) against one query per eager
    fp32 pass, the same load on each; then the default server with a line of 16 (``--max-queue
    16``): every answer must be a 200 or a JSON 503 with Retry-After, and health must keep answering."""
    single = measure(index, photos, clients, seconds, batched=False, args=ONE_PER_PASS)
    batched = measure(index, photos, clients, seconds, batched=True)
    queued = measure(index, photos, clients, seconds, batched=True, args=("--max-queue", "16"))
    return {"single": single, "batched": batched, "qps_ratio": batched["qps"] / single["qps"],
            "p99_ratio": batched["p99_ms"] / single["p99_ms"], "max_queue_16": queued,
            "max_queue_16_only_200_or_503": queued["errors"] == 0}


def main():
    if sys.argv[1:2] == ["--poll-health"]:  # the health poller, a process of its own
        print(json.dumps(_poll_health(sys.argv[2], float(sys.argv[3]))))
        return
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
