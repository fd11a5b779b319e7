"""How the groups of a collection agree with a benchmark's (``convlad eval --groups``): the groups'
rule (``groups.Rule``) chosen among candidates by group-wise K-fold, beside baselines chosen the same
way, each scored out of fold with a 95% bootstrap interval over the benchmark's groups.

Candidates, each a grouping of the database photos (a label per photo):
- **verified links**: ``groups.links`` over the mined pairs (the 20 nearest of each photo, verified),
  for each rule of ``GRID`` (weak inliers as a multiple of the chance level, a cosine floor, the
  support it takes to join two groups: 2 or 3, never one weak pair alone); ``weak`` at 3
  (``verify.SURE``) is the sure pairs alone;
- **global cosine**: components of the pairs among each photo's 20 nearest at a cosine threshold
  (the fastdup recipe on convlad's own descriptor);
- **perceptual hash**: components of the pairs within a Hamming distance of ``imagehash``'s pHash
  (where imagehash is installed; the duplicates finder people use);
- **verified links and a second look** (``eval --groups --second-look``): each of those, with each
  photo it leaves alone joined through its best second look (``second_look.py``: ASIFT against its
  2 or 5 nearest (``LOOK_NEIGHBOURS``), for each photo in no sure pair) from each level of
  ``LOOK_LEVELS``;
- **peers**: groupings from a JSON file (``experiments/peer_fastdup.py``: fastdup's components per
  ``ccthreshold``).

Out of fold: the photos are dealt into K folds by whole groups (distractors are groups of one); for
each fold the candidate with the best pairwise F1 on the other folds' photos (the more precise on
ties, then the first) groups the whole collection, and judges the held fold's photos
(``held_out_scores``): each pair of photos counts once, half by the choice of each of its two
photos' folds (wholly by one where both are in it). A pair across folds is never a true pair, as the
folds keep groups whole, so it can only be wrongly joined: scoring each fold's photos apart would
leave out about four fifths of the wrong pairs and none of the right ones. Apart, fastdup's
components scored a precision of 0.90 out of fold on mvbench-dev, and 0.63 this way
(docs/defaults.md, "Groups").
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .folds import group_folds
from .metrics import grouping_scores

# Support starts at 2: at 1 a single weak pair merges two groups, the chaining that issue 35 asks the
# rule to guard against. The folds cannot see that risk where the two groups it merges are both
# held out: with support 1 in the grid, folds chose it 5 times in 15 on mvbench-dev, and the US
# Capitol joined Sacré-Cœur out of fold (docs/defaults.md, "Groups").
GRID = {"weak": (1.5, 1.75, 2.0, 2.5, 3.0), "similarity": (0.0, 0.5, 0.6, 0.7, 0.8), "support": (2, 3)}
COSINES = tuple(round(float(t), 3) for t in np.arange(0.6, 0.9751, 0.025))
HAMMING = (0, 2, 4, 6, 8, 10, 12, 14)
NEIGHBOURS = 20
# ASIFT inliers from which a photo alone joins through a second look: from 10, just over the
# 99th percentile of unrelated training photos against their nearest (8) and mvbench-dev's
# unrelated neighbours' most (9), to 30
LOOK_LEVELS = (10, 12, 15, 20, 25, 30)
LOOK_NEIGHBOURS = (2, 5)  # how many of a lonely photo's nearest are looked at, to choose among
SECOND_LOOK_CACHE = "second-look.json"


def rule_name(weak: float, similarity: float, support: int) -> str:
    return f"weak={weak:g} similarity={similarity:g} support={support}"


def rule_candidates(edges, inliers, X, sure: int, chance: int, grid: dict | None = None) -> dict[str, np.ndarray]:
    """Each rule of ``grid`` (``GRID``) over the mined ``edges`` ((m, 2) rows of ``X``, their
    ``inliers``): name → a label per row."""
    from ..groups import Rule, labels, links, similarities

    grid = GRID if grid is None else grid
    E = np.asarray(edges, np.int64).reshape(-1, 2)
    sim = similarities(X, E)
    out = {}
    for weak in grid["weak"]:
        for s in grid["similarity"]:
            for k in grid["support"]:
                out[rule_name(weak, s, k)] = labels(len(X), links(E, inliers, sim, sure, chance, Rule(weak, s, k)))
    return out


def look_candidates(cands: dict[str, np.ndarray], looks, levels=LOOK_LEVELS,
                    neighbours=LOOK_NEIGHBOURS) -> dict[str, np.ndarray]:
    """Each grouping of ``cands`` with the photos it leaves alone joined through their best second
    look (``groups.second_looks`` over ``looks``: pairs of rows, their inliers and ranks, as
    ``second_look_pairs`` gives them), looking at each of ``neighbours`` nearest, from each of
    ``levels``: ``"NAME look=LEVEL n=NEIGHBOURS"``."""
    from ..groups import labels, second_looks

    out = {}
    for name, lab in cands.items():
        lab = np.asarray(lab)
        linked = np.flatnonzero(np.bincount(lab)[lab] > 1)
        _, first = np.unique(lab, return_index=True)
        kept = np.stack([np.arange(len(lab)), first[lab]], 1)  # each photo to its group's first
        for n in neighbours:
            near = looks[2] <= n
            for lv in levels:
                extra = second_looks(linked, looks[0][near], looks[1][near], lv)
                out[f"{name} look={lv} n={n}"] = labels(len(lab), np.concatenate([kept, extra]))
    return out


def second_look_pairs(X, edges, inliers, sure: int, paths, cache_root=None, progress: bool = True,
                      neighbours: int = max(LOOK_NEIGHBOURS)):
    """What a store that looks again keeps of a benchmark's photos (``IndexStore.create(second_look=
    True)``): each photo in no sure pair of the mined ``edges`` against its ``neighbours`` nearest
    by ``X``, as (pairs of rows (m, 2), each once, a < b; their ASIFT inliers (m,), 0 where an
    overlay's (``second_look.is_overlay``); the rank (m,), from 1, at which a lonely end has the
    other among its nearest, the nearer where both are lonely). Pairs' inliers are kept in ``cache_root`` (a folder), keyed by both files' real paths,
    sizes and modification times and the second look's settings: it costs 1-3 s a pair."""
    import hashlib
    import os

    from .. import progress as P
    from .. import second_look as L
    from ..pairs import nearest
    from ..storage import write_durable

    E, w = np.asarray(edges, np.int64).reshape(-1, 2), np.asarray(inliers)
    lonely = np.setdiff1d(np.arange(len(X)), E[w >= sure])
    _, nn = nearest(X, neighbours)
    a, b = np.repeat(lonely, nn.shape[1]), nn[lonely].ravel()
    r = np.tile(np.arange(1, nn.shape[1] + 1), len(lonely))
    Q, r = np.sort(np.stack([a, b], 1), 1)[b >= 0], r[b >= 0]
    order = np.lexsort((r, Q[:, 1], Q[:, 0]))  # the nearer rank first within each pair
    Q, r = Q[order], r[order]
    first = np.concatenate([[True], (Q[1:] != Q[:-1]).any(1)]) if len(Q) else np.zeros(0, bool)
    pairs, rank = Q[first], r[first]
    paths = [str(p if isinstance(p, (str, os.PathLike)) else p[0]) for p in paths]
    settings = f"{L.MAX_SIDE}|{L.TILTS}|{L.PER_VIEW}|{L.RATIO}|{L.PX}|{L.GRID}|overlay"

    stamp = {}  # each photo's file, read once however many pairs it is in

    def key(i, j):
        for k in (i, j):
            if k not in stamp:
                st = os.stat(paths[k])
                stamp[k] = (os.path.realpath(paths[k]), st.st_size, st.st_mtime_ns)
        return hashlib.sha1(json.dumps([[stamp[i], stamp[j]], settings]).encode()).hexdigest()

    f = Path(cache_root) / SECOND_LOOK_CACHE if cache_root is not None else None
    known = {}
    if f is not None and f.is_file():
        try:
            known = json.loads(f.read_text())
        except ValueError:
            known = {}
    keys = [key(i, j) for i, j in pairs.tolist()]
    todo = [k for k, h in enumerate(keys) if h not in known]

    def keep():
        if f is not None:
            f.parent.mkdir(parents=True, exist_ok=True)
            write_durable(f, lambda fh: fh.write(json.dumps(known).encode()))

    if todo:
        def each(r, _, inl, overlay):  # kept every 50 pairs: a run stopped halfway resumes there
            known[keys[todo[r]]] = [inl, overlay]
            if r % 50 == 49:
                keep()

        with P.bar(len(todo), "second look (ASIFT)", "pair", enabled=progress) as bar:
            L.look(pairs[todo, 0], pairs[todo, 1:], lambda rows: [paths[r] for r in rows], bar, each)
        keep()
    inl = np.array([known[h][0] for h in keys], np.int64).reshape(-1)
    overlay = np.array([known[h][1] for h in keys], bool).reshape(-1)
    return pairs, np.where(overlay, 0, inl), rank


