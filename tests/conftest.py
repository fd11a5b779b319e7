"""Shared fixtures. Real data lives in ../shared (never copied into the repository); tests that need
it skip with a clear reason only when that folder is absent."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

# The suite's figures and references are fp32's: `--precision auto` would run bf16 on a CPU with
# AMX. Tests of auto itself (test_extract) clear this and force the CPU detection both ways.
os.environ.setdefault("CONVLAD_PRECISION", "fp32")

# `convlad eval` keeps fitted models and encodings (evalcache.py). The suite gets its own, shared by
# its runs (the folds test reuses the default eval's fit and encoding) and gone after it: a cache
# left by an earlier run, or in ~/.cache, would let a test pass without doing the work.
_EVAL_CACHE = None
if "CONVLAD_EVAL_CACHE" not in os.environ:
    _EVAL_CACHE = os.environ["CONVLAD_EVAL_CACHE"] = tempfile.mkdtemp(prefix="convlad-eval-cache-")


def pytest_sessionfinish(session, exitstatus):
    if _EVAL_CACHE:
        shutil.rmtree(_EVAL_CACHE, ignore_errors=True)

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CONVLAD_SHARED", REPO.parent / "shared")).resolve()
DATA = SHARED / "data"
MVBENCH_DEV = DATA / "mvbench-dev"
MVBENCH_TRAIN = DATA / "mvbench-train" / "images"
SAMPLES = DATA / "samples"
REFERENCE = SHARED / "reference"


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data not available: {path} is absent (the shared data folder beside the repo)")
    return path


@pytest.fixture(scope="session")
def lite0():
    from convlad.backbones import get_backbone

    return get_backbone("efficientnet-lite0")


@pytest.fixture(scope="session")
def train_images() -> list[str]:
    return sorted(str(p) for p in need(MVBENCH_TRAIN).glob("*.jpg"))


@pytest.fixture(scope="session")
def dev_images() -> list[str]:
    return sorted(str(p) for p in (need(MVBENCH_DEV) / "images").glob("*.jpg"))


@pytest.fixture(scope="session")
def dev_index(tmp_path_factory, train_images):
    """A small model (scale 1, 32-D) and two indexes of mvbench-dev's 408 photos (groups and
    distractors): one with the default local features, one with 120 of them. Shared by the tests of
    the one search and of the groups (one per session: 20 s)."""
    from .servers import cli

    wd = tmp_path_factory.mktemp("doors")
    (wd / "train").mkdir()
    for p in train_images[::12]:
        (wd / "train" / Path(p).name).symlink_to(p)
    cli("train", "--images", wd / "train", "--out", wd / "model.npz", "--layer", "block11", "--scales", "1",
        "--k", "16", "--dim", "32")
    photos = wd / "photos"
    photos.mkdir()
    for sub in ("images", "distractors"):
        (photos / sub).symlink_to(need(MVBENCH_DEV) / sub)
    cli("index", wd / "model.npz", photos, "--out", wd / "default.index")
    cli("index", wd / "model.npz", photos, "--out", wd / "local120.index", "--local-features", "120")
    return wd
