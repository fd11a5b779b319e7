"""Choosing settings without tuning to the benchmark: group-wise K-fold cross-validation.

A setting picked on a benchmark's full set is scored on the photos that picked it, and on photos
nobody tuned on its gain shrinks (on a held-out benchmark, dev-tuned gains kept a third). Here the
benchmark's groups (an object or place each) are dealt into K folds; for each fold, the candidate
with the best mAP on the other K − 1 is chosen and scored on the held one. The held-out scores of
all folds, together, are the out-of-fold APs: what the procedure "choose by mAP on this benchmark"
is worth on queries it did not see, with a bootstrap interval over queries.

Candidates are a grid (``parse_grid``): descriptor keys (``layer``, ``pooled``, ``power``, ``gem``)
need a model fitted and the benchmark encoded each; ``whiten=collection`` learns a whitening from
pairs mined in the encoded benchmark and ``augment=verified`` augments its database descriptors over
them (``whitening.py``, no labels, no refit; without an ``augment`` key every candidate is
augmented, as eval's and an index's default is); the search's and the verifier's keys (``rerank``,
``features``, ``min_similarity``, ``threshold``, ``min_tentative``, ``score``, ``chance``,
``level``, ``per``, ``cap``) are re-scored on one encoding, and each verification geometry is
computed once (``SearchGrid``), the order then by ``Verifier.order_by``, as ``search.rank`` ends.
The first value of every key is the baseline.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace

import numpy as np

from .. import progress as P
from .evaluate import query_aps, query_descriptors
from .metrics import bootstrap_difference
from ..search import MemoryIndex, Settings, plain_distances, rank, reorder
from ..verify import Evidence, LocalCodes, Verifier
from ..pairs import AUGMENT, check_augment

DESCRIPTOR_KEYS = ("layer", "pooled", "power", "gem")
COLLECTION_KEYS = ("whiten", "augment")  # learned from the encoded benchmark itself: no refit
SEARCH_KEYS = ("rerank", "features", "min_similarity", "threshold", "min_tentative", "score", "chance", "level",
               "per", "cap", "link")
_INT = {"rerank", "features", "min_tentative", "chance"}
_STR = {"layer", "pooled", "score", "whiten", "augment"}
_BOOL = {"link": {"on": True, "off": False}}


def parse_grid(specs: list[str]) -> dict[str, list]:
    """``["per=5,10", "score=inliers,significance"]`` → {"per": [5.0, 10.0], ...}, keys in order."""
    grid: dict[str, list] = {}
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip().replace("-", "_")
        keys = DESCRIPTOR_KEYS + COLLECTION_KEYS + SEARCH_KEYS
        if not sep or key not in keys:
            raise ValueError(f"--grid {spec!r}: expected KEY=V1,V2,... with KEY one of {', '.join(keys)}")
        out = []
        for v in values.split(","):
            v = v.strip()
            if key in _BOOL:
                if v not in _BOOL[key]:
                    raise ValueError(f"--grid {spec!r}: {key} is {' or '.join(_BOOL[key])}")
                out.append(_BOOL[key][v])
                continue
            try:
                out.append(v if key in _STR else None if v == "auto" and key in ("chance", "min_tentative")
                           else int(v) if key in _INT else float(v))
            except ValueError:
                raise ValueError(f"--grid {spec!r}: {v!r} is not a number") from None
        if key == "score" and set(out) - {"inliers", "significance"}:
            raise ValueError(f"--grid {spec!r}: score is inliers or significance")
        if key == "whiten" and set(out) - {"pca", "collection"}:
            raise ValueError(f"--grid {spec!r}: whiten is pca or collection")
        if key == "augment":
            for v in out:
                check_augment(v, f"--grid {spec!r}: augment")
        if not out or key in grid:
            raise ValueError(f"--grid {spec!r}: give each key once, with at least one value")
        grid[key] = out
    return grid


def combinations(grid: dict[str, list], keys) -> list[dict]:
    """Every combination of the grid's values for ``keys`` (the first one: each key's first value)."""
    ks = [k for k in grid if k in keys]
    return [dict(zip(ks, vals)) for vals in itertools.product(*(grid[k] for k in ks))]


def group_folds(groups: list, k: int = 5, seed: int = 0) -> np.ndarray:
    """Each query's fold (0 … k−1): whole groups dealt at random, largest first, each to the fold
    with the fewest queries so far, so folds are balanced and no group is split."""
    names = sorted(set(groups))
    if k < 2 or k > len(names):
        raise ValueError(f"{k} folds need 2 to {len(names)} (the number of groups)")
    sizes = {g: groups.count(g) for g in names}
    rng = np.random.default_rng(seed)
    order = [names[i] for i in rng.permutation(len(names))]
    order.sort(key=lambda g: -sizes[g])  # stable: random among groups of one size
    load, fold_of = np.zeros(k, int), {}
    for g in order:
        f = int(np.argmin(load))
        fold_of[g] = f
        load[f] += sizes[g]
    return np.array([fold_of[g] for g in groups])


@dataclass
class CrossValidation:
    """Out-of-fold result of choosing among ``aps`` (name → per-query APs) by mAP."""

    folds: np.ndarray
    chosen: list[str]  # per fold
    oof_aps: np.ndarray
    baseline: str
    aps: dict[str, np.ndarray] = field(repr=False)

    @property
    def mAP(self) -> float:
        return float(np.nanmean(self.oof_aps))

    def full_map(self, name: str) -> float:
        return float(np.nanmean(self.aps[name]))

    def gain(self, over: np.ndarray | None = None, n_boot: int = 10_000) -> tuple[float, float, float]:
        """Out-of-fold mAP minus ``over``'s APs (default: the baseline's): mean and 95% interval."""
        return bootstrap_difference(self.aps[self.baseline] if over is None else over, self.oof_aps, n_boot)


def cross_validate(aps: dict[str, np.ndarray], folds: np.ndarray, baseline: str | None = None) -> CrossValidation:
    """Pick, for each fold, the candidate of best mAP on the other folds (ties: the earlier, so the
    baseline wins a tie), and score it on the held fold."""
    names = list(aps)
    baseline = baseline or names[0]
    A = np.stack([np.asarray(aps[n], np.float64) for n in names])
    oof = np.full(A.shape[1], np.nan)
    chosen = []
    for f in range(int(folds.max()) + 1):
        held = folds == f
        best = int(np.argmax(np.round(np.nanmean(A[:, ~held], axis=1), 12)))
        chosen.append(names[best])
        oof[held] = A[best, held]
    return CrossValidation(folds, chosen, oof, baseline, aps)


def judge(families: dict, reference, bench, seeds: int = 3, report=print) -> dict:
    """Each family's candidates (name → per-query APs) against the default's APs (``reference(family)``):
    the full set's best, and the out-of-fold choice among the default and the candidates for
    ``seeds`` deals of the folds, reported as a table (``report``, one line a call) and returned as a
    JSON-able dict. The protocol every experiment judges its families by (experiments/, docs/defaults.md)."""
    rows = {}
    report(f"\n{'family':<20}{'candidates':>11}  {'full-set best':>44}   out of fold, seeds 0/1/2 (gain [95%])")
    for name, cands in families.items():
        ref = reference(name)
        best = max(cands, key=lambda k: cands[k].mean())
        row = {"candidates": len(cands), "full_set": {k: float(c.mean()) for k, c in cands.items()},
               "full_set_best": best, "full_set_mAP": float(cands[best].mean()),
               "full_set_gain": bootstrap_difference(ref, cands[best]), "out_of_fold": []}
        for seed in range(seeds):
            cv = cross_validate({"default": ref, **cands}, group_folds(bench.groups, 5, seed), baseline="default")
            row["out_of_fold"].append({"seed": seed, "mAP": cv.mAP, "gain": cv.gain(), "chosen": cv.chosen})
        rows[name] = row
        oof = "; ".join(f"{r['mAP']:.4f} ({r['gain'][0]:+.3f} [{r['gain'][1]:+.3f}, {r['gain'][2]:+.3f}])"
                        for r in row["out_of_fold"])
        report(f"{name:<20}{len(cands):>11}  {best:>37} {cands[best].mean():.4f}   {oof}")
    return rows


def candidate_name(params: dict) -> str:
    return " ".join(f"{k}={'auto' if v is None else ('on' if v else 'off') if isinstance(v, bool) else f'{v:g}' if isinstance(v, float) else v}"
                    for k, v in params.items()) or "baseline"


class SearchGrid:
    """One encoded benchmark, ranked under many search settings: each query's global shortlist
    once, the verification's evidence once per geometry (``features``, ``min_similarity``,
    ``threshold``, at the grid's lowest gate, a higher gate applied afterwards from the tentative
    counts), then each scoring re-ordered by ``Verifier.order_by``."""

    def __init__(self, bench, X, X_q=None, local: LocalCodes | None = None, local_q: LocalCodes | None = None,
                 verifier: Verifier | None = None, progress: bool = False, pairs=None, stored: LocalCodes | None = None):
        self.bench, self.verifier, self.progress = bench, verifier or Verifier(), progress
        self.local, self.local_q = local, local_q
        self.stored = local if stored is None else stored  # the candidates' side, as an index keeps it
        self.junk = [sorted(j) for j in bench.junk]
        self.index = index = MemoryIndex(X, None, pairs=pairs)
        Q = query_descriptors(bench, X, X_q)  # as evaluate_descriptors
        hits = rank(index, Q, None, Settings(k=len(X), rerank=0), exclude=self.junk)
        self.ids = [np.array([h.id for h in row], np.int64) for row in hits]
        # what verification scores by: the distances searched, or an augmented index's plain ones (as ``search.rerank``)
        self.dist = [plain_distances(index.vectors(i), q).astype(np.float64) if index.augmented
                     else np.array([h.distance for h in row], np.float64) for i, q, row in zip(self.ids, Q, hits)]
        self._evidence: dict = {}
        # each query's local features: its database row's, or its row among the extra queries
        extra = np.cumsum([d is None for d in bench.query_db]) - 1
        self._rows = [(local_q, int(e)) if d is None else (local, d) for d, e in zip(bench.query_db, extra)]

    def _features(self, q: int, k: int):
        codes, row = self._rows[q]
        dq, xq = codes.features(row)
        return dq[:k], xq[:k]

    def evidence(self, depth: int, features: int, v: Verifier) -> list[Evidence]:
        key = (features, v.min_similarity, v.threshold)
        have = self._evidence.get(key)
        if have is None or have[0] < depth or have[1] > v.gate:
            gate = v.gate if have is None else min(have[1], v.gate)
            depth = max(depth, have[0] if have else 0)
            fit = replace(v, min_tentative=gate, score="inliers")
            codes = _truncate(self.stored, features)
            ev = []
            with P.bar(len(self.ids), f"verifying (features={features}, min_similarity={v.min_similarity:g}, "
                       f"threshold={v.threshold:g})", "query", enabled=self.progress) as bar:
                for q in range(len(self.ids)):
                    ev.append(fit.evidence(self._features(q, features), codes[self.ids[q][:depth]]))
                    bar.update(1)
            self._evidence[key] = have = (depth, gate, ev)
        return have[2]

    def prepare(self, candidates: list[dict]):
        """Compute each geometry's evidence once, at the deepest shortlist and lowest gate asked."""
        need: dict = {}
        for params in candidates:
            depth, features, v = self._settings(params)
            if depth and self.local is not None:
                key = (features, v.min_similarity, v.threshold)
                d, g, _ = need.get(key, (0, 10**9, None))
                need[key] = (max(d, depth), min(g, v.gate), v)
        for (features, _, _), (depth, gate, v) in need.items():
            self.evidence(depth, features, replace(v, min_tentative=gate))

    def _settings(self, params: dict):
        p = dict(params)
        depth = int(p.pop("rerank", 100))
        features = int(p.pop("features", self.local.codes.shape[1] if self.local is not None else 0))
        # chance=auto (None): the model's own level
        given = {k: val for k, val in p.items() if k in SEARCH_KEYS and (val is not None or k == "min_tentative")}
        return depth, features, replace(self.verifier, **given)

    def aps(self, params: dict) -> np.ndarray:
        """Per-query APs under ``params`` (search keys; missing ones: the defaults)."""
        depth, features, v = self._settings(params)
        rankings = []
        evs = self.evidence(depth, features, v) if depth and self.local is not None else None
        for q in range(len(self.ids)):
            ids = self.ids[q]
            if evs is not None:
                order, _ = reorder(self.index, ids[:depth], self.dist[q][:depth], v.gated(evs[q][:depth]), v)
                ids = np.concatenate([ids[:depth][order], ids[depth:]])
            rankings.append(np.concatenate([np.asarray(self.junk[q], np.int64), ids]))
        return query_aps(self.bench, rankings)


