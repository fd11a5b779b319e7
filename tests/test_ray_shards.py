"""`convlad serve INDEX --ray ADDRESS` on a real three-node Ray cluster on this machine (`ray start
--head` and two `ray start --address`, separate processes, one CPU each): three shards of
mvbench-dev and mvbench-train answer as `convlad search` on the unsharded index of the same photos
(ids, order, inliers); a shard's replica SIGKILLed mid-queries is replaced while the API answers
each search whole or with a 503 and Retry-After naming the shard; a photo added while a shard is
down is committed once. Behind the ``long`` marker (make test-long): about three minutes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from convlad.index.store import IndexStore

from .conftest import MVBENCH_DEV, MVBENCH_TRAIN, need
from .servers import CLI, cli, free_port, ray_cluster

pytestmark = [pytest.mark.e2e, pytest.mark.long]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'convlad[ray]')")
    with ray_cluster(tmp_path_factory.mktemp("ray"), 3) as got:
        yield got


@pytest.fixture(scope="module")
def indexes(dev_index, tmp_path_factory):
    """The photos of mvbench-dev and mvbench-train, indexed twice with one model: in 3 shards, and whole."""
    wd = tmp_path_factory.mktemp("shards")
    photos = wd / "photos"
    photos.mkdir()
    for sub in ("images", "distractors"):
        (photos / sub).symlink_to(need(MVBENCH_DEV) / sub)
    (photos / "train").symlink_to(need(MVBENCH_TRAIN))
    cli("index", dev_index / "model.npz", photos, "--out", wd / "sharded.index", "--shards", "3")
    cli("index", dev_index / "model.npz", photos, "--out", wd / "whole.index")
    return wd


def _replica_pids(shard: int) -> list[int]:
    out = subprocess.run(["pgrep", "-f", f"ServeReplica:convlad-[0-9a-f]+-shard-{shard}:"], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split() if int(p) != os.getpid()]


def _search(url: str, photo: Path):
    return httpx.post(url + "/api/search", files={"image": (photo.name, photo.read_bytes(), "image/jpeg")},
                      params={"k": 10}, timeout=60)


def _hits(r) -> list[tuple[int, int | None]]:
    return [(h["id"], h["inliers"]) for h in r.json()["results"]]


def test_sharded_service_on_three_nodes(cluster, indexes):
    address, env = cluster
    sharded, whole = indexes / "sharded.index", indexes / "whole.index"
    assert [s["images"] > 250 for s in IndexStore.open(sharded).info()["shards"]] == [True] * 3
    queries = sorted((need(MVBENCH_DEV) / "images").glob("*.jpg"))[::45][:8]
    want = json.loads(cli("search", whole, *queries, "-k", "10", "--json").stdout)
    want = {Path(q["query"]).name: [(h["id"], h["inliers"]) for h in q["results"]] for q in want}
    assert sum(i is not None and i > 0 for hits in want.values() for _, i in hits) > 20

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([*CLI, "serve", str(sharded), "--ray", address, "--port", str(port), "--compile", "off"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 240
        while True:
            assert proc.poll() is None, proc.stderr.read()
            assert time.time() < deadline, "convlad serve --ray did not answer within 240 s"
            try:
                if httpx.get(url + "/api/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        health = httpx.get(url + "/api/health").json()
        assert health["status"] == "ok" and [s["shard"] for s in health["shards"]] == [0, 1, 2], health
        n = health["images"]

        # 1. the same photo, the same ids, order and inliers as `convlad search` on the whole index
        for q in queries:
            r = _search(url, q)
            assert r.status_code == 200, r.text
            assert _hits(r) == want[q.name], q.name

        # the single server's guards hold: caps on what an anonymous search may ask, headers, a
        # query's match view reachable only by the id its search returned
        over = httpx.post(url + "/api/search", params={"k": 1000},
                          files={"image": ("q.jpg", queries[0].read_bytes(), "image/jpeg")}, timeout=60)
        assert over.status_code == 400 and "k" in over.json()["error"], over.text
        assert r.headers["x-content-type-options"] == "nosniff" and "content-security-policy" in r.headers
        first = r.json()["results"][0]["id"]
        assert httpx.get(url + f"/api/match/{first}", params={"query": r.json()["query"], "format": "json"},
                         timeout=60).status_code == 200
        assert httpx.get(url + f"/api/match/{first}", params={"query": "0" * 32}, timeout=60).status_code in (400, 404)

        # 2. a replica killed during queries: every answer whole, or a 503 naming the shard
        (pid,) = _replica_pids(1)
        os.kill(pid, signal.SIGKILL)
        statuses, deadline = [], time.time() + 120
        while time.time() < deadline:
            q = queries[len(statuses) % len(queries)]
            r = _search(url, q)
            statuses.append(r.status_code)
            if r.status_code == 503:
                assert int(r.headers["Retry-After"]) > 0 and "shard 1" in r.json()["error"], r.text
                time.sleep(0.5)
                continue
            assert r.status_code == 200 and _hits(r) == want[q.name], r.text
            if _replica_pids(1) and _replica_pids(1) != [pid]:
                break
        print("answers while shard 1 was replaced:", statuses)
        assert statuses[-1] == 200 and _replica_pids(1) not in ([], [pid]), statuses

        # 3. a photo added while a shard is down is committed once, and found once it is back
        (pid,) = _replica_pids(0)
        os.kill(pid, signal.SIGKILL)
        photo = queries[0]
        added = httpx.post(url + "/api/images", files={"image": ("new.jpg", photo.read_bytes(), "image/jpeg")},
                           timeout=60)
        assert added.status_code == 201, added.text
        new = added.json()["id"]
        deadline = time.time() + 120
        while (r := _search(url, photo)).status_code == 503 and time.time() < deadline:
            time.sleep(1)
        assert r.status_code == 200, r.text
        ids = [i for i, _ in _hits(r)]
        assert ids.count(new) == 1 and ids.index(new) < 2  # the photo itself and its new copy come first
        assert httpx.get(url + "/api/health").json()["images"] == n + 1
        assert len(IndexStore.open(sharded)) == n + 1
        assert sum("uploads/" in p for _, p, _ in IndexStore.open(sharded).items()) == 1
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
