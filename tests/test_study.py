"""The layer × scale study on real photos: feature cache (one extraction per image and scale, resumable),
sweep rows, CSV, plot and table through the CLI, cropped queries."""
import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from convlad.cache import FeatureCache
from convlad.study.datasets import load_ukbench
from convlad.extract import FeatureExtractor
from convlad.images import load_warped

from .conftest import SAMPLES, need

pytestmark = pytest.mark.e2e
CLI = [sys.executable, "-m", "convlad.cli"]


def cache_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.npy"))


def test_cache_holds_what_the_extractor_computes_and_resumes(tmp_path, lite0):
    photos = sorted(str(p) for p in need(SAMPLES / "ukbench").glob("*.jpg"))[:6]
    cache = FeatureCache(tmp_path / "c", lite0)
    layers = ["block4", "block11"]
    assert cache.fill(photos[:3], layers, [1.0], progress=False) == []
    assert len(cache_files(tmp_path / "c")) == 3 * 2
    # a later fill (as after a crash) computes only what is missing
    assert cache.missing(photos, lite0.resolve_layers(layers), 1.0) == [3, 4, 5]
    cache.fill(photos, layers, [1.0], progress=False)
    assert len(cache_files(tmp_path / "c")) == 6 * 2
    # the stored float16 descriptors are the extractor's, rounded
    ex = FeatureExtractor(lite0, layers)
    direct = ex(np.stack(load_warped(photos[4], [224])))
    ex.close()
    for layer in layers:
        stored = cache.load(photos[4], layer, 1.0)
        assert stored.dtype == np.float16 and stored.shape == tuple(direct[layer].shape[1:])
        np.testing.assert_allclose(stored.astype(np.float32), direct[layer][0].numpy(), atol=2e-3)
    # the key is the content: a copy under another name is found, an edited file is not
    copy = tmp_path / "copy.jpg"
    copy.write_bytes(Path(photos[0]).read_bytes())
    assert cache.missing([str(copy)], lite0.resolve_layers(layers), 1.0) == []
    Image.open(photos[0]).rotate(90).save(copy)
    assert cache.missing([str(copy)], lite0.resolve_layers(layers), 1.0) == [0]
    # a crop is its own entry
    assert cache.missing([(photos[0], (0, 0, 100, 80))], lite0.resolve_layers(layers), 1.0) == [0]


def test_cropped_query_is_the_box_resized(tmp_path):
    photo = need(SAMPLES / "holidays") / "100000.jpg"
    box = (400.0, 300.0, 1400.0, 1100.0)
    (crop,) = load_warped(photo, [224], box=box)
    with Image.open(photo) as im:
        ref = np.asarray(im.convert("RGB").crop(tuple(int(v) for v in box)).resize((224, 224), Image.BILINEAR),
                         dtype=np.float32)
    # draft decoding (at 1/2 or 1/4) then resizing differs from the full decode by a little blur only
    assert np.abs(crop.astype(np.float32) - ref).mean() < 6
    (whole,) = load_warped(photo, [224])
    assert np.abs(whole.astype(np.float32) - ref).mean() > 20


def test_sweep_cli_writes_csv_png_and_table(tmp_path, train_images):
    bench_dir = need(SAMPLES / "ukbench")
    train = tmp_path / "train"
    train.mkdir()
    for p in train_images[::10]:
        (train / Path(p).name).symlink_to(p)
    args = [*CLI, "sweep", str(bench_dir), "--train", str(train), "--layers", "block4,block11,head",
            "--scales", "1,2", "--k", "8", "--dim", "16", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out")]
    p = subprocess.run(args, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "from " + str(train) in p.stdout and "(58 images)" in p.stdout
    rows = list(csv.DictReader(open(tmp_path / "out" / "ukbench-efficientnet-lite0.csv")))
    assert [(r["layer"], r["scale"]) for r in rows] == [(layer, s) for layer in ("block4", "block11", "head")
                                                        for s in ("1", "2", "1+2")]
    for r in rows:
        for col in ("mAP_full", "mAP_16", "N-S_full", "N-S_16"):
            assert 0 <= float(r[col]) <= (4 if col.startswith("N-S") else 1)
        assert r["train"] == str(train) and r["backbone"] == "efficientnet-lite0"
    # 4 views of one object: with any layer the object's own views beat the other objects' on average
    assert np.mean([float(r["N-S_full"]) for r in rows]) > 2.0
    assert int(rows[1]["positions"]) == 4 * int(rows[0]["positions"])  # scale 2: 4× the positions
    png = tmp_path / "out" / "ukbench-efficientnet-lite0.png"
    assert png.stat().st_size > 10_000 and Image.open(png).size[0] > 500
    n_cached = len(cache_files(tmp_path / "cache"))
    assert n_cached == (10 + 58) * 3 * 2
    # warm: nothing extracted again, the same numbers (k-means is seeded)
    p2 = subprocess.run(args, capture_output=True, text=True)
    assert p2.returncode == 0 and len(cache_files(tmp_path / "cache")) == n_cached
    assert list(csv.DictReader(open(tmp_path / "out" / "ukbench-efficientnet-lite0.csv"))) == rows
    t = subprocess.run([*CLI, "table", str(tmp_path / "out" / "ukbench-efficientnet-lite0.csv"), "--dim", "16",
                        "--metric", "N-S"], capture_output=True, text=True)
    assert t.returncode == 0, t.stderr
    lines = t.stdout.splitlines()
    assert lines[0] == "| backbone | scales | ukbench full | ukbench 16-D |"
    best = max(rows, key=lambda r: float(r["N-S_full"]) if r["scale"] == "1" else -1)
    assert f"{float(best['N-S_full']):.3f} ({best['layer']})" in lines[2]
    assert "ukbench: " + str(train) in t.stdout


def test_sweep_errors_are_one_line(tmp_path):
    p = subprocess.run([*CLI, "sweep", str(tmp_path), "--train", str(tmp_path)], capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "layout not recognised" in p.stderr
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    p = subprocess.run([*CLI, "table", str(bad)], capture_output=True, text=True)
    assert p.returncode == 2 and "not a sweep CSV" in p.stderr


def test_ukbench_sample_loader_feeds_the_cache(lite0, tmp_path):
    bench = load_ukbench(need(SAMPLES / "ukbench"))
    cache = FeatureCache(tmp_path, lite0)
    assert cache.fill(bench.paths, ["block15"], [1.0], progress=False) == []
    assert all(cache.load(p, "block15", 1.0).shape == (49, 320) for p in bench.paths)
