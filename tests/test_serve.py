"""`convlad serve` as a real server on loopback: the contract, uploads and deletes, the match view,
bad requests of every kind, and a SIGKILL during an upload."""
from __future__ import annotations

import io
import json
import socket
import time

import httpx
import pytest
import torch
from PIL import Image

from convlad.index.store import IndexStore

from .servers import TOKEN, Server, build_index

pytestmark = pytest.mark.e2e
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, train_images):
    wd = tmp_path_factory.mktemp("serve")
    index, groups = build_index(wd, train_images)
    return wd, index, groups


@pytest.fixture(scope="module")
def server(setup):
    _, index, _ = setup
    s = Server(index, "--token", TOKEN, "--body-timeout", "2", compiled=True)
    yield s
    s.stop()


def search(server, path, k=5, rerank=0):
    """``rerank`` None: the server's default."""
    with open(path, "rb") as f:
        r = httpx.post(f"{server.url}/api/search?k={k}" + ("" if rerank is None else f"&rerank={rerank}"),
                       files={"image": (path.name, f, "image/jpeg")}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_search_ranks_the_group_first_and_files_come_by_id(server, setup):
    _, _, groups = setup
    name, files = next(iter(groups.items()))
    res = search(server, files[0], k=len(files) - 1)
    got = [r["path"] for r in res["results"]]
    assert sum(p.startswith(name) for p in got) >= len(files) - 2, got  # its group's photos come first
    assert all(a["distance"] <= b["distance"] for a, b in zip(res["results"], res["results"][1:]))
    top = res["results"][0]
    img = httpx.get(server.url + f"/api/images/{top['id']}")
    assert img.status_code == 200 and img.content == (setup[1].parent / "photos" / top["path"]).read_bytes()
    th = httpx.get(server.url + top["thumbnail"])
    assert th.headers["content-type"] == "image/jpeg" and max(Image.open(io.BytesIO(th.content)).size) <= 256
    sim = httpx.get(server.url + f"/api/similar/{top['id']}?k=3").json()
    assert top["id"] not in [r["id"] for r in sim["results"]] and len(sim["results"]) == 3
    # the match view of this query against its best result, as data and as a picture
    m = httpx.get(server.url + f"/api/match/{top['id']}?query={res['query']}&format=json", timeout=60).json()
    assert m["matches"] >= m["inliers"] > 0 and len(m["pairs"]) == m["matches"]
    # with the defaults the results are verified, and each one's match view draws that very count
    ranked = search(server, files[0], k=3, rerank=None)
    for hit in ranked["results"]:
        view = httpx.get(server.url + f"/api/match/{hit['id']}?query={ranked['query']}&format=json", timeout=60).json()
        assert isinstance(hit["inliers"], int) and view["inliers"] == hit["inliers"], (view["inliers"], hit)
    # a query is reachable only by its id: no "last query" to fall back on
    assert httpx.get(server.url + f"/api/match/{top['id']}").status_code == 400
    png = httpx.get(server.url + f"/api/match/{top['id']}?query={res['query']}", timeout=60)
    assert png.headers["content-type"] == "image/png" and Image.open(io.BytesIO(png.content)).width > 300
    stats = httpx.get(server.url + "/api/stats").json()
    assert stats["images"] == sum(len(f) - 1 for f in groups.values()) and stats["searches"] >= 1
    assert stats["device"].startswith("cpu (") != torch.cuda.is_available()  # where the network runs
    assert httpx.get(server.url + "/docs").status_code == 200 and "convlad" in httpx.get(server.url + "/").text


def test_the_compiled_server_batches_and_ranks_as_the_cli(server, setup):
    """The default server compiles its network at start; queries batched together through it rank
    as `convlad search` (eager, one process per query) ranks them."""
    from concurrent.futures import ThreadPoolExecutor

    from .servers import cli

    _, index, groups = setup
    stats = httpx.get(server.url + "/api/stats").json()
    assert stats["compiled"] is True and stats["precision_setting"] == "auto" and stats["max_batch"] == 16
    queries = [files[0] for files in groups.values()]
    before = stats["batches"]
    with ThreadPoolExecutor(len(queries)) as pool:  # at once: the encoder batches what arrives together
        served = list(pool.map(lambda q: search(server, q, k=5, rerank=None)["results"], queries))
    stats = httpx.get(server.url + "/api/stats").json()
    assert stats["batches"] - before < len(queries), "no two queries were encoded in one pass"
    by_cli = json.loads(cli("search", index, *queries, "--json").stdout)
    for q, got, want in zip(queries, served, by_cli):
        want = want["results"][:len(got)]  # the CLI's default k is larger
        assert len(got) == 5 and [h["id"] for h in got] == [h["id"] for h in want], q.name
        assert [h["inliers"] for h in got] == [h["inliers"] for h in want], q.name
        assert [h["distance"] for h in got] == pytest.approx([h["distance"] for h in want], abs=1e-4)


def test_upload_is_searchable_at_once_and_delete_removes_it(server, setup):
    wd, index, groups = setup
    name, files = list(groups.items())[1]
    with open(files[0], "rb") as f:
        r = httpx.post(server.url + "/api/images", files={"image": ("new.jpg", f, "image/jpeg")}, headers=AUTH,
                       timeout=60)
    assert r.status_code == 201, r.text
    new = r.json()["id"]
    stored = index / "uploads"
    assert len(list(stored.iterdir())) == 1 and IndexStore.open(index).path_of(new).startswith(str(stored.resolve()))
    res = search(server, files[0])
    # the index augments: the upload's row and its partners' hold each other's descriptors, so
    # the global ranking puts it among the first, not necessarily first
    assert new in [r["id"] for r in res["results"][:3]], res
    # the upload keeps its local features: verified against itself, it stays first, far above chance
    top = search(server, files[0], rerank=20)["results"][0]
    assert top["id"] == new and top["inliers"] > 3 * 8, top  # 8: the chance level
    sim = httpx.get(server.url + f"/api/similar/{new}?k=3&rerank=10").json()["results"]
    assert len(sim) == 3 and new not in [r["id"] for r in sim] and all(isinstance(r["inliers"], int) for r in sim)
    assert httpx.delete(server.url + f"/api/images/{new}", headers=AUTH).json() == {"deleted": new}
    assert new not in [r["id"] for r in search(server, files[0])["results"]]
    assert not list(stored.iterdir()), "the uploaded file stays after its delete"
    assert httpx.get(server.url + f"/api/images/{new}").status_code == 404


def _raw(port: int, data: bytes, pause_after: bytes | None = None, timeout: float = 15) -> tuple[int, dict, float]:
    """Send bytes as they are (no client-side normalisation); (status, JSON body, seconds)."""
    t = time.time()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        if pause_after is not None:
            s.sendall(pause_after)  # then nothing more: a stalled body
        buf = b""
        while True:
            try:
                chunk = s.recv(65536)
            except (socket.timeout, ConnectionResetError):
                break
            if not chunk:
                break
            buf += chunk
            head, _, body = buf.partition(b"\r\n\r\n")
            length = next((int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")), None)
            if length is not None and len(body) >= length:
                break
    head, _, body = buf.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body or b"{}"), time.time() - t


def _multipart(field: str, name: str, data: bytes, ctype="image/jpeg"):
    return {field: (name, data, ctype)}


def _bomb() -> bytes:
    buf = io.BytesIO()
    Image.new("1", (20_000, 20_000)).save(buf, format="PNG")  # 400 megapixels in a few kB
    return buf.getvalue()


def _photo(setup) -> bytes:
    return next(iter(setup[2].values()))[0].read_bytes()


BAD = {
    "non-image": lambda s, st: httpx.post(s.url + "/api/search", files=_multipart("image", "a.jpg", b"hello, world")),
    "empty file": lambda s, st: httpx.post(s.url + "/api/search", files=_multipart("image", "a.jpg", b"")),
    "truncated JPEG": lambda s, st: httpx.post(s.url + "/api/search",
                                               files=_multipart("image", "a.jpg", _photo(st)[:3000])),
    "decompression bomb": lambda s, st: httpx.post(s.url + "/api/search",
                                                   files=_multipart("image", "b.png", _bomb(), "image/png")),
    "wrong content type": lambda s, st: httpx.post(s.url + "/api/search", json={"image": "x"}),
    "missing field": lambda s, st: httpx.post(s.url + "/api/search", files=_multipart("photo", "a.jpg", _photo(st))),
    "k = 0": lambda s, st: httpx.post(s.url + "/api/search?k=0", files=_multipart("image", "a.jpg", _photo(st))),
    "k negative": lambda s, st: httpx.post(s.url + "/api/search?k=-3", files=_multipart("image", "a.jpg", _photo(st))),
    "huge k": lambda s, st: httpx.post(s.url + "/api/search?k=99999999999",
                                       files=_multipart("image", "a.jpg", _photo(st))),
    "non-numeric rerank": lambda s, st: httpx.post(s.url + "/api/search?rerank=1e9",
                                                   files=_multipart("image", "a.jpg", _photo(st))),
    "non-numeric k": lambda s, st: httpx.post(s.url + "/api/search?k=abc", files=_multipart("image", "a.jpg", _photo(st))),
    "unknown id": lambda s, st: httpx.get(s.url + "/api/images/987654"),
    "unknown id thumbnail": lambda s, st: httpx.get(s.url + "/api/images/987654/thumbnail"),
    "encoded traversal id": lambda s, st: httpx.get(s.url + "/api/images/..%2F..%2F..%2Fetc%2Fpasswd"),
    "encoded absolute path": lambda s, st: httpx.get(s.url + "/api/images/%2Fetc%2Fpasswd"),
    "malformed multipart": lambda s, st: httpx.post(
        s.url + "/api/search", content=b"--xyz\r\nContent-Disposition: form-data; name=\"image\"\r\n\r\nabc",
        headers={"content-type": "multipart/form-data; boundary=xyz"}),
    "upload without token": lambda s, st: httpx.post(s.url + "/api/images", files=_multipart("image", "a.jpg", _photo(st))),
    "upload with a wrong token": lambda s, st: httpx.post(s.url + "/api/images", headers={"Authorization": "Bearer no"},
                                                          files=_multipart("image", "a.jpg", _photo(st))),
    "delete without token": lambda s, st: httpx.delete(s.url + "/api/images/1"),
    "delete unknown id": lambda s, st: httpx.delete(s.url + "/api/images/987654", headers=AUTH),
    "match of an unknown query": lambda s, st: httpx.get(s.url + "/api/match/1?query=nope"),
    "wrong method": lambda s, st: httpx.put(s.url + "/api/search"),
    "unknown route": lambda s, st: httpx.get(s.url + "/api/nothing"),
}
EXPECTED = {"non-image": 400, "empty file": 400, "truncated JPEG": 400, "decompression bomb": 413,
            "wrong content type": 415, "missing field": 400, "k = 0": 400, "k negative": 400, "huge k": 400,
            "non-numeric k": 400, "non-numeric rerank": 400, "unknown id": 404, "unknown id thumbnail": 404, "encoded traversal id": 404,
            "encoded absolute path": 404, "malformed multipart": 400, "upload without token": 401,
            "upload with a wrong token": 401, "delete without token": 401, "delete unknown id": 404,
            "match of an unknown query": 404, "wrong method": 405, "unknown route": 404}


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_request_gets_a_4xx_json_sentence(server, setup, kind):
    r = BAD[kind](server, setup)
    assert r.status_code == EXPECTED[kind], (kind, r.status_code, r.text)
    err = r.json()["error"]
    assert isinstance(err, str) and 10 < len(err) < 300 and "\n" not in err and "Traceback" not in err, err
    assert httpx.get(server.url + "/api/health").status_code == 200


@pytest.mark.parametrize("target", ["/api/images/../../../../etc/passwd", "/api/images//etc/passwd",
                                    "/api/images/%2e%2e/%2e%2e/etc/passwd", "/../../etc/passwd"])
def test_traversal_and_absolute_paths_never_reach_a_file(server, target):
    status, body, _ = _raw(server.port, f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    assert status == 404 and "root:" not in json.dumps(body), (status, body)


def test_a_100_mb_body_is_refused_before_it_is_read(server):
    status, body, seconds = _raw(server.port, b"POST /api/search HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                                 b"Content-Type: multipart/form-data; boundary=b\r\n"
                                 b"Content-Length: 104857600\r\n\r\n--b\r\n")
    assert status == 413 and "limit" in body["error"] and seconds < 5


def test_a_slow_client_is_cut_off_and_others_are_served_meanwhile(server):
    import threading

    result = {}
    slow = threading.Thread(target=lambda: result.update(r=_raw(
        server.port, b"POST /api/search HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                     b"Content-Length: 5000\r\n\r\n", pause_after=b"--b\r\n")))
    slow.start()
    time.sleep(0.5)
    t = time.time()
    assert httpx.get(server.url + "/api/health").status_code == 200 and time.time() - t < 1.0
    slow.join(20)
    status, body, seconds = result["r"]
    assert status == 408 and "stalled" in body["error"] and seconds < 10


def test_writes_are_refused_beyond_loopback_without_a_token(setup):
    from fastapi.testclient import TestClient

    from convlad.serving.serve import create_app

    client = TestClient(create_app(setup[1], host="0.0.0.0", compile=False))
    r = client.post("/api/images", files=_multipart("image", "a.jpg", _photo(setup)))
    assert r.status_code == 403 and "--token" in r.json()["error"]
    assert client.get("/api/health").status_code == 200
    assert "access-control-allow-origin" not in client.get("/api/health", headers={"Origin": "http://evil"}).headers


@pytest.mark.parametrize("crash,present", [("segment-write", False), ("manifest-write", False),
                                           ("manifest-renamed", True)])
def test_sigkill_during_an_upload_leaves_the_photo_whole_or_absent(setup, tmp_path, crash, present):
    import shutil

    index = tmp_path / "photos.index"
    shutil.copytree(setup[1], index, symlinks=True)
    shutil.rmtree(index / "uploads", ignore_errors=True)
    before = len(IndexStore.open(index))
    s = Server(index, env={"CONVLAD_CRASH_AT": crash})
    photo = list(setup[2].values())[2][0]
    try:
        with pytest.raises(httpx.HTTPError):
            httpx.post(s.url + "/api/images", files=_multipart("image", "x.jpg", photo.read_bytes()), timeout=60)
        assert s.proc.wait(10) == -9
    finally:
        s.stop()
    st = IndexStore.open(index)
    assert len(st) == before + present
    uploads = [p for _, p, _ in st.items() if "/uploads/" in p]
    assert len(uploads) == present and all(open(p, "rb").read() == photo.read_bytes() for p in uploads)
    s = Server(index)  # restarted: an uncommitted upload file is collected, the index serves
    try:
        assert len(list((index / "uploads").iterdir())) == present
        assert httpx.get(s.url + "/api/health").json()["images"] == before + present
        # verified against itself, the photo comes first where it was committed
        top = search(s, photo, k=1, rerank=20)["results"][0]
        assert (top["id"] in [i for i, p, _ in st.items() if "/uploads/" in p]) == present
    finally:
        s.stop()


@pytest.mark.parametrize("flag,value", [("--compile", "sometimes"), ("--precision", "fp8")])
def test_a_bad_encoder_setting_is_one_line_before_anything_loads(setup, flag, value):
    import subprocess

    from .servers import CLI

    p = subprocess.run([*CLI, "serve", str(setup[1]), flag, value], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert flag in p.stderr and value in p.stderr and "Traceback" not in p.stderr


def test_the_service_is_a_domain_api_without_http(setup, tmp_path):
    """The service's operations called as a library, no HTTP in between: a search ranks as
    ``convlad search`` does (the one search), the similar photos are ``search_ids``', the match
    view is ``explain``'s, and what cannot be done is a domain error, never a status."""
    import asyncio
    import shutil

    from convlad.explain import match_in_index
    from convlad.search import Settings, search_ids, search_images
    from convlad.serving.service import Invalid, NotFound, Service

    index = tmp_path / "photos.index"
    shutil.copytree(setup[1], index, symlinks=True)
    svc = Service(index, compile=False)
    try:
        photo = list(setup[2].values())[0][0]
        settings = Settings(k=5)
        got = asyncio.run(svc.search_photo(photo.read_bytes(), settings))
        (_, want), = search_images(svc.store, [photo], settings)[0]
        assert [(r["id"], r["inliers"], r["via"]) for r in got["results"]] == [(h.id, h.inliers, h.via) for h in want]
        assert [r["distance"] for r in got["results"]] == pytest.approx([h.distance for h in want], abs=1e-5)
        first = got["results"][0]["id"]
        sim = asyncio.run(svc.similar(first, settings))["results"]
        assert [r["id"] for r in sim] == [h.id for h in search_ids(svc.store, [first], settings)[0]]
        view = asyncio.run(svc.match(first, query=got["query"], as_json=True))
        codes = svc.model.transform([str(photo)], progress=False, local=svc.store.local_k).local
        assert view["inliers"] == match_in_index(svc.store, codes, photo, first).n_inliers == got["results"][0]["inliers"]
        added = asyncio.run(svc.add_photo(photo.read_bytes()))
        assert added["path"].startswith("uploads/") and len(svc.store) == len(IndexStore.open(setup[1])) + 1
        assert asyncio.run(svc.delete(added["id"])) == {"deleted": added["id"]}
        # the query's group: the one `groups` puts its first same result in (found in this search
        # where the collection is small; past GROUPS_INLINE photos in the background, named once found)
        from convlad.groups import groups
        from convlad.serving import service

        of = {m["id"]: (g["id"], g["size"]) for g in groups(svc.store, evidence=False) for m in g["members"]}
        same = [r["id"] for r in asyncio.run(svc.search_photo(photo.read_bytes(), settings))["results"] if r["same"]]
        assert same and same[0] in of
        assert asyncio.run(svc.search_photo(photo.read_bytes(), settings))["group"] == dict(zip(("id", "size"), of[same[0]]))
        added = asyncio.run(svc.add_photo(photo.read_bytes()))  # a new generation, its groups not found yet
        try:
            service.GROUPS_INLINE = 0
            assert asyncio.run(svc.similar(first, settings))["group"] is None
            for _ in range(200):
                if (g := asyncio.run(svc.similar(first, settings))["group"]) is not None:
                    break
                time.sleep(0.05)
            assert g == dict(zip(("id", "size"), {m["id"]: (x["id"], x["size"]) for x in groups(svc.store, evidence=False)
                                                  for m in x["members"]}[first]))
        finally:
            service.GROUPS_INLINE = 20_000
        asyncio.run(svc.delete(added["id"]))
        with pytest.raises(NotFound, match="no image with id"):
            asyncio.run(svc.similar(10 ** 12, settings))
        with pytest.raises(NotFound, match="unknown or expired"):
            asyncio.run(svc.match(first, query="0" * 32))
        with pytest.raises(Invalid, match="not an image"):
            asyncio.run(svc.search_photo(b"not a photo", settings))
    finally:
        svc.close()