def cosine_candidates(X, thresholds=COSINES, neighbours: int = NEIGHBOURS) -> dict[str, np.ndarray]:
    """Components of the pairs among each row's ``neighbours`` nearest with cosine ≥ each threshold."""
    from ..groups import labels
    from ..pairs import nearest

    sims, rows = nearest(X, neighbours)
    a = np.repeat(np.arange(len(X)), rows.shape[1])
    b, s = rows.ravel(), sims.ravel()
    return {f"cosine={t:g}": labels(len(X), np.stack([a, b], 1)[(b >= 0) & (s >= t)]) for t in thresholds}


def hash_candidates(paths, distances=HAMMING) -> dict[str, np.ndarray] | None:
    """Components of the pairs of photos whose pHash (``imagehash``, 64 bits) differ in at most each
    number of bits; None where imagehash is not installed. Every pair is compared (O(n²) bits)."""
    try:
        import imagehash
    except ImportError:
        return None
    from PIL import Image

    from ..groups import labels

    H = []
    for p in paths:
        with Image.open(p) as im:
            H.append(np.packbits(imagehash.phash(im).hash.ravel()))
    H = np.stack(H)
    bits = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(1)  # set bits of each byte
    near = []  # (i, j, bits apart) of the pairs within the largest distance, a block of rows at a time
    for lo in range(0, len(H), 512):
        d = bits[H[lo:lo + 512, None, :] ^ H[None, :, :]].sum(2)
        i, j = np.nonzero(d <= max(distances))
        keep = lo + i < j
        near.append(np.stack([lo + i[keep], j[keep], d[i[keep], j[keep]]], 1))
    near = np.concatenate(near) if near else np.zeros((0, 3), np.int64)
    return {f"hamming={t}": labels(len(paths), near[near[:, 2] <= t, :2]) for t in distances}


