"""The eval cache: a rerun gets the fit and the encoding it would compute, and anything they depend
on (a photo, the configuration, the file itself) changed is computed afresh."""
import os
import shutil

import numpy as np
import pytest

from convlad.study.evalcache import PACKAGE, EvalCache, code_version
from convlad.pipeline import ConvVLAD


def _model():
    return ConvVLAD(layers=["block11"], pooled=[], scales=[1], k=8, dim=16)


def test_a_rerun_is_served_what_it_would_compute_and_a_change_is_not_served(tmp_path, train_images, dev_images):
    train = []
    for p in train_images[:24]:  # copies, so that one can be touched
        shutil.copy(p, tmp_path / os.path.basename(p))
        train.append(str(tmp_path / os.path.basename(p)))
    photos = dev_images[:12]
    cache = EvalCache(tmp_path / "cache")

    first = _model()
    assert cache.fit(first, train, progress=False) is False
    enc, seconds, hit = cache.transform(first, photos, 300, progress=False)
    assert not hit and seconds > 0 and enc.local is not None

    again = _model()
    assert cache.fit(again, train, progress=False) is True
    assert again.fingerprint() == first.fingerprint() and again.chance_ == first.chance_
    enc2, seconds2, hit = cache.transform(again, photos, 300, progress=False)
    assert hit and seconds2 == seconds
    fresh = again.transform(photos, progress=False, local=300)  # what a run without the cache gets
    np.testing.assert_array_equal(enc2.X, fresh.X)
    for f in ("codes", "cells", "count"):
        np.testing.assert_array_equal(getattr(enc2.local, f), getattr(fresh.local, f))
    assert enc2.local.grid == fresh.local.grid and enc2.indices == list(range(len(photos)))
    assert cache.transform(again, photos, 0, progress=False)[2] is False  # other local features: another entry

    # another configuration, or a training photo edited since, is fitted again
    assert cache.fit(ConvVLAD(layers=["block11"], pooled=[], scales=[1], k=8, dim=12), train, progress=False) is False
    st = os.stat(train[3])
    os.utime(train[3], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert cache.fit(_model(), train, progress=False) is False

    # a damaged entry is computed again and replaced, not an error
    for f in (tmp_path / "cache" / "encoded").iterdir():
        f.write_bytes(b"not an npz")
    enc3, _, hit = cache.transform(again, photos, 300, progress=False)
    assert not hit and np.array_equal(enc3.X, fresh.X)
    assert cache.transform(again, photos, 300, progress=False)[2] is True


def test_a_cache_that_cannot_be_written_warns_and_the_run_goes_on(tmp_path, train_images):
    (tmp_path / "cache").write_text("a file where the folder should be")
    model = _model()
    with pytest.warns(UserWarning, match="eval cache: .* not written"):
        assert EvalCache(tmp_path / "cache").fit(model, train_images[:24], progress=False) is False
    assert model.dim == 16  # fitted all the same


def test_an_edit_anywhere_in_convlad_is_another_cache(tmp_path):
    """The key hashes the whole package, not only the study that reads it: a cache keyed on
    ``study/`` alone served encodings from before a change to mining."""
    copy = tmp_path / "convlad"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert (copy / "study" / "evalcache.py").is_file() and (copy / "verify.py").is_file()  # all of it
    before = code_version(copy)
    assert before == code_version(copy)
    with open(copy / "verify.py", "a") as f:
        f.write("\n# an edit outside the study\n")
    code_version.cache_clear()  # a run hashes once; the next run is a new process
    assert code_version(copy) != before
