"""Indexing on a real two-node Ray cluster on this machine (`ray start --head` and a second
`ray start --address`, separate processes, one CPU each), with a worker SIGKILLed mid-run."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest

from convlad.index.store import IndexStore

from .conftest import SAMPLES, need
from .servers import CLI, build_index, cli, free_port, groups_of_dev, ray_cluster

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'convlad[ray]')")
    with ray_cluster(tmp_path_factory.mktemp("ray"), 2) as got:
        yield got


def groups_dir(groups, i: int) -> str:
    return list(groups)[i]


def _encoders() -> list[int]:
    out = subprocess.run(["pgrep", "-f", "MapWorker|Encoder"], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out if int(p) != os.getpid()]


def test_two_node_index_survives_a_killed_worker_and_matches_the_local_path(cluster, tmp_path, train_images):
    address, env = cluster
    _, groups = build_index(tmp_path, train_images, n_groups=12)
    # a tree, so that the walk is spread over the cluster too: a few photos at the top, one folder per
    # group, and a link loop
    tree = tmp_path / "tree"
    for g, (name, files) in enumerate(groups.items()):
        for f in files[1:]:
            dest = tree / (f.name if g == 0 else f"{name}/{f.name}")
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.symlink_to(f)
    (tree / groups_dir(groups, 1) / "loop").symlink_to("..")
    index = tmp_path / "local.index"
    # plain rows: augmentation mines in commit order, which Ray's blocks change (a pair is found from
    # the side of the photo committed later), and twins' augmented rows tie, ordered by ids that
    # differ between the two runs; what this compares is the extraction (the next test augments)
    cli("index", tmp_path / "model.npz", tree, "--out", index, "--augment", "none")
    photos = sorted(p for _, p, _ in IndexStore.open(index).items())
    assert len(photos) == sum(len(f) - 1 for f in groups.values())
    out = tmp_path / "ray.index"
    proc = subprocess.Popen([*CLI, "index", tmp_path / "model.npz", tree, "--out", out,
                             "--ray", address, "--batch-size", "4", "--augment", "none"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    killed = None
    deadline = time.time() + 240
    # kill one model replica once the run has committed something, i.e. mid-run
    while time.time() < deadline and proc.poll() is None and killed is None:
        time.sleep(0.3)
        m = out / "MANIFEST"
        if m.exists() and '"segments": [\n  {' in m.read_text():
            pids = _encoders()
            if pids:
                os.kill(pids[0], signal.SIGKILL)
                killed = pids[0]
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    assert killed is not None, "no worker was running mid-run to kill"
    ray_store, local = IndexStore.open(out), IndexStore.open(index)
    items = list(ray_store.items())
    assert sorted(p for _, p, _ in items) == photos, "not every photo exactly once"
    ray_X = dict(zip((p for _, p, _ in items), ray_store.vectors([i for i, _, _ in items])))
    loc = list(local.items())
    loc_X = dict(zip((p for _, p, _ in loc), local.vectors([i for i, _, _ in loc])))
    cos = np.array([ray_X[p] @ loc_X[p] / np.linalg.norm(ray_X[p]) / np.linalg.norm(loc_X[p]) for p in photos])
    assert cos.min() > 0.9999, cos.min()
    # the same search results
    Q = np.stack([loc_X[p] for p in photos[:10]])
    _, I1 = ray_store.search(Q, 5)
    _, I2 = local.search(Q, 5)
    names = lambda st, I: [[st.path_of(int(i)) for i in row] for row in I]  # noqa: E731
    assert names(ray_store, I1) == names(local, I2)


def test_without_ray_the_option_says_what_to_install(tmp_path):
    """A Python where `import ray` fails: one line naming the extra."""
    shim = tmp_path / "shim"
    (shim / "ray").mkdir(parents=True)
    (shim / "ray" / "__init__.py").write_text("raise ImportError('no ray here')\n")
    (tmp_path / "p").mkdir()
    model = tmp_path / "m.npz"
    from convlad.pipeline import ConvVLAD

    samples = sorted(need(SAMPLES / "ukbench").glob("*.jpg"))
    ConvVLAD(layers=["block11"], pooled=[], scales=[1], k=2, dim=None).fit([str(p) for p in samples[:4]],
                                                                           progress=False).save(model)
    shutil.copy(samples[0], tmp_path / "p")
    p = subprocess.run([*CLI, "index", model, tmp_path / "p", "--out", tmp_path / "i", "--ray", "local"],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(shim)})
    assert p.returncode == 2 and "pip install 'convlad[ray]'" in p.stderr and "Traceback" not in p.stderr, p.stderr
    # and serving shards on Ray Serve
    cli("index", model, tmp_path / "p", "--out", tmp_path / "i")
    p = subprocess.run([*CLI, "serve", tmp_path / "i", "--ray", "local", "--port", str(free_port())],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(shim)}, timeout=120)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        "error: --ray needs Ray Serve: pip install 'convlad[ray]' (or pip install 'ray[serve]')"], p.stderr


def test_a_rerun_after_the_driver_is_killed_resumes_from_the_committed_segments(cluster, tmp_path, train_images):
    address, env = cluster
    _, groups = build_index(tmp_path, train_images, n_groups=8)
    photos = tmp_path / "photos"
    out = tmp_path / "ray.index"
    proc = subprocess.Popen([*CLI, "index", tmp_path / "model.npz", photos, "--out", out, "--ray", address,
                             "--batch-size", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        m = out / "MANIFEST"
        if m.exists() and '"segments": [\n  {' in m.read_text():
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)  # the driver, the index's writer
    proc.wait()
    committed = len(IndexStore.open(out))
    total = sum(len(f) - 1 for f in groups.values())
    assert 0 < committed < total, (committed, total)
    p = subprocess.run([*CLI, "index", tmp_path / "model.npz", photos, "--out", out, "--ray", address],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"{total} images ({total - committed} added, {committed} unchanged" in p.stdout, p.stdout
    names = [q for _, q, _ in IndexStore.open(out).items()]
    assert sorted(names) == sorted(q.name for q in photos.iterdir())


def test_a_compact_codec_s_codes_made_on_the_workers_are_those_the_writer_makes(cluster, tmp_path, train_images):
    """With a compact local codec the Ray actors encode the local features, and the single writer
    stores their codes: the same, photo by photo, as a local `convlad index` stores, at both scales."""
    from convlad.pipeline import ConvVLAD

    address, env = cluster
    model = tmp_path / "compact.npz"
    ConvVLAD(layers=["block6"], pooled=[], scales=[1, 2], k=8, dim=None, local_codec="pq10").fit(
        train_images[::16], progress=False).save(model)
    photos = tmp_path / "photos"
    photos.mkdir()
    for files in list(groups_of_dev().values())[:3]:
        for f in files:
            (photos / f.name).symlink_to(f)
    cli("index", model, photos, "--out", tmp_path / "local.index", "--augment", "none")
    p = subprocess.run([*CLI, "index", model, photos, "--out", tmp_path / "ray.index", "--ray", address,
                        "--batch-size", "4", "--augment", "none"], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    stores = [IndexStore.open(tmp_path / name) for name in ("local.index", "ray.index")]
    by_path = [{q: i for i, q, _ in s.items()} for s in stores]
    assert sorted(by_path[0]) == sorted(by_path[1]) and len(by_path[0]) >= 10
    names = sorted(by_path[0])
    (a, _), (b, _) = (s.local_codes([m[q] for q in names], coarse=True) for s, m in zip(stores, by_path))
    assert stores[1].info()["local"]["codec"] == "pq10" and int(a.count.min()) > 100
    assert stores[1].info()["local"]["coarse"] == 100 and int(a.coarse.count.min()) == 100
    # ... which are the codec's own: the smaller scale's strongest 100, in its code, read back as it gives them
    want = stores[0].model.local_codec_.stored(stores[0].model.transform([str(photos / q) for q in names],
                                                                          progress=False, local=300).local)
    for f in ("codes", "cells", "count"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
        np.testing.assert_array_equal(getattr(a.coarse, f), getattr(b.coarse, f))
        np.testing.assert_array_equal(getattr(a.coarse, f), getattr(want.coarse, f))