def peer_candidates(file: Path, paths) -> tuple[str, dict[str, np.ndarray]]:
    """A peer's groupings from ``file`` (``{"peer", "paths", "candidates": {name: [label, ...]}}``),
    aligned with ``paths``; a ValueError naming the file where they are not the same photos."""
    try:
        doc = json.loads(Path(file).read_text())
        got = {p: k for k, p in enumerate(doc["paths"])}
        at = [got[p] for p in paths]
        cands = {name: np.asarray(labs, dtype=object)[at].astype(str) for name, labs in doc["candidates"].items()}
    except (OSError, ValueError, KeyError, TypeError) as e:
        missing = f"no photo {e}" if isinstance(e, KeyError) else str(e)
        raise ValueError(f"{file}: not a peer's groupings of this benchmark's photos ({missing})") from None
    return str(doc.get("peer", Path(file).stem)), cands


@dataclass
class Chosen:
    """A family's out-of-fold result: each fold's choice grouping the whole collection (``parts``:
    (the fold's photos, bool; the labels of all photos under its choice)), the candidate each fold
    chose, and the held folds' scores (``held_out_scores``). ``labels``: the held photos' labels,
    each fold's apart (a picture of what each fold's choice made of its own photos)."""

    name: str
    labels: np.ndarray
    chosen: list[str]
    scores: dict = field(default_factory=dict)
    parts: list = field(default_factory=list)