def _truncate(local: LocalCodes, k: int) -> LocalCodes:
    """The first ``k`` (strongest) features of each image."""
    if k >= local.codes.shape[1]:
        return local
    return LocalCodes(local.codes[:, :k], local.cells[:, :k], np.minimum(local.count, k).astype(local.count.dtype),
                      local.grid)


@dataclass
class FoldReport:
    """What ``cross_validate_model`` measured: the re-ranked and global choices out of fold."""

    benchmark: str
    k: int
    seed: int
    reranked: CrossValidation
    global_: CrossValidation
    descriptors: list[str]
    seconds: float

    def rerank_gain(self, n_boot: int = 10_000):
        """Out of fold: the re-ranked choice's APs over the global choice's (mean, 95% interval)."""
        return bootstrap_difference(self.global_.oof_aps, self.reranked.oof_aps, n_boot)

    def document(self) -> dict:
        def listed(a):
            return [None if np.isnan(x) else round(float(x), 6) for x in a]

        def cv(c: CrossValidation) -> dict:
            mean, lo, hi = c.gain()
            return {"oof_mAP": c.mAP, "baseline": c.baseline, "baseline_mAP": c.full_map(c.baseline),
                    "gain_over_baseline": [mean, lo, hi], "chosen": c.chosen, "oof_aps": listed(c.oof_aps),
                    "candidates": {n: {"mAP": float(np.nanmean(a)), "aps": listed(a)} for n, a in c.aps.items()}}

        return {"benchmark": self.benchmark, "folds": self.k, "seed": self.seed,
                "fold_of_query": self.reranked.folds.tolist(), "rerank_gain": list(self.rerank_gain()),
                "reranked": cv(self.reranked), "global": cv(self.global_), "descriptors": self.descriptors}


