"""The command line on real photos: train, index (bad files, links, growth, crash and resume, two
writers), search, info, compact."""
import json
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from convlad.index.store import IndexStore

from .conftest import MVBENCH_DEV, need

pytestmark = pytest.mark.e2e

CLI = [sys.executable, "-m", "convlad.cli"]


def run(*args, check=True, **kw):
    p = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"convlad {' '.join(map(str, args))} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def link_images(dst: Path, sources) -> list[Path]:
    dst.mkdir(parents=True, exist_ok=True)
    out = []
    for s in sources:
        (dst / s.name).symlink_to(s)
        out.append(dst / s.name)
    return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, train_images):
    """A small model trained through the CLI on 48 real training photos (scale 1, 32-D)."""
    wd = tmp_path_factory.mktemp("cli")
    link_images(wd / "train", [Path(p) for p in train_images[::12]])
    p = run("train", "--images", wd / "train", "--out", wd / "model.npz", "--layer", "block11",
            "--scales", "1", "--k", "16", "--dim", "32")
    assert "trained efficientnet-lite0 layers=block11 pooled=block15 scales=1 k=16 dim=32 on 49 images" in p.stdout
    assert re.search(r"chance level of spatial verification: \d+ inliers; of pairs, as mining matches them: \d+\)",
                     p.stdout), p.stdout
    return wd


@pytest.fixture(scope="module")
def groups():
    g = json.loads((need(MVBENCH_DEV) / "groups.json").read_text())
    return {k: [MVBENCH_DEV / "images" / f for f in v] for k, v in g.items() if len(v) >= 4}