def choose(cands: dict[str, np.ndarray], truth, train: np.ndarray) -> str:
    """The candidate with the best pairwise F1 on the ``train`` photos (bool), the more precise on
    ties, then the first."""
    truth = np.asarray(truth, dtype=object)

    def fit(c):
        s = grouping_scores(np.asarray(cands[c])[train], truth[train])
        return s["pairwise_f1"], s["pairwise_precision"]

    return max(cands, key=fit)  # max keeps the first of ties


def cross_validate(cands: dict[str, np.ndarray], truth, folds: np.ndarray, name: str = "") -> Chosen:
    truth = np.asarray(truth, dtype=object)
    out = np.empty(len(truth), dtype=object)
    chosen, parts = [], []
    for f in np.unique(folds):
        train, held = folds != f, folds == f
        best = choose(cands, truth, train)
        chosen.append(best)
        out[held] = [f"{f}:{x}" for x in cands[best][held]]
        parts.append((held, np.asarray(cands[best], dtype=object)))
    c = Chosen(name, out, chosen, {}, parts)
    c.scores = held_out_scores(c, truth)
    return c


def _parts(found, n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``found`` as (held, labels) parts: a ``Chosen``'s folds, or one grouping (labels) of all photos."""
    if isinstance(found, Chosen):
        return found.parts
    return [(np.ones(n, bool), np.asarray(found, dtype=object))]


def _tables(t: np.ndarray, found):
    """Per part of ``found`` (``_parts``), one at a time: (B, the photos in each (found group, true
    group) pair of the part's grouping of all photos; the true groups whose photos the part holds,
    0/1; each photo's found group)."""
    G = int(t.max()) + 1
    for held, labels in _parts(found, len(t)):
        _, f = np.unique(np.asarray(labels, dtype=object).astype(str), return_inverse=True)
        B = np.zeros((f.max() + 1, G))
        np.add.at(B, (f, t), 1)
        u = np.zeros(G)
        u[np.unique(t[held])] = 1.0
        yield B, u, f


def _pair_counts(t: np.ndarray, found, W: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rightly joined, wrongly joined, true pairs), one each per row of the true groups' weights
    ``W`` (r, G). A group weighing w counts w times in the right and the true pairs, and the wrong
    pairs between groups g and h count w_g·w_h (copies of a group are not pairs of each other). A
    wrong pair is judged half by the part holding each of its two groups (wholly where one holds
    both): with u the part's groups, Σ over the part's found groups of ((W·u)·Bᵀ)(W·Bᵀ) less the
    diagonal, halved, counts exactly that."""
    right, wrong = np.zeros(len(W)), np.zeros(len(W))
    for B, u, _ in _tables(t, found):
        right += W @ (u * (B * (B - 1) / 2).sum(0))
        S, Su, Qu = W @ B.T, (W * u) @ B.T, (W ** 2 * u) @ (B ** 2).T
        wrong += ((Su * S - Qu) / 2).sum(1)
    sizes = np.bincount(t).astype(np.float64)
    return right, wrong, W @ (sizes * (sizes - 1) / 2)


def held_out_scores(found, truth) -> dict[str, float]:
    """``metrics.grouping_scores`` of ``found``: a grouping (a label per photo) or a ``Chosen``, whose
    folds each judge their own photos (the module's docstring). Pairwise: each pair counted once,
    half by each of its photos' folds. B-cubed: each photo's found group is its fold's, among all
    the photos."""
    _, t = np.unique(np.asarray(truth, dtype=object).astype(str), return_inverse=True)
    tp, fp, tr = (float(x[0]) for x in _pair_counts(t, found, np.ones((1, t.max() + 1))))
    p = tp / (tp + fp) if tp + fp else 1.0
    r = tp / tr if tr else 1.0
    bp, br = np.zeros(len(t)), np.zeros(len(t))
    for (held, _), (B, _, f) in zip(_parts(found, len(t)), _tables(t, found)):
        cell = B[f, t]
        bp[held], br[held] = (cell / B.sum(1)[f])[held], (cell / B.sum(0)[t])[held]
    bp, br = float(bp.mean()), float(br.mean())
    return {"pairwise_precision": p, "pairwise_recall": r, "pairwise_f1": 2 * p * r / (p + r) if p + r else 0.0,
            "bcubed_precision": bp, "bcubed_recall": br, "bcubed_f1": 2 * bp * br / (bp + br) if bp + br else 0.0}


def bootstrap(truth, found, other=None, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the pairwise F1 of ``found`` (a grouping, or a ``Chosen`` judged as
    ``held_out_scores`` judges it), or of ``found`` minus ``other``'s on the same resamples, the
    benchmark's groups drawn with replacement (weights as ``_pair_counts`` counts them)."""
    _, t = np.unique(np.asarray(truth, dtype=object).astype(str), return_inverse=True)
    rng = np.random.default_rng(seed)
    W = rng.multinomial(t.max() + 1, np.full(t.max() + 1, 1 / (t.max() + 1)), n_boot).astype(np.float64)

    def f1(x):
        tp, wrong, tr = _pair_counts(t, x, W)
        p, r = tp / np.maximum(tp + wrong, 1e-12), tp / np.maximum(tr, 1e-12)
        return np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-12), 0.0)

    got = f1(found) - (f1(other) if other is not None else 0)
    return tuple(float(x) for x in np.percentile(got, [2.5, 97.5]))


