"""Figures 3–4 on a tiny set of real photos: patches tile the warped image, reconstructions borrow
only from other images, and the CLI writes the PNGs."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from convlad.study.figures import LABEL, _neighbours, clusters_figure, parse_layer_spec, patch_bank, reconstruct
from convlad.images import load_warped

from .servers import cli


@pytest.fixture(scope="module")
def photos(dev_images):
    return dev_images[::40][:5]


def test_patches_tile_the_warped_image_and_neighbours_come_from_other_images(lite0, photos):
    bank = patch_bank(lite0, photos, "block6", 1.0)
    assert bank.grid == (14, 14) and bank.patches.shape == (5 * 196, 16, 16, 3) and bank.desc.shape == (5 * 196, 80)
    (warped,) = load_warped(photos[2], [224])
    tiles = bank.patches[bank.image == 2].reshape(14, 14, 16, 16, 3).transpose(0, 2, 1, 3, 4).reshape(224, 224, 3)
    np.testing.assert_array_equal(tiles, warped)
    rows = np.flatnonzero(bank.image == 0)
    nn = _neighbours(bank, rows, 5)
    assert (bank.image[nn] != 0).all()
    # 1-NN: every cell of the rebuilt image is a patch of another image, the nearest by descriptor
    rebuilt = reconstruct(bank, 0, 1)
    cells = rebuilt.reshape(14, 16, 14, 16, 3).transpose(0, 2, 1, 3, 4).reshape(-1, 16, 16, 3)
    np.testing.assert_array_equal(cells, bank.patches[nn[:, 0]])
    d = ((bank.desc[rows][:, None] - bank.desc[None]) ** 2).sum(-1)
    d[:, bank.image == 0] = np.inf
    np.testing.assert_array_equal(nn[:, 0], d.argmin(1))
    # Fig. 4 shows, after each sampled reference, exactly its nearest patches of other images
    fig = np.asarray(clusters_figure([bank], refs=2, neighbours=3, cell=16, seed=5))
    refs = np.random.default_rng(5).choice(len(bank.desc), size=2, replace=False)
    near = _neighbours(bank, refs, 3)
    for r, (ref, row) in enumerate(zip(refs, near)):
        for c, i in enumerate([ref, *row]):
            x, y = c * 20 + (8 if c else 0), LABEL + r * 22
            np.testing.assert_array_equal(fig[y:y + 16, x:x + 16], bank.patches[i])
        assert (bank.image[row] != bank.image[ref]).all()


def test_figure_commands_write_pngs_and_refuse_bad_layers(tmp_path, photos):
    db = tmp_path / "db"
    db.mkdir()
    for p in photos:
        (db / p.rsplit("/", 1)[-1]).symlink_to(p)
    out3, out4 = tmp_path / "fig3.png", tmp_path / "fig4.png"
    cli("figure", "correspondence", photos[0], "--database", db, "--layers", "block3@1,block15@1", "--out", out3)
    im = Image.open(out3)
    assert im.format == "PNG" and im.size == (5 * 166 - 6, 22 + 160)  # image + 2 layers × (1-NN, 5-NN)
    cli("figure", "clusters", "--database", db, "--layers", "block6,block15@2", "--refs", "3", "--neighbours", "4",
        "--out", out4)
    im = Image.open(out4)  # two panels (block6@1, block15@2), each of 3 references × (itself + 4)
    assert im.format == "PNG" and im.size == (5 * 44 + 8, 2 * (LABEL + 3 * 46 + 16))
    for bad in ("block99@1", "block6@x"):
        p = subprocess.run([sys.executable, "-m", "convlad", "figure", "clusters", "--database", str(db), "--layers", bad],
                           capture_output=True, text=True)
        assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr, p.stderr
    assert parse_layer_spec("block6@2") == ("block6", 2.0) and parse_layer_spec("head") == ("head", 1.0)