def cross_validate_model(make_model, bench, train_paths, grid: dict[str, list], k: int = 5, seed: int = 0,
                         progress: bool = True, cache=None) -> FoldReport:
    """Every candidate of ``grid`` on ``bench``, then group-wise K-fold choice among them, for the
    re-ranked ranking and for the global one (rerank = 0). ``make_model(overrides)`` returns an
    unfitted ``ConvVLAD`` for a dict of descriptor keys (``DESCRIPTOR_KEYS``). ``cache``: an
    ``evalcache.EvalCache`` that keeps each fit and encoding for the next run."""
    import time

    from .evaluate import encode_benchmark, fit_model
    from ..verify import LOCAL_K

    t = time.time()
    folds = group_folds(bench.groups, k, seed)
    searches = combinations(grid, SEARCH_KEYS)
    reranked = [s for s in searches if s.get("rerank", 100)]
    if not reranked:
        raise ValueError("--grid rerank: give at least one depth above 0 (0, the global ranking, is measured anyway)")
    aps_r, aps_g, names = {}, {}, []
    for desc in combinations(grid, DESCRIPTOR_KEYS):
        model = make_model(desc)
        fit_model(model, train_paths, progress, cache)
        enc, enc_q, _, _ = encode_benchmark(model, bench, LOCAL_K, progress, cache)
        names.append(f"{candidate_name(desc)}: {model.describe()}, chance level {model.chance_}")
        pairs, stored = None, model.local_codec_.stored(enc.local)
        for wh in combinations(grid, COLLECTION_KEYS):
            X, pairs_, Xq = enc.X, None, enc_q.X if enc_q else None
            augment = wh.get("augment", AUGMENT)  # where not a candidate: the eval's and the index's default
            if wh.get("whiten", "pca") != "pca" or augment != "none":
                from ..pairs import mine
                from ..whitening import from_collection

                pairs = mine(X, enc.local, model.pair_verifier(), progress, stored=stored) if pairs is None else pairs
                col = from_collection(X, Xq, enc.local, model.pair_verifier(), wh.get("whiten", "pca"),
                                      augment, pairs=pairs)
                names.append(f"{candidate_name({**desc, **wh})}: {'; '.join(col.notes)}")
                X, pairs_, Xq = col.X, col.pairs, col.X_extra
            g = SearchGrid(bench, X, Xq, enc.local, enc_q.local if enc_q else None, model.verifier(),
                           progress=progress, pairs=pairs_, stored=stored)
            g.prepare(reranked)
            prefix = candidate_name({**desc, **wh}) + " | " if desc or wh else ""
            aps_g[prefix + "rerank=0"] = g.aps({"rerank": 0})
            for s in reranked:
                aps_r[prefix + candidate_name(s)] = g.aps(s)
    return FoldReport(bench.describe(), k, seed, cross_validate(aps_r, folds), cross_validate(aps_g, folds), names,
                      time.time() - t)


__all__ = ["COLLECTION_KEYS", "CrossValidation", "DESCRIPTOR_KEYS", "FoldReport", "SEARCH_KEYS", "SearchGrid", "candidate_name",
           "combinations", "cross_validate", "cross_validate_model", "group_folds", "judge", "parse_grid"]