def evaluate_groups(model, bench, cache=None, k: int = 5, seeds: int = 3, peers=(), report=print,
                    progress: bool = True, second_look: bool = False) -> dict:
    """``study`` on a benchmark (``datasets.load_groups``) with ``model`` fitted: its database photos
    encoded (through the ``evalcache.EvalCache`` ``cache``) and mined as an index mines them, and
    looked at again as an index that looks again does (``second_look``: ``second_look_pairs``). A
    ValueError where the benchmark has no groups of its database photos (the mvbench layout)."""
    from ..pairs import mine
    from ..verify import LOCAL_K
    from .evaluate import encode_benchmark, grouping_of

    truth = grouping_of(bench)
    if truth is None:
        raise ValueError(f"{bench.name}: --groups needs every photo of a group on a row of its own (the mvbench layout)")
    if len(set(truth)) < k:
        raise ValueError(f"{bench.name}: {k} folds need at least {k} groups")
    enc, _, _, _ = encode_benchmark(model, bench, LOCAL_K, progress, cache)
    v = model.pair_verifier()
    E, w = mine(enc.X, enc.local, v, progress, edges=True, stored=model.local_codec_.stored(enc.local))
    looks = second_look_pairs(enc.X, E, w, v.sure, bench.paths, cache.root if cache is not None else None,
                              progress) if second_look else None
    return study(enc.X, E, w, v.sure, v.chance, truth, bench.paths, k, seeds, peers, report, looks=looks)


