"""What the local whitening learns from: the groups out of fold with a whitening learned from harder
synthetic views, made toward the pairs the groups still miss (day and night, weather, extreme
viewpoints), or with another regularisation. Each whitening is learned here the way the model
learns its own (``local_whitening``: 200 training photos against a view of each, the inliers of
those that verify sure), its pair verifier's chance level measured again on the training photos,
and the benchmark's photos (encoded once: the whitening changes only how pairs are matched) mined
and judged as ``eval --groups`` judges the rule (chosen on four folds, scored on the fifth, 3 deals),
against the same learned from the model's own views (``views.view``), paired over the benchmark's
groups.

    python experiments/probe_whitening_views.py                       # mvbench-dev, Lite0
    python experiments/probe_whitening_views.py --views light,tilt --eps 0.03,0.3
    python experiments/probe_whitening_views.py --seeds 3,4,5,6 --out docs/results/probe-whitening-views.json

``--seeds``: the model's own views drawn again, to see how far a whitening moves with its views
alone.

Views (each a crop of 35-80% of a side turned up to 25° and jittered, as ``views.view``):
- ``light``: a gamma of 0.4-2.5 instead of 0.6-1.6 and, half of the time each, a colour cast of up
  to 30% a channel, haze, darkening to 30%, noise;
- ``tilt`` / ``tilt60``: the plane seen from aside: the crop a trapezoid up to 40% / 60% narrower at
  one side, warped to the frame;
- ``light+tilt``: both.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe_local_whitening import fitted, judged, load, parser  # noqa: E402

PHOTOS = 200  # as the model learns its own (pipeline.WHITENING_IMAGES)


def harder_view(img: np.ndarray, rng: np.random.Generator, light: bool, tilt: float) -> np.ndarray:
    """``views.view`` with more light change (``light``) and a trapezoid ``tilt`` (0: none)."""
    from convlad.views import framed

    out = framed(img, rng, tilt) / 255.0
    if not light:
        return np.clip(255 * out ** rng.uniform(0.6, 1.6), 0, 255).astype(np.uint8)
    out = out ** rng.uniform(0.4, 2.5)
    if rng.random() < 0.5:
        out = out * rng.uniform(0.7, 1.3, 3)  # a colour cast
    if rng.random() < 0.5:
        k = rng.uniform(0, 0.5)
        out = out * (1 - k) + k * rng.uniform(0.45, 0.9)  # haze
    if rng.random() < 0.5:
        out = out * rng.uniform(0.3, 1.0)  # darker
    if rng.random() < 0.5:
        out = out + rng.normal(0, rng.uniform(0, 0.03), out.shape)
    return np.clip(255 * out, 0, 255).astype(np.uint8)


def learned(model, paths: list[str], codes, make, eps: float, seed: int = 2) -> np.ndarray:
    """A whitening learned as ``ConvVLAD`` learns its own, from a view of each of ``paths`` (local
    features ``codes``) made by ``make(img, rng)``; ``seed``: the views' (the model's is 2)."""
    from PIL import Image

    from convlad.images import load_image
    from convlad.local_whitening import LocalWhitening, inlier_differences
    from convlad.verify import LOCAL_K

    rng = np.random.default_rng([model.config.seed, seed])
    with tempfile.TemporaryDirectory(prefix="convlad-views-") as tmp:
        made = []
        for r, p in enumerate(paths):
            made.append(f"{tmp}/{r}.jpg")
            Image.fromarray(make(np.asarray(load_image(p).convert("RGB")), rng)).save(made[-1], quality=90)
        views = model.transform(made, progress=False, local=LOCAL_K).local
    verifier = model.verifier()
    diffs = inlier_differences(verifier, codes, views, verifier.sure)
    valid = codes.descriptors()[np.arange(codes.codes.shape[1])[None, :] < codes.count[:, None].astype(np.int64)]
    return LocalWhitening(eps).fit(diffs, valid).P_


def main():
    ap = parser()
    ap.add_argument("--views", default="light,tilt,tilt60,light+tilt", help="view kinds (comma-separated)")
    ap.add_argument("--eps", default="0.03,0.3", help="other regularisations, with the model's views")
    ap.add_argument("--seeds", default="", help="the model's views drawn again with these seeds (comma-separated)")
    ap.add_argument("--photos", default="", help="the model's views of this many training photos (comma-separated)")
    a = ap.parse_args()
    bench, train, truth, cache = load(a)
    from convlad.groups import grouping
    from convlad.local_whitening import EPS
    from convlad.pipeline import Config
    from convlad.study.grouping import bootstrap
    from convlad.study.metrics import grouping_scores
    from convlad.verify import LOCAL_K, chance_level
    from convlad.views import view

    model, enc = fitted(Config(backbone=a.backbone), train, bench, cache)
    paths = train[::2][:PHOTOS]
    codes = model.transform(paths, progress=False, local=LOCAL_K).local
    tl = model.transform(train[::2], progress=False, local=LOCAL_K).local  # the chance level's photos
    kinds = {"light": (True, 0.0), "tilt": (False, 0.4), "tilt60": (False, 0.6), "light+tilt": (True, 0.4)}
    trials = [("model's views", view, EPS)]
    trials += [(k, lambda img, rng, k=k: harder_view(img, rng, *kinds[k]), EPS) for k in a.views.split(",") if k]
    trials += [(f"model's views, eps {e:g}", view, e) for e in (float(x) for x in a.eps.split(",") if x)]
    trials = [(*t, 2, PHOTOS) for t in trials]
    trials += [(f"model's views, seed {k}", view, EPS, int(k), PHOTOS) for k in a.seeds.split(",") if k]
    trials += [(f"model's views of {n} photos", view, EPS, 2, int(n)) for n in a.photos.split(",") if n]
    runs = {}
    for name, make, eps, seed, n in trials:
        print(f"{name} ...", flush=True)
        if n > len(codes):
            paths = train[::2] + train[1::2]
            codes = model.transform(paths[:n], progress=False, local=LOCAL_K).local
        model.local_whitening_ = learned(model, paths[:n], codes[np.arange(n)], make, eps, seed)
        model.pair_chance_ = chance_level(tl, stored=model.local_codec_.stored(tl), verifier=model.pair_verifier())
        v, E, w, r = judged(model, enc, truth)
        full = grouping_scores(grouping(enc.X, E, w, v.sure, v.chance), truth)  # the default rule, as it is
        runs[name] = r, model.pair_chance_, full
    base, report = runs["model's views"][0], {}
    for name, (r, chance, full) in runs.items():
        print(f"{name:<26} chance {chance}  default rule: F1 {full['pairwise_f1']:.3f} P {full['pairwise_precision']:.3f} "
              f"B3 {full['bcubed_f1']:.3f}; out of fold:  " + "  ".join(
            f"F1 {x.scores['pairwise_f1']:.3f} P {x.scores['pairwise_precision']:.3f} B3 {x.scores['bcubed_f1']:.3f}"
            for x in r))
        gains = [(x.scores["pairwise_f1"] - b.scores["pairwise_f1"], *bootstrap(truth, x, b)) for x, b in zip(r, base)]
        if r is not base:
            print(" " * 27 + "gain " + ", ".join(f"{g:+.3f} [{lo:+.3f}, {hi:+.3f}]" for g, lo, hi in gains))
        report[name] = {"chance": int(chance), "default_rule": full, "out_of_fold": [x.scores for x in r],
                        "gain_f1": gains}
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
