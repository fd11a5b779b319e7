"""The command line on real photos: train, index (bad files, growth, crash and resume), search."""
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

    p = run("index", workdir / "model.npz", photos, "--out", workdir / "index.npz")
    skipped = [line.strip() for line in re.split(r"[\r\n]", p.stderr) if line.strip().startswith("skipped")]
    assert len(skipped) == 3, p.stderr
    for name in ("zero.jpg", "readme.jpg", "corrupt.jpg"):
        assert sum(name in line for line in skipped) == 1
    assert "Traceback" not in p.stderr
    assert f"{n_good} images ({n_good} added" in p.stdout

    query = groups[names[1]][0]
    p = run("search", workdir / "index.npz", query, "-k", "4", "--json")
    res = json.loads(p.stdout)[0]["results"]
    assert Path(res[0]["path"]).name == query.name and res[0]["distance"] < 1e-4
    assert [r["rank"] for r in res] == [1, 2, 3, 4]
    assert all(a["distance"] <= b["distance"] for a, b in zip(res, res[1:]))
    # the photos of the same object are ranked above those of the other four
    same = sum(Path(r["path"]).name.startswith(names[1]) for r in res[1:])
    assert same >= 2, res

    table = run("search", workdir / "index.npz", query, "-k", "2").stdout
    assert table.splitlines()[0] == f"query: {query}" and query.name in table.splitlines()[1]

    # the same index switched to IVF-PQ: the search structure is rebuilt, nothing re-encoded, and
    # on a collection this small the shortlist holds everything: the same results, exact distances
    p = run("index", workdir / "model.npz", photos, "--out", workdir / "index.npz", "--ann", "ivfpq")
    assert f"(0 added, {n_good} unchanged" in p.stdout and "search: IVF-PQ IVF1,PQ32x" in p.stdout
    ann = json.loads(run("search", workdir / "index.npz", query, "-k", "4", "--json").stdout)[0]["results"]
    assert [r["path"] for r in ann] == [r["path"] for r in res]
    assert [r["distance"] for r in ann] == pytest.approx([r["distance"] for r in res], abs=1e-5)


def test_index_grows_incrementally_and_drops_removed(workdir, groups):
    photos = workdir / "grow"
    names = sorted(groups)
    link_images(photos, groups[names[0]])
    out = workdir / "grow.npz"
    run("index", workdir / "model.npz", photos, "--out", out)
    before = np.load(out)["X"].copy()
    link_images(photos, groups[names[1]])
    p = run("index", workdir / "model.npz", photos, "--out", out)
    n0, n1 = len(groups[names[0]]), len(groups[names[1]])
    assert f"{n0 + n1} images ({n1} added, {n0} unchanged, 0 removed" in p.stdout
    np.testing.assert_array_equal(np.load(out)["X"][:n0], before)
    (photos / groups[names[0]][0].name).unlink()
    p = run("index", workdir / "model.npz", photos, "--out", out)
    assert f"{n0 + n1 - 1} images (0 added, {n0 + n1 - 1} unchanged, 1 removed" in p.stdout


def test_killed_index_run_resumes_from_checkpoint(workdir, dev_images):
    photos = workdir / "crash"
    link_images(photos, [Path(p) for p in dev_images[:60]])
    out = workdir / "crash.npz"
    proc = subprocess.Popen([*CLI, "index", workdir / "model.npz", photos, "--out", out,
                             "--checkpoint-every", "8", "--batch-size", "4"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not out.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert out.exists(), "no checkpoint was written"
    saved = len(np.load(out)["paths"])
    assert 0 < saved < 60
    p = run("index", workdir / "model.npz", photos, "--out", out)
    assert f"60 images ({60 - saved} added, {saved} unchanged" in p.stdout
    assert not [f for f in os.listdir(workdir) if f.endswith(".tmp")], "temporary files left behind"


def test_user_errors_are_one_line(workdir, tmp_path):
    p = run("search", tmp_path / "nope.npz", workdir / "model.npz", check=False)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "nope.npz" in p.stderr
    p = run("search", workdir / "model.npz", workdir / "model.npz", check=False)
    assert p.returncode == 2 and "expected a convlad-index file" in p.stderr
    p = run("train", "--images", workdir / "train", "--out", tmp_path / "m.npz", "--layer", "conv5_3", check=False)
    assert p.returncode == 2 and "no layer 'conv5_3'" in p.stderr and "Traceback" not in p.stderr
    other = tmp_path / "other"
    other.mkdir()
    p = run("index", workdir / "model.npz", other, "--out", workdir / "index.npz", check=False)
    assert p.returncode == 2 and "index of another folder" in p.stderr


def test_too_few_training_images_for_the_dimension_is_said(tmp_path, train_images):
    link_images(tmp_path / "few", [Path(p) for p in train_images[:6]])
    p = run("train", "--images", tmp_path / "few", "--out", tmp_path / "m.npz", "--layer", "block11",
            "--pooled", "none", "--scales", "1", "--k", "8", "--dim", "16")
    assert "warning: PCA-whitening to 16-D needs more than 16 training images; 6 give 5-D" in p.stderr
    assert "dim=5 on 6 images" in p.stdout


def test_empty_folder_gives_an_empty_searchable_index(workdir, tmp_path, groups):
    (tmp_path / "empty").mkdir()
    p = run("index", workdir / "model.npz", tmp_path / "empty", "--out", tmp_path / "e.npz")
    assert "0 images (0 added" in p.stdout and (tmp_path / "e.npz").exists()
    query = next(iter(groups.values()))[0]
    p = run("search", tmp_path / "e.npz", query, "--json")
    assert json.loads(p.stdout) == [{"query": str(query), "results": []}]


def test_backbones_lists_every_network_and_its_layers():
    out = run("backbones").stdout
    for name, layer in [("efficientnet-lite0", "block15"), ("vgg16", "conv5_3"), ("googlenet", "inception4e")]:
        block = out.split(name, 1)[1]
        assert "layers:" in block and layer in block.split("\n")[1]