def study(X, edges, inliers, sure: int, chance: int, truth, paths, k: int = 5, seeds: int = 3,
          peers: list[Path] = (), report=print, default_rule=None, looks=None) -> dict:
    """The grouping study: each family chosen out of fold (``k`` folds, ``seeds`` deals), the default
    rule (``default_rule``, fixed) and the gain of the rule chosen out of fold over each baseline,
    with intervals. ``looks``: a second look's pairs of rows and their inliers
    (``second_look_pairs``), for the family that adds it (the one whose gains are reported) and the
    default rule's. Reports a table (``report``, a line a call) and returns it as a JSON-able dict."""
    from .. import second_look as L
    from ..groups import Rule, grouping

    truth = np.asarray(truth, dtype=object)
    rule = default_rule or Rule()
    E = np.asarray(edges, np.int64).reshape(-1, 2)
    as_index = None if looks is None else (looks[0][looks[2] <= L.NEIGHBOURS], looks[1][looks[2] <= L.NEIGHBOURS])
    default = grouping(X, E, inliers, sure, chance, rule, looks=as_index)
    families = {"verified links": rule_candidates(X=X, edges=E, inliers=inliers, sure=sure, chance=chance)}
    ours_name = "verified links"
    if looks is not None:
        ours_name = "links and a second look"
        families[ours_name] = {**families["verified links"], **look_candidates(families["verified links"], looks)}
    families["global cosine"] = cosine_candidates(X)
    hashes = hash_candidates(paths)
    if hashes is None:
        report("perceptual hash: left out (pip install imagehash)")
    else:
        families["perceptual hash"] = hashes
    for f in peers:
        peer, cands = peer_candidates(f, paths)
        families[peer] = cands
    doc = {"photos": len(truth), "groups": int(sum(1 for g in set(truth) if list(truth).count(g) > 1)),
           "folds": k, "default_rule": rule_name(rule.weak, rule.similarity, rule.support)
           + (f" look={rule.look} n={L.NEIGHBOURS}" if looks is not None and rule.look is not None else ""),
           "default": grouping_scores(default, truth), "families": {}}
    d = doc["default"]
    report(f"{'grouping':<34}{'pairwise P':>11}{'R':>7}{'F1 [95%]':>22}{'B-cubed F1':>12}   chosen per fold")
    report(f"{'default rule (fixed)':<34}{d['pairwise_precision']:>11.3f}{d['pairwise_recall']:>7.3f}"
           f"{_with(d['pairwise_f1'], bootstrap(truth, default)):>22}{d['bcubed_f1']:>12.3f}   {doc['default_rule']}")
    held = {}
    for name, cands in families.items():
        rows = []
        for seed in range(seeds):
            c = cross_validate(cands, truth, group_folds(list(truth), k, seed), name)
            rows.append({"seed": seed, "scores": c.scores, "chosen": c.chosen})
            if seed == 0:
                held[name] = c
        s = rows[0]["scores"]
        doc["families"][name] = {"out_of_fold": rows, "interval_f1": bootstrap(truth, held[name]),
                                 "full_set": {c: grouping_scores(lab, truth) for c, lab in cands.items()}}
        seeds_f1 = "/".join(f"{r['scores']['pairwise_f1']:.3f}" for r in rows)
        report(f"{name + ' (K-fold)':<34}{s['pairwise_precision']:>11.3f}{s['pairwise_recall']:>7.3f}"
               f"{_with(s['pairwise_f1'], doc['families'][name]['interval_f1']):>22}{s['bcubed_f1']:>12.3f}   "
               f"{_common(held[name].chosen)}; F1 over seeds {seeds_f1}")
    ours = held[ours_name]
    for name, c in held.items():
        if name == ours_name:
            continue
        lo, hi = bootstrap(truth, ours, c)
        gain = ours.scores["pairwise_f1"] - c.scores["pairwise_f1"]
        doc["families"][name]["gain_of_verified_links"] = {"f1": gain, "interval": (lo, hi), "of": ours_name}
        report(f"{ours_name} over {name}: F1 {gain:+.3f} [{lo:+.3f}, {hi:+.3f}]")
    return doc


def _with(v: float, iv) -> str:
    return f"{v:.3f} [{iv[0]:.3f}, {iv[1]:.3f}]"


def _common(chosen: list[str]) -> str:
    counts = {c: chosen.count(c) for c in chosen}
    return ", ".join(f"{c} ×{n}" if n > 1 else c for c, n in sorted(counts.items(), key=lambda x: -x[1]))


__all__ = ["COSINES", "Chosen", "GRID", "HAMMING", "LOOK_LEVELS", "bootstrap", "choose", "cosine_candidates", "cross_validate",
           "evaluate_groups", "hash_candidates", "held_out_scores", "look_candidates", "peer_candidates", "rule_candidates",
           "rule_name", "second_look_pairs", "study"]