def test_index_skips_bad_files_and_search_finds_same_object(workdir, groups):
    photos = workdir / "photos"
    names = sorted(groups)[:5]
    link_images(photos, [f for n in names for f in groups[n]])
    (photos / "zero.jpg").write_bytes(b"")
    (photos / "readme.jpg").write_text("not a photo\n")
    good = groups[names[0]][0].read_bytes()
    (photos / "corrupt.jpg").write_bytes(good[: len(good) // 2])
    n_good = sum(len(groups[n]) for n in names)

    p = run("index", workdir / "model.npz", photos, "--out", workdir / "index")
    skipped = [line.strip() for line in re.split(r"[\r\n]", p.stderr) if line.strip().startswith("skipped")]
    assert len(skipped) == 3, p.stderr
    for name in ("zero.jpg", "readme.jpg", "corrupt.jpg"):
        assert sum(name in line for line in skipped) == 1
    assert "Traceback" not in p.stderr
    assert f"{n_good} images ({n_good} added" in p.stdout

    query = groups[names[1]][0]
    # the index keeps local features, so the top 100 are spatially verified by default
    p = run("search", workdir / "index", query, "-k", "4", "--json")
    res = json.loads(p.stdout)[0]["results"]
    # (the index augments: its row is its descriptor summed with its verified partners', so not at 0)
    assert Path(res[0]["path"]).name == query.name and res[0]["query_itself"]
    assert [r["rank"] for r in res] == [1, 2, 3, 4] and all(isinstance(r["inliers"], int) for r in res)
    # the same thing or only alike, by the groups' rule: the query's own photo is the same, surely
    assert res[0]["same"] is True and all(isinstance(r["same"], bool) for r in res)
    # the photos of the same object are ranked above those of the other four, with or without it
    glob = json.loads(run("search", workdir / "index", query, "-k", "4", "--json", "--rerank", "0").stdout)[0]["results"]
    assert all(a["distance"] <= b["distance"] for a, b in zip(glob, glob[1:])) and glob[0]["inliers"] is None
    for ranking in (res, glob):
        assert sum(Path(r["path"]).name.startswith(names[1]) for r in ranking[1:]) >= 2, ranking

    table = run("search", workdir / "index", query, "-k", "2").stdout.splitlines()
    assert table[0] == f"query: {query}" and table[1].split() == ["rank", "id", "distance", "inliers", "same?", "path"]
    assert table[2].split()[:2] == ["1", str(res[0]["id"])] and table[2].split()[4] == "same" and query.name in table[2]

    # the same index switched to IVF-PQ: the search structure is rebuilt, nothing re-encoded, and
    # on a collection this small the shortlist holds everything: the same results, exact distances
    p = run("index", workdir / "model.npz", photos, "--out", workdir / "index", "--ann", "ivfpq")
    assert f"(0 added, {n_good} unchanged" in p.stdout and "search: IVF-PQ IVF1,PQ32x" in p.stdout, p.stdout
    ann = json.loads(run("search", workdir / "index", query, "-k", "4", "--json").stdout)[0]["results"]
    assert [r["path"] for r in ann] == [r["path"] for r in res]
    assert [r["distance"] for r in ann] == pytest.approx([r["distance"] for r in res], abs=1e-5)


def stored(index: Path) -> dict[str, np.ndarray]:
    """path → descriptor of every live image, read through the store."""
    st = IndexStore.open(index)
    ids, paths = zip(*[(i, p) for i, p, _ in st.items()]) if len(st) else ((), ())
    return dict(zip(paths, st.vectors(list(ids)))) if ids else {}


def test_index_grows_incrementally_and_drops_removed(workdir, groups):
    photos = workdir / "grow"
    names = sorted(groups)
    link_images(photos, groups[names[0]])
    out = workdir / "grow.index"
    run("index", workdir / "model.npz", photos, "--out", out)
    before = stored(out)
    link_images(photos, groups[names[1]])
    p = run("index", workdir / "model.npz", photos, "--out", out)
    n0, n1 = len(groups[names[0]]), len(groups[names[1]])
    assert f"{n0 + n1} images ({n1} added, {n0} unchanged, 0 removed" in p.stdout
    after = stored(out)
    for path, x in before.items():
        np.testing.assert_array_equal(after[path], x)
    (photos / groups[names[0]][0].name).unlink()
    p = run("index", workdir / "model.npz", photos, "--out", out)
    assert f"{n0 + n1 - 1} images (0 added, {n0 + n1 - 1} unchanged, 1 removed" in p.stdout
    info = json.loads(run("info", out, "--json").stdout)
    assert info["images"] == n0 + n1 - 1 and info["dead"] == 1 and info["segments"] == 2
    # the arithmetic encoding runs in here, and the CPU flags it was chosen by (auto; the suite pins fp32)
    assert info["precision"] == "fp32 (auto on this machine)" and "torch:" in info["cpu_flags"]
    p = run("compact", out)
    assert "2 → 1 segments, 1 dead rows dropped" in p.stdout
    info = json.loads(run("info", out, "--json").stdout)
    assert info["images"] == n0 + n1 - 1 and info["dead"] == 0 and info["segments"] == 1
    assert stored(out).keys() == after.keys() - {groups[names[0]][0].name}


def test_killed_index_run_resumes_from_checkpoint(workdir, dev_images):
    photos = workdir / "crash"
    link_images(photos, [Path(p) for p in dev_images[:60]])
    out = workdir / "crash.index"
    proc = subprocess.Popen([*CLI, "index", workdir / "model.npz", photos, "--out", out,
                             "--checkpoint-every", "8", "--batch-size", "4"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (out / "MANIFEST").exists() and json.loads((out / "MANIFEST").read_text())["segments"]:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = len(IndexStore.open(out))
    assert 0 < saved < 60, "no segment was committed before the kill"
    p = run("index", workdir / "model.npz", photos, "--out", out)
    assert f"60 images ({60 - saved} added, {saved} unchanged" in p.stdout
    assert sorted(stored(out)) == sorted(Path(p).name for p in dev_images[:60])
    assert not [f for f in os.listdir(out) if f.startswith("tmp-")], "temporary files left behind"


def test_ctrl_c_during_a_first_index_commits_what_was_encoded(workdir, dev_images, train_images):
    """SIGINT once a first index of ~1 000 photos has encoded a few batches, with the default checkpointing
    (every 500 photos or 30 s): what was encoded is committed before the exit, and a rerun adds the rest."""
    photos = workdir / "interrupted"
    paths = [Path(p) for p in dev_images] + [Path(p) for p in train_images]  # ~1 000: 20 s or more here
    link_images(photos, paths)
    out = workdir / "interrupted.index"
    # a status line a second, so the test can tell when photos are being encoded: a fixed 10 s
    # landed in the start-up of a loaded machine, before indexing began. The line counts a batch
    # when its features are out, before it is encoded and handed over, so wait for three batches
    env = {**os.environ, "CONVLAD_STATUS_EVERY": "1"}
    # with Ctrl-C's default: a suite started in the background (`make test &`) ignores SIGINT, which
    # its children inherit, and a Python started so never turns SIGINT into KeyboardInterrupt
    proc = subprocess.Popen([*CLI, "index", workdir / "model.npz", photos, "--out", out],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen, deadline = [], time.time() + 300
    while time.time() < deadline:
        line = proc.stderr.readline()
        seen.append(line)
        m = re.search(r"indexing: running (\d+)/(\d+)", line)
        if not line or (m and int(m.group(1)) >= 48):
            break
    assert m and int(m.group(1)) < int(m.group(2)) and proc.poll() is None, \
        f"indexing ended before it could be interrupted: too few photos for this test: {''.join(seen)}"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    err = "".join(seen) + err
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err
    saved = len(IndexStore.open(out))
    assert 0 < saved < len(paths), saved  # the work done before the interruption kept
    p = run("index", workdir / "model.npz", photos, "--out", out)
    assert f"{len(paths)} images ({len(paths) - saved} added, {saved} unchanged" in p.stdout


def test_index_without_a_model_fits_one_on_the_collection(workdir, groups, tmp_path):
    photos = tmp_path / "photos"
    link_images(photos, [f for files in list(groups.values())[:12] for f in files])
    n = len(list(photos.iterdir()))
    p = run("index", photos, "--out", tmp_path / "own.index", "--local-features", "50")
    assert "no model given: fitting the default descriptor on" in p.stderr and f"{n} images ({n} added" in p.stdout
    # the index keeps its model: a rerun with the folder alone changes nothing, and search works
    again = run("index", photos, "--out", tmp_path / "own.index")
    assert f"(0 added, {n} unchanged" in again.stdout and "no model given" not in again.stderr
    query = next(iter(groups.values()))[0]
    res = json.loads(run("search", tmp_path / "own.index", query, "-k", "3", "--json").stdout)[0]["results"]
    assert res[0]["query_itself"] and Path(res[0]["path"]).name == query.name


def test_dangling_link_and_loop_are_skipped_each_photo_once(workdir, groups):
    photos = workdir / "links"
    names = sorted(groups)
    link_images(photos, groups[names[2]])
    (photos / "gone.jpg").symlink_to("/nonexistent/photo.jpg")
    (photos / "loop").symlink_to(".")
    (photos / "sub").mkdir()
    (photos / "sub" / "again.jpg").symlink_to(photos / groups[names[2]][0].name)  # a second name, same photo
    p = run("index", workdir / "model.npz", photos, "--out", workdir / "links.index")
    n = len(groups[names[2]])
    assert p.returncode == 0 and f"{n} images ({n} added" in p.stdout, p.stdout + p.stderr
    assert "gone.jpg: broken link" in p.stderr and "loop: same folder" in p.stderr and "Traceback" not in p.stderr
    assert "images: " + str(n) in run("info", workdir / "links.index").stdout.splitlines()


def test_a_second_writer_fails_at_once_naming_the_first_or_waits(workdir, groups):
    photos = workdir / "two"
    link_images(photos, groups[sorted(groups)[3]][:2])
    out = workdir / "two.index"
    run("index", workdir / "model.npz", photos, "--out", out)
    holder = IndexStore.open(out, write=True)
    try:
        p = run("index", workdir / "model.npz", photos, "--out", out, check=False)
        assert p.returncode == 2 and "another writer holds the index" in p.stderr and f"pid {os.getpid()}" in p.stderr
        assert len(p.stderr.strip().splitlines()) == 1
        waiting = subprocess.Popen([*CLI, "index", workdir / "model.npz", photos, "--out", out, "--wait"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(4)
        assert waiting.poll() is None, "--wait did not wait for the lock"
    finally:
        holder.close()
    out_text, _ = waiting.communicate(timeout=120)
    assert waiting.returncode == 0 and "2 images (0 added, 2 unchanged" in out_text


def test_search_exit_status_follows_the_queries_read(workdir, groups, tmp_path):
    bad = tmp_path / "not-an-image.jpg"
    bad.write_text("hello")
    p = run("search", workdir / "index", bad, check=False)
    assert p.returncode == 2 and "not-an-image.jpg" in p.stderr and "Traceback" not in p.stderr
    good = next(iter(groups.values()))[0]
    p = run("search", workdir / "index", bad, good, "-k", "1", check=False)
    assert p.returncode == 0 and "skipped" in p.stderr and f"query: {good}" in p.stdout


def test_user_errors_are_one_line(workdir, tmp_path):
    p = run("search", tmp_path / "nope.index", workdir / "model.npz", check=False)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "nope.index" in p.stderr
    p = run("search", workdir / "model.npz", workdir / "model.npz", check=False)
    assert p.returncode == 2 and "expected a convlad-index file" in p.stderr
    p = run("search", workdir, workdir / "model.npz", check=False)
    assert p.returncode == 2 and "not an index" in p.stderr
    p = run("train", "--images", workdir / "train", "--out", tmp_path / "m.npz", "--layer", "conv5_3", check=False)
    assert p.returncode == 2 and "no layer 'conv5_3'" in p.stderr and "Traceback" not in p.stderr
    other = tmp_path / "other"
    other.mkdir()
    p = run("index", workdir / "model.npz", other, "--out", workdir / "index", check=False)
    assert p.returncode == 2 and "index of another folder" in p.stderr
    # an existing file as --out, with a model or without (before any fitting): convlad's own sentence
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    for args in ((workdir / "model.npz", other), (other,)):
        p = run("index", *args, "--out", notes, check=False)
        assert p.returncode == 2 and p.stderr.count("\n") == 1 and str(notes) in p.stderr, p.stderr
        assert "allow_pickle" not in p.stderr and "fitting" not in p.stderr and notes.read_text() == "my notes\n"


def test_too_few_training_images_for_the_dimension_is_said(tmp_path, train_images):
    link_images(tmp_path / "few", [Path(p) for p in train_images[:6]])
    p = run("train", "--images", tmp_path / "few", "--out", tmp_path / "m.npz", "--layer", "block11",
            "--pooled", "none", "--scales", "1", "--k", "8", "--dim", "16")
    assert "warning: PCA-whitening to 16-D needs more than 16 training images; 6 give 5-D" in p.stderr
    assert "dim=5 on 6 images" in p.stdout


def test_empty_folder_gives_an_empty_searchable_index(workdir, tmp_path, groups):
    (tmp_path / "empty").mkdir()
    p = run("index", workdir / "model.npz", tmp_path / "empty", "--out", tmp_path / "e.index")
    assert "0 images (0 added" in p.stdout and (tmp_path / "e.index" / "MANIFEST").exists()
    query = next(iter(groups.values()))[0]
    p = run("search", tmp_path / "e.index", query, "--json")
    assert json.loads(p.stdout) == [{"query": str(query), "results": []}]


def test_backbones_lists_every_network_and_its_layers():
    out = run("backbones").stdout
    for name, layer in [("efficientnet-lite0", "block15"), ("vgg16", "conv5_3"), ("googlenet", "inception4e")]:
        block = out.split(name, 1)[1]
        assert "layers:" in block and layer in block.split("\n")[1]
