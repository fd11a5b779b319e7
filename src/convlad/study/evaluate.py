"""Evaluation: a benchmark's queries ranked by the one search (``search.rank``), its metrics, and
``evaluate_model``, the whole of ``convlad eval`` (fit, memory check, encode, measure) for scripts."""
from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import faiss
import numpy as np

from .datasets import RetrievalBenchmark
from .metrics import grouping_scores, average_precision, ns_score, positive_ranks, precision_at_k
from ..search import RERANK, MemoryIndex, Settings, rank
from ..verify import LOCAL_K, LocalCodes, Verifier
from ..pairs import AUGMENT, check_augment

PRECISION_KS = (1, 5, 10)


def rank_database(X_db: np.ndarray, X_q: np.ndarray, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact L2 ranking of the database for each query row: (distances, indices), (nq, k)."""
    X_db = np.ascontiguousarray(X_db, dtype=np.float32)
    index = faiss.IndexFlatL2(X_db.shape[1])
    index.add(X_db)
    return index.search(np.ascontiguousarray(X_q, dtype=np.float32), k or len(X_db))


def query_aps(bench: RetrievalBenchmark, ranking: np.ndarray, positives=None, junk=None) -> np.ndarray:
    """AP of every query, given ``ranking`` (nq, n_db) of database indices, best first; junk skipped."""
    positives = bench.positives if positives is None else positives
    junk = bench.junk if junk is None else junk
    return np.array([average_precision(positive_ranks(ranking[q], positives[q], junk[q]), len(positives[q]))
                     for q in range(len(positives))])


@dataclass
class EvalResult:
    mAP: float
    aps: np.ndarray
    extra: dict = field(default_factory=dict)  # further metrics by name (revisited E/M/H, mP@k, N-S, ...)
    aps_without_rerank: np.ndarray | None = None  # per query, when re-ranked: the same ranking before it

    @property
    def metrics(self) -> dict[str, float]:
        return {"mAP": self.mAP, **self.extra}


def evaluate_ranking(bench: RetrievalBenchmark, ranking: np.ndarray) -> EvalResult:
    """The benchmark's metrics for a full ranking (nq, n_db)."""
    aps = query_aps(bench, ranking)
    valid = ~np.isnan(aps)
    result = EvalResult(mAP=float(aps[valid].mean()) if valid.any() else float("nan"), aps=aps)
    for name, (pos, junk) in bench.protocols.items():
        ranks = [positive_ranks(ranking[q], pos[q], junk[q]) for q in range(len(pos))]  # once, for AP and P@k
        result.extra[f"mAP_{name}"] = float(np.nanmean([average_precision(r, len(p)) for r, p in zip(ranks, pos)]))
        prs = np.array([precision_at_k(r, PRECISION_KS) for r in ranks])
        for j, k in enumerate(PRECISION_KS):
            result.extra[f"mP@{k}_{name}"] = float(np.nanmean(prs[:, j]))
    if bench.kind == "ukbench":
        result.extra["N-S"] = float(np.mean([ns_score(ranking[q], bench.positives[q] | {bench.query_db[q]})
                                             for q in range(bench.n_queries)]))
    if bench.kind == "groups" and bench.groups:
        sizes = {g: bench.groups.count(g) for g in set(bench.groups)}
        big = np.array([sizes[g] >= 3 for g in bench.groups]) & valid
        if big.any() and not big.all():
            result.extra["mAP_groups_ge3"] = float(aps[big].mean())
    return result


def query_descriptors(bench: RetrievalBenchmark, X_db: np.ndarray, X_extra: np.ndarray | None = None) -> np.ndarray:
    """(nq, D): the database row for queries that are database images, else the rows of ``X_extra``
    (one per query with ``query_db`` None, in query order)."""
    out = np.empty((bench.n_queries, X_db.shape[1]), np.float32)
    j = 0
    for q, d in enumerate(bench.query_db):
        if d is not None:
            out[q] = X_db[d]
        else:
            out[q] = X_extra[j]
            j += 1
    return out


def extra_query_items(bench: RetrievalBenchmark) -> list:
    """What must be extracted for the queries beyond the database: cropped or outside queries."""
    return [item for item, d in zip(bench.query_items, bench.query_db) if d is None]


def evaluate_descriptors(bench: RetrievalBenchmark, X: np.ndarray, X_q: np.ndarray | None = None,
                         qe: int = 0, alpha: float = 3.0, rerank: int = 0, local: LocalCodes | None = None,
                         local_q: LocalCodes | None = None, verifier: Verifier | None = None,
                         pairs: np.ndarray | None = None, stored: LocalCodes | None = None) -> EvalResult:
    """Metrics of descriptors ``X`` (one row per database image, aligned with ``bench.paths``),
    ranked by ``search.rank``, the search every door of convlad uses.

    ``X_q``: descriptors of the queries that are not database images (``extra_query_items``).
    ``qe`` > 0: α-query expansion with that many top neighbours. ``rerank`` > 0: spatial
    verification of each query's top ``rerank`` (``verifier``, the model's ``ConvVLAD.verifier()``;
    without one, Lite0's chance level) with the database's ``local`` codes and, for queries that
    are not database images, ``local_q``. A query's junk (for a database image, itself) is left out
    of its ranking before expansion and verification, then put first: junk consumes no rank.
    ``pairs``: verified pairs of database rows to augment over (``whitening.from_collection``),
    searched as an index that augments searches them; every query searches with its own descriptor.
    ``stored``: the database's local features as an index keeps them (``LocalCodec.stored``), what
    each query's own (``local``'s row) is verified against; default ``local``.
    """
    if rerank > 0 and local is None:
        raise ValueError("re-ranking needs the database's local codes (model.transform(..., local=k))")
    Q = query_descriptors(bench, X, X_q)
    index = MemoryIndex(X, (local if stored is None else stored) if rerank else None, verifier, pairs)
    feats = None
    if rerank:
        feats, j = [], 0
        for d in bench.query_db:
            if d is None:
                feats.append(local_q.features(j))
                j += 1
            else:
                feats.append(local.features(d))
    junk = [sorted(j) for j in bench.junk]

    def ranking(settings):
        hits = rank(index, Q, feats, settings, exclude=junk)
        return np.array([np.concatenate([np.asarray(j, np.int64), [h.id for h in row]]).astype(np.int64)
                         for j, row in zip(junk, hits)])

    full = Settings(k=len(X), rerank=rerank, qe=qe, alpha=alpha)
    result = evaluate_ranking(bench, ranking(full))
    if rerank > 0:
        before = evaluate_ranking(bench, ranking(replace(full, rerank=0))).aps
        result.extra["mAP_without_rerank"] = float(np.nanmean(before))
        result.aps_without_rerank = before
    return result


def available_memory() -> float:
    """Bytes of memory free for new work (MemAvailable), inf where the system has no such figure."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        except (OSError, ValueError):  # no such figure here (macOS): nothing to hold re-ranking back
            return float("inf")


@dataclass
class ModelEvaluation:
    """What ``evaluate_model`` measured: the metrics, the settings it ran with and its timings."""

    result: EvalResult
    benchmark: str
    descriptor: str
    train: str
    n_train: int
    qe: int
    rerank: int
    chance: int
    local_key: tuple
    local_bytes_per_image: int | None
    seconds: float
    encode_img_per_s: float
    rank_ms_per_query: float
    warnings: list[str] = field(default_factory=list)
    whitening: str = "PCA"  # and what was learned from the collection (``whiten``, ``augment``)
    pca_result: EvalResult | None = None  # after a step learned from the collection: the same without it
    cached: tuple[bool, bool] = (False, False)  # (the fit, the encoding) came from the eval cache
    # the groups of the database (``groups.links`` over its mined pairs, the default rule) against
    # the benchmark's own (``grouping_of``), where it has groups and pairs were mined
    grouping: dict | None = None

    def aps_document(self) -> dict:
        """Every query's AP, as ``convlad eval --aps`` writes them for ``convlad compare``."""
        def listed(aps):
            return [None if np.isnan(a) else float(a) for a in aps]

        label = self.descriptor + (f" qe={self.qe}" if self.qe else "") + (f" rerank={self.rerank}" if self.rerank else "")
        res = self.result
        doc = {"benchmark": self.benchmark, "descriptor": label, "mAP": res.mAP, "aps": listed(res.aps),
               "encode_img_per_s": self.encode_img_per_s, "whitening": self.whitening}
        if res.aps_without_rerank is not None:
            doc.update(mAP_without_rerank=res.extra["mAP_without_rerank"], rerank_ms_per_query=self.rank_ms_per_query,
                       aps_without_rerank=listed(res.aps_without_rerank),
                       local_bytes_per_image=self.local_bytes_per_image, chance_level=self.chance)
        if self.pca_result is not None:  # the same queries, PCA-whitened only, for `convlad compare`
            doc["pca_only"] = {"mAP": self.pca_result.mAP, "aps": listed(self.pca_result.aps)}
            if self.pca_result.aps_without_rerank is not None:
                doc["pca_only"].update(mAP_without_rerank=self.pca_result.extra["mAP_without_rerank"],
                                       aps_without_rerank=listed(self.pca_result.aps_without_rerank))
        return doc


def fit_model(model, train_paths: Sequence[str], progress: bool = True, cache=None) -> bool:
    """``model`` fitted on ``train_paths``, through the ``evalcache.EvalCache`` ``cache`` where one
    is given; True when the cache held the fit."""
    if cache is None:
        model.fit(train_paths, progress=progress)
        return False
    return cache.fit(model, train_paths, progress)


def encode_benchmark(model, bench: RetrievalBenchmark, local: int, progress: bool = True, cache=None):
    """``(enc, enc_q, img_per_s, cached)``: the database images encoded (``pipeline.Encoded``), the
    queries that are not database images (None where there are none), the encoding's speed, and
    whether the ``evalcache.EvalCache`` ``cache`` held it all (the speed is then the one measured
    when it was encoded). An unreadable benchmark photo is a ValueError."""
    def encode(items, what):
        if cache is not None:
            enc, seconds, hit = cache.transform(model, items, local, progress)
        else:
            t = time.time()
            enc = model.transform(items, progress=progress, local=local)
            seconds, hit = time.time() - t, False
        if enc.errors:
            raise ValueError(f"{what} unreadable: {enc.errors[0]}")
        return enc, seconds, hit

    enc, seconds, hit = encode(bench.paths, "benchmark images")
    crops, enc_q = extra_query_items(bench), None
    if crops:
        enc_q, s_q, hit_q = encode(crops, "query images")
        seconds, hit = seconds + s_q, hit and hit_q
    return enc, enc_q, (len(bench.paths) + len(crops)) / max(1e-9, seconds), hit


def evaluate_model(model, bench: RetrievalBenchmark, train_paths: Sequence[str], train_label: str = "training photos",
                   qe: int = 0, rerank: int = RERANK, progress: bool = True, fit: bool = True,
                   whiten: str = "pca", cache=None, augment: str = AUGMENT) -> ModelEvaluation:
    """Fit ``model`` on ``train_paths`` (unless ``fit`` is False), encode the benchmark, and measure
    it with its protocol, re-ranking the top ``rerank`` (the search's default). Re-ranking is turned
    off, with a warning in the result, where the local features would need more than half of the
    free memory, and so is augmentation, which mines by verifying them. ``whiten="collection"``
    learns a whitening from pairs mined in the benchmark's own database photos
    (``whitening.learn_whitening``: transductive, no labels), ``augment="verified"`` (the default,
    as an index does) augments the database over those pairs (``pairs.augment``), and it
    measures with them; ``pca_result`` then holds the same measured without. ``cache`` (an ``evalcache.EvalCache``)
    keeps the fitted model and the encoding for the next run of the same."""
    t = time.time()
    fit_cached = fit_model(model, train_paths, progress, cache) if fit else False
    warnings = []
    need = len(bench.paths) * LocalCodes.size(LOCAL_K, model.local_dim)
    if (rerank or whiten != "pca" or augment != "none") and need > available_memory() / 2:
        warnings.append(f"re-ranking and the collection's steps off: {len(bench.paths)} images would need "
                        f"{need / 2**30:.1f} GiB of local features in memory, more than half of what is free "
                        "(--rerank 0 --augment none: the global ranking of the plain descriptors, without this warning)")
        rerank, whiten, augment = 0, "pca", "none"
    if whiten not in ("pca", "collection"):
        raise ValueError(f"whiten={whiten!r}: pca or collection")
    check_augment(augment)
    local = LOCAL_K if rerank or whiten != "pca" or augment != "none" else 0
    enc, enc_q, t_enc, enc_cached = encode_benchmark(model, bench, local, progress, cache)
    Xq = enc_q.X if enc_q else None
    stored = model.local_codec_.stored(enc.local) if enc.local is not None else None  # as an index keeps them

    def measure(X, Xq, pairs=None):
        return evaluate_descriptors(bench, X, Xq, qe=qe, rerank=rerank, local=enc.local if rerank else None,
                                    local_q=enc_q.local if enc_q and rerank else None, verifier=model.verifier(),
                                    pairs=pairs, stored=stored if rerank else None)

    whitening, pca_result, X, pairs, edges = "PCA", None, enc.X, None, None
    if whiten != "pca" or augment != "none":
        from ..pairs import mine
        from ..whitening import from_collection

        pv = model.pair_verifier()
        edges = mine(X, enc.local, pv, progress, edges=True, stored=stored)  # the groups' evidence too
        try:
            col = from_collection(X, Xq, enc.local, pv, whiten, augment, progress, pairs=edges[0][edges[1] >= pv.sure])
        except ValueError as e:
            warnings.append(f"collection steps off: {e}")
        else:
            whitening = "PCA, then from the collection (transductive, no labels): " + "; ".join(col.notes)
            pca_result = measure(X, Xq)
            X, pairs, Xq = col.X, col.pairs, col.X_extra
    t_rank = time.time()
    res = measure(X, Xq, pairs)
    grouping = None
    if pairs is not None and (truth := grouping_of(bench)) is not None:
        from ..groups import grouping as groups_of

        v = model.pair_verifier()
        grouping = grouping_scores(groups_of(enc.X, *edges, v.sure, v.chance), truth)
    t_rank = (time.time() - t_rank) / max(1, bench.n_queries) * 1000
    return ModelEvaluation(res, bench.describe(), model.describe(), train_label, model.n_train_, qe, rerank,
                           model.chance_, model.local_key,
                           model.local_codec_.bytes_of(enc.local) if enc.local is not None and rerank else None,
                           time.time() - t, t_enc, t_rank, warnings, whitening, pca_result,
                           (fit_cached, enc_cached), grouping)


def grouping_of(bench: RetrievalBenchmark) -> list[str] | None:
    """Each database photo's true group, a distractor alone in its own: where every photo of a
    group is a query on its own row (the mvbench layout), else None."""
    if bench.kind != "groups" or not bench.groups:
        return None
    truth = [f"\0alone {d}" for d in range(len(bench.paths))]
    for d, g in zip(bench.query_db, bench.groups):
        if d is None:
            return None
        truth[d] = g
    return truth
