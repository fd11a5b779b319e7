"""Which photos show the same thing: the groups of an index's live photos, from the pairs it verified.

Every photo an index adds is verified against its 20 nearest (from its features at both of the
model's scales: ``Verifier.inliers_from``), and each pair's inliers are kept
(``IndexStore.edges``). Two photos are linked (``links``, under a ``Rule``) where their pair reaches
the sure level (``Verifier.sure``, three times the chance level), or where weaker pairs (from 1.75
times the chance level, at a global cosine of 0.6 or more) join the same two groups of sure pairs
through two different photos of each, or join a photo alone to one group. The groups are the
connected components of the links: on mvbench-dev their pairs are right 99.5% of the time and
find 89% of the true pairs (docs/defaults.md, "Groups"). No weak pair, nor a chain of them
through photos alone or other groups, merges two groups of two or more photos that two weak pairs,
through different photos of each, do not join directly. In an index that looks again
(``second_look.py``), a photo the links leave alone then joins the photo its second look verified
best with, from ``Rule.look`` ASIFT inliers. Each group has a representative, the photo
with the most links in it (the smallest id among ties), and each other member the evidence that
put it there: the photo it joins through (``via``, one hop nearer the representative, linked with
it), their inliers as mined (the more of the two directions where each was among the other's
nearest), and the similarity of their global descriptors (cosine). A member is a duplicate
(``duplicate_of``) of its most similar partner, of the two the one added later, where their
verification maps one photo onto the other with the same framing: at least ``DUPLICATE_SHARE`` of
the local features the two keep (the fewer) as inliers (and the sure level), and an affine map
whose two scales are within ``DUPLICATE_LOG_SCALE`` of 1 (in log) and whose shift is under
``DUPLICATE_SHIFT`` cells. That is the same photo re-encoded, resized or with
other metadata.
The verification layer's map must be fine enough to see a step of the camera: at least
``DUPLICATE_MIN_GRID`` cells a side (the default layout's is 28); on a coarser one (a deep layer at
scale 1: 7×7) frames of a street a step apart map to the identity, and no photo is marked.
A cropped copy is not marked: cropped by 5% a side it maps as a view panned by a tenth of the frame
does, and no rule of the verification tells the two apart. The global cosine tells less still: JPEG
copies at quality 40 fall to 0.77, and other views reach 0.98 (``experiments/probe_duplicates.py``,
docs/defaults.md "Groups").

    >>> for g in groups(IndexStore.open("photos.index")):
    ...     print(g["id"], g["size"], [m["path"] for m in g["members"]])
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.sparse import csgraph

from .search import verifier_of
from .second_look import LEVEL as LOOK

# Which mined pairs join groups (``links``), chosen by group-wise K-fold on mvbench-dev
# (``convlad eval --groups``; docs/defaults.md, "Groups"): besides the sure pairs, a weak pair (from
# ``WEAK`` times the chance level of inliers, with global descriptors at ``SIMILARITY`` cosine or
# more) joins two groups when ``SUPPORT`` of them do through as many different photos of each, or a
# photo alone to one group.
# Unrelated photos that reach 12-19 inliers do so on repeated textures, at cosine 0.1-0.45; true
# pairs of a building seen from elsewhere reach them at 0.5-0.9.
WEAK = 1.75
SIMILARITY = 0.6
SUPPORT = 2
# The weak level was confirmed with verifiers whose chance level is 7 (Lite2) and 8 (Lite0). A
# coarser layout fits fewer features and measures less (3 for a 14×14 map): there inliers under 13
# are not evidence (with a 32-D descriptor they join unrelated photos as often as related ones), so
# the level never goes below this chance level's.
WEAK_MIN_CHANCE = 7


@dataclass(frozen=True)
class Rule:
    """Which mined pairs join groups (``links``): those at the sure level, and weak ones with
    ``weak`` times the chance level of inliers or more and a global cosine of ``similarity`` or
    more, where ``support`` of them (or as many as the smaller group has photos), through as many
    different photos on each side, join the same two groups of sure pairs. ``weak`` at
    ``verify.SURE`` (3) or more: sure pairs only. The chance level counts as ``WEAK_MIN_CHANCE`` at
    least (``level``). A photo that no link joins then joins the photo its second look verified
    best with (``second_looks``), from ``look`` ASIFT inliers (None: never)."""

    weak: float = WEAK
    similarity: float = SIMILARITY
    support: int = SUPPORT
    look: int | None = LOOK

    def level(self, chance: int) -> float:
        """The inliers from which a pair is a weak link, for a verifier with this ``chance`` level."""
        return self.weak * max(chance, WEAK_MIN_CHANCE)

    def __post_init__(self):
        if not self.weak > 0 or not -1 <= self.similarity <= 1 or self.support < 1 or \
                (self.look is not None and self.look < 4):
            raise ValueError(f"groups rule: weak {self.weak} (> 0), similarity {self.similarity} (-1 to 1), "
                             f"support {self.support} (1 or more), look {self.look} (4 or more, or none)")


def links(pairs, inliers, similarity, sure: int, chance: int, rule: Rule = Rule()) -> np.ndarray:
    """The mined ``pairs`` ((m, 2) ids, with their ``inliers`` and the ``similarity`` of their global
    descriptors, each (m,)) that join groups under ``rule``, with ``sure`` and ``chance`` the
    verifier's levels: (k, 2) int64, in the order of ``pairs``.

    The groups of the sure pairs alone are joined by weak pairs: two groups of two or more photos
    where ``rule.support`` weak pairs join them directly, through as many different photos of each
    (pairs that all go through one photo count once); a photo alone to the group it has the
    most weak pairs with (the most inliers on ties). No chain of weak pairs, through photos alone
    or other groups, puts two groups of two or more photos together otherwise."""
    P = np.asarray(pairs, np.int64).reshape(-1, 2)
    return P[_linked(P, np.asarray(inliers), np.asarray(similarity, np.float64), sure, chance, rule)]


def second_looks(linked, pairs, inliers, level: int) -> np.ndarray:
    """The pairs through which photos alone join groups: each photo of ``pairs`` ((m, 2) ids a
    second look verified, with their ASIFT ``inliers``) that is not an end of a ``linked`` pair,
    to the photo it verified best with (the smaller id on ties), where that reaches ``level``:
    (k, 2) int64, (the photo alone, its partner), by the first. Its partner may be alone too, and
    joined to a third in turn: a second look joins only photos the links leave alone, so it never
    merges two groups of the links."""
    P = np.asarray(pairs, np.int64).reshape(-1, 2)
    w = np.asarray(inliers).ravel()
    P, w = P[w >= level], w[w >= level]
    x, y, w = np.concatenate([P[:, 0], P[:, 1]]), np.concatenate([P[:, 1], P[:, 0]]), np.concatenate([w, w])
    alone = ~np.isin(x, np.asarray(linked, np.int64))
    x, y, w = x[alone], y[alone], w[alone]
    order = np.lexsort((y, -w, x))
    x, y = x[order], y[order]
    first = np.concatenate([[True], x[1:] != x[:-1]]) if len(x) else np.zeros(0, bool)
    return np.stack([x[first], y[first]], 1)


def _linked(P: np.ndarray, w: np.ndarray, c: np.ndarray, sure: int, chance: int, rule: Rule) -> np.ndarray:
    """``links`` as a mask over the rows of ``P``."""
    strong = w >= sure
    weak = ~strong & (w >= rule.level(chance)) & (c >= rule.similarity)
    if not weak.any():
        return strong
    ids, at = np.unique(P, return_inverse=True)
    at = at.reshape(-1, 2)
    lab = labels(len(ids), at[strong])
    size = np.bincount(lab)
    rows = np.flatnonzero(weak)
    a, b = lab[at[rows, 0]], lab[at[rows, 1]]
    across = a != b
    rows, a, b = rows[across], a[across], b[across]
    flip = a > b  # each pair's ends as (its end in the lower group, its end in the higher)
    lo, hi = np.where(flip, b, a), np.where(flip, a, b)
    end_lo, end_hi = np.where(flip, at[rows, 1], at[rows, 0]), np.where(flip, at[rows, 0], at[rows, 1])
    by_key: dict[tuple[int, int], list[int]] = {}
    ends: dict[tuple[int, int], tuple[set, set]] = {}
    for r, x, y, p, q in zip(rows.tolist(), lo.tolist(), hi.tolist(), end_lo.tolist(), end_hi.tolist()):
        by_key.setdefault((x, y), []).append(r)
        e = ends.setdefault((x, y), (set(), set()))
        e[0].add(p)
        e[1].add(q)
    # the support of two groups: their weak pairs through different photos on both sides. Pairs
    # that all go through one photo are one piece of evidence: on real photos, one view of the US
    # Capitol's dome verified weakly with 8 of Sacre-Coeur's 12 photos (tests/test_groups.py)
    support = {k: min(len(e[0]), len(e[1])) for k, e in ends.items()}
    # strongest first: more support, more weak pairs between the two, then more inliers
    order = sorted(by_key, key=lambda k: (-support[k], -len(by_key[k]), -int(w[by_key[k]].max()), k))
    parent: dict[int, int] = {}
    big: dict[int, bool] = {}  # whether a set holds a group of two or more photos

    def find(x):
        parent.setdefault(x, x)
        big.setdefault(x, size[x] >= 2)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    keep = strong.copy()
    for x, y in order:
        if support[(x, y)] < min(rule.support, size[x], size[y]):
            continue
        rx, ry = find(x), find(y)
        if rx == ry:
            keep[by_key[(x, y)]] = True
            continue
        if big[rx] and big[ry] and not (size[x] >= 2 and size[y] >= 2):
            continue  # two groups would be chained together through a photo alone
        parent[ry] = rx
        big[rx] = big[rx] or big[ry]
        keep[by_key[(x, y)]] = True
    return keep


# How far a duplicate's verified affine map is from the identity: its scales (|log| of each singular
# value) and its shift (cells of the verification layer's map). Each level is midway between the
# farthest of 360 copies of 120 mvbench-train photos re-encoded at quality 40, halved or stripped
# (0.008, 0.17 cells) and the nearest of their crops (0.075, 1.16 cells); pans of the camera are as
# far in scale (0.099 or more), views farther (``experiments/probe_duplicates.py``)
DUPLICATE_LOG_SCALE = 0.04
DUPLICATE_SHIFT = 0.66
# ... with a floor on the share of the features kept that are inliers, so that a map near the
# identity fitted on a few matches is not taken for a copy: a quarter, under those copies' 1st
# percentile of 0.38 (113 of 300; one halved copy of 120 had 29). It does not tell a pan from a copy
# (pans reach 0.32 to 0.73): the scale does.
DUPLICATE_SHARE = 0.25
DUPLICATE_MIN_GRID = 20
CHUNK = 2048  # pairs whose local features are read at once (25 kB a photo by default: 100 MB at most)


def components(ids, pairs) -> list[np.ndarray]:
    """The connected components of photos ``ids`` joined by ``pairs`` ((m, 2) ids), each a sorted
    array of ids, largest first (ties: the smallest first id); a photo with no pair is one alone."""
    return [np.array(sorted(order), np.int64) for _, order, _ in walks(ids, pairs, 1)]


def labels(n: int, pairs) -> np.ndarray:
    """Each of ``n`` rows' connected component (0 … , in the order of each one's smallest row)
    under ``pairs`` ((m, 2) rows): what ``eval --groups`` scores."""
    if n == 0:
        return np.zeros(0, np.int64)
    return _labels(_adjacency(n, np.asarray(pairs, np.int64).reshape(-1, 2)))


def _labels(A: sparse.csr_matrix) -> np.ndarray:
    """``labels`` of the rows of an adjacency ``A`` (``_adjacency``)."""
    _, lab = csgraph.connected_components(A, directed=False)
    _, first = np.unique(lab, return_index=True)  # each label's smallest row
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[lab]


def unique(ids) -> np.ndarray:
    """The sorted distinct values of an integer array, as ``np.unique`` gives them: by sorting.
    NumPy 2.3 and later find them by hashing, 50 times slower here on 12 M ids of 10 M photos
    (10.4 s against 0.22; 2 cores, Intel Xeon)."""
    x = np.sort(np.asarray(ids).ravel())
    return x[np.concatenate([[True], x[1:] != x[:-1]])] if len(x) else x


def _adjacency(n: int, at: np.ndarray) -> sparse.csr_matrix:
    """The (n, n) adjacency of the rows paired by ``at`` ((m, 2) rows): symmetric, one entry per
    neighbour, each row's neighbours in ascending order (the order the walks take them in)."""
    at = at[at[:, 0] != at[:, 1]].astype(np.int32 if n < 2**31 else np.int64)  # half the memory at 10 M
    r, c = np.concatenate([at[:, 0], at[:, 1]]), np.concatenate([at[:, 1], at[:, 0]])
    A = sparse.csr_matrix((np.ones(len(r), np.float32), (r, c)), shape=(n, n))
    A.sum_duplicates()
    A.sort_indices()
    A.data[:] = 1
    return A


def similarities(X, edges) -> np.ndarray:
    """The cosine of each pair of rows ``edges`` (m, 2) of ``X`` (L2-normalised)."""
    E = np.asarray(edges, np.int64).reshape(-1, 2)
    return np.einsum("ij,ij->i", X[E[:, 0]], X[E[:, 1]]) if len(E) else np.zeros(0)


def grouping(X, edges, inliers, sure: int, chance: int, rule: Rule = Rule(), looks=None) -> np.ndarray:
    """The groups of the rows of ``X`` (descriptors in memory, as ``eval`` holds a benchmark's) under
    ``rule`` over their mined ``edges`` ((m, 2) rows) and ``inliers``, and a second look's
    ``looks`` (its pairs of rows and their inliers), where given: a label per row."""
    L = links(edges, inliers, similarities(X, edges), sure, chance, rule)
    if looks is not None and rule.look is not None:
        L = np.concatenate([L, second_looks(L, looks[0], looks[1], rule.look)])
    return labels(len(X), L)


def graph(index, rule: Rule = Rule(), inliers: bool = False):
    """The pairs of ``index``'s live photos (an ``IndexStore``) that join groups: ``links`` under
    ``rule`` over the pairs it mined as photos were added (``IndexStore.edges``), with the cosine of
    their descriptors read for the weak ones only, then the ``second_looks`` of the photos they
    leave alone (``IndexStore.looks``): (m, 2) ids, the links sorted, then the second looks by
    their photo alone; ``inliers``: and (their inliers as mined or looked at, (m,); whether each
    is a second look's, (m,) bool)."""
    E, w, looked = _graph(index, rule)
    return (E, w, looked) if inliers else E


def _graph(index, rule: Rule):
    E, w = index.edges()
    v = index.model.pair_verifier()  # the one that mined the inliers it keeps
    weak = (w < v.sure) & (w >= rule.level(v.chance))
    sim = np.zeros(len(E))
    if weak.any():
        ends, at = np.unique(E[weak], return_inverse=True)
        sim[weak] = similarities(index.vectors(ends), at.reshape(-1, 2))
    keep = _linked(E, w, sim, v.sure, v.chance, rule)
    E, w = E[keep], w[keep]
    looked = np.zeros(len(E), bool)
    if rule.look is not None:
        LP, lw = index.looks()
        extra = second_looks(E, LP, lw, rule.look)
        if len(extra):
            got = dict(zip(map(tuple, LP.tolist()), lw.tolist()))
            E = np.concatenate([E, extra])
            w = np.concatenate([w, [got[(min(a, b), max(a, b))] for a, b in extra.tolist()]]).astype(w.dtype)
            looked = np.concatenate([looked, np.ones(len(extra), bool)])
    return E, w, looked


def groups(index, min_size: int = 2, evidence: bool = True, duplicates_only: bool = False,
           limit: int | None = None, rule: Rule = Rule()) -> list[dict]:
    """The groups of ``index``'s live photos (an ``IndexStore``): plain data, largest first, each
    ``{"id", "size", "representative", "members": [{"id", "path", "via", "inliers", "similarity",
    "second_look", "duplicate_of"}, ...]}`` with the representative first (its ``via``,
    ``inliers``, ``similarity`` None), then in the order of a walk from it. ``id`` is the representative's; ``inliers`` are
    the mined pair's with ``via`` (an index written before they were kept gives the sure level).
    ``min_size``: the smallest group listed (1 lists every photo); ``limit``: the largest ``limit``
    groups only; ``evidence`` False skips the verification of duplicates (``duplicate_of`` None:
    ``verify`` fills it in later, a group at a time); ``duplicates_only``: each group's members
    that are duplicates, with the photos they duplicate, and only groups that have some; ``rule``:
    which mined pairs join groups (``Rule``, the default chosen by K-fold). ``second_look``:
    whether a member joins through a second look (its ``inliers`` then ASIFT's)."""
    P, W, looked = graph(index, rule, inliers=True)
    count = {(min(a, b), max(a, b)): int(k) for (a, b), k in zip(P.tolist(), W.tolist())}
    by_look = {(min(a, b), max(a, b)) for (a, b), k in zip(P.tolist(), looked.tolist()) if k}
    ids = np.array([i for i, _, _ in index.items()], np.int64) if min_size <= 1 else unique(P)
    found = []
    for walk in walks(ids, P, min_size):
        if limit is not None and len(found) >= limit and not duplicates_only:
            break
        found.append(walk)
    every = np.array([i for _, order, _ in found for i in order], np.int64)
    X, paths = index.vectors(every), index.paths_of(every)  # for all groups at once: a lookup costs
    at = {i: k for k, i in enumerate(every.tolist())}
    out = []
    for rep, order, via in found:
        out.append({"id": rep, "size": len(order), "representative": rep, "members": [
            {"id": i, "path": paths[at[i]], "via": via.get(i),
             "inliers": None if i == rep else count[(min(i, via[i]), max(i, via[i]))],
             "similarity": None if i == rep else round(float(X[at[i]] @ X[at[via[i]]]), 6),
             "second_look": i != rep and (min(i, via[i]), max(i, via[i])) in by_look, "duplicate_of": None}
            for i in order]})
    if evidence or duplicates_only:
        _verify(index, out)
    if duplicates_only:
        out = [{**g, "members": kept} for g in out if (kept := _duplicates(g["members"]))]
    return out if limit is None else out[:limit]


def contact_sheet(found: list[dict], out, groups_shown: int = 6, per_group: int = 8, thumb: int = 150):
    """A PNG of the largest groups: a row of thumbnails each, the representative first, each photo
    captioned with its id and why it is there (inliers with the photo it joins through, or a
    duplicate's mark). Returns the PIL image."""
    from PIL import Image, ImageDraw, ImageFont

    from .images import ImageError, load_image

    try:
        font = ImageFont.load_default(size=12)
        title_font = ImageFont.load_default(size=15)
    except TypeError:  # Pillow < 10.1: the bitmap font only
        font = title_font = ImageFont.load_default()
    rows = found[:groups_shown]
    pad, title, caption = 10, 24, 30
    cols = min(per_group, max((len(g["members"]) for g in rows), default=1))
    width = max(320, pad + cols * (thumb + pad))
    height = pad + len(rows) * (title + thumb + caption + pad) if rows else 60
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    if not rows:
        draw.text((pad, pad), "no groups: no two photos verify as the same thing", fill="black", font=title_font)
    y = pad
    for g in rows:
        more = f" (the first {per_group} shown)" if g["size"] > per_group else ""
        draw.text((pad, y + 4), f"group {g['id']}: {g['size']} photos{more}", fill="black", font=title_font)
        y += title
        for k, m in enumerate(g["members"][:per_group]):
            x = pad + k * (thumb + pad)
            try:
                im = load_image(m["path"], min_size=thumb)
                im.thumbnail((thumb, thumb))
                sheet.paste(im, (x + (thumb - im.width) // 2, y + (thumb - im.height) // 2))
            except (ImageError, OSError):
                draw.rectangle([x, y, x + thumb, y + thumb], outline=(200, 200, 200))
            why = ("representative" if m["via"] is None else
                   f"via {m['via']}" + ("" if m["inliers"] is None else f": {m['inliers']} inliers"))
            if m["duplicate_of"] is not None:
                why = f"duplicate of {m['duplicate_of']}"
                draw.rectangle([x - 2, y - 2, x + thumb + 1, y + thumb + 1], outline=(224, 168, 0), width=3)
            draw.text((x, y + thumb + 3), f"{m['id']}", fill="black", font=font)
            draw.text((x, y + thumb + 16), why, fill=(90, 90, 90), font=font)
        y += thumb + caption + pad
    sheet.save(out, format="PNG")
    return sheet


def _duplicates(members: list[dict]) -> list[dict]:
    """The members that are duplicates and those they duplicate."""
    dup = {m["id"] for m in members if m["duplicate_of"] is not None} | \
        {m["duplicate_of"] for m in members if m["duplicate_of"] is not None}
    return [m for m in members if m["id"] in dup]


def walks(ids, pairs, min_size: int = 2):
    """Each group of photos ``ids`` joined by ``pairs`` with ``min_size`` photos or more, largest
    first (ties: the smallest id first): (its representative, the photo with the most pairs (the
    smallest id among ties); its photos in the order of a breadth-first walk from it, each photo's
    neighbours taken in ascending order; each photo's ``via``: the one before it on the walk that
    it is paired with). The graph part of ``groups``.

    On arrays (SciPy's sparse graphs): 0.6 s and 92 MB at a million photos, where networkx's graph
    of Python objects took 5.9 s and 550 MB (docs/scale.md, "Groups of a whole collection")."""
    P = np.asarray(pairs, np.int64).reshape(-1, 2)
    nodes = unique(np.concatenate([np.asarray(ids, np.int64).ravel(), P.ravel()]))
    n = len(nodes)
    if n == 0:
        return
    A = _adjacency(n, np.searchsorted(nodes, P))
    lab = _labels(A)  # in the order of each one's smallest id
    size = np.bincount(lab)
    degree = np.diff(A.indptr)
    # each group's representative: the most pairs, then the smallest id
    by = np.lexsort((np.arange(n), -degree, lab))
    rep = by[np.searchsorted(lab[by], np.arange(len(size)))]
    kept = np.flatnonzero(size >= max(min_size, 1))
    kept = kept[np.argsort(-size[kept], kind="stable")]  # largest first; ties by smallest id (lab's order)
    if not len(kept):
        return
    # one walk for all groups at once: from a node of its own, paired with each representative. A
    # group's photos are met in the order of a walk from its representative alone, as the groups
    # share no photo; the walks are then told apart by group.
    starts = np.sort(rep[kept])
    W = sparse.csr_matrix((np.ones(A.nnz + len(starts), np.float32), np.concatenate([A.indices, starts]),
                           np.concatenate([A.indptr, [A.indptr[-1] + len(starts)]])), shape=(n + 1, n + 1))
    order, pred = csgraph.breadth_first_order(W, n, directed=True, return_predecessors=True)
    order = order[1:]
    rank = np.full(len(size), -1, np.int64)
    rank[kept] = np.arange(len(kept))
    order = order[np.argsort(rank[lab[order]], kind="stable")]
    via = nodes[np.minimum(pred[order], n - 1)]  # a representative's (the walks' own node) is not read
    order = nodes[order]
    at = 0
    for k in size[kept].tolist():
        members = order[at:at + k].tolist()
        yield members[0], members, dict(zip(members[1:], via[at + 1:at + k].tolist()))
        at += k


def verify(index, group: dict) -> dict:
    """A group of ``groups`` with its duplicates marked (in place, and returned): the photo each
    member duplicates, if any (its most similar sure partner, verified again for the affine map;
    one pair a photo)."""
    _verify(index, [group])
    return group


def _verify(index, found: list[dict]) -> None:
    """``verify`` for many groups, each store lookup made once for all of them."""
    order = [m["id"] for g in found for m in g["members"] if len(g["members"]) >= 2]
    for g in found:
        for m in g["members"]:
            m["duplicate_of"] = None
    if not order or not index.local_k:
        return
    row = {i: k for k, i in enumerate(order)}
    X = index.vectors(order)
    v = verifier_of(index)
    partners: dict[int, list[int]] = {}
    for a, b in index.partners(order).tolist():
        partners.setdefault(a, []).append(b)
    best = {}  # a duplicate is most like the photo it copies
    for i, js in partners.items():
        j = max((k for k in js if k in row), key=lambda k: (float(X[row[i]] @ X[row[k]]), -k), default=None)
        if j is not None:
            best[i] = j
    dup: dict[int, int] = {}
    pairs = list(best.items())
    for lo in range(0, len(pairs), CHUNK):  # the local features of a chunk of photos at a time
        chunk = pairs[lo:lo + CHUNK]
        need = sorted({i for p in chunk for i in p})
        codes, have = index.local_codes(need)
        if have.any() and int(codes.cells[have].max()) + 1 < DUPLICATE_MIN_GRID:  # the map's side, from the cells kept
            return
        at = {i: k for k, i in enumerate(need)}
        for i, j in chunk:
            if max(i, j) in dup or not (have[at[i]] and have[at[j]]):
                continue
            m = v.match(codes.features(at[i]), codes[[at[j]]])
            kept = int(min(codes.count[at[i]], codes.count[at[j]]))  # the features each keeps
            if is_duplicate(m, v.sure, kept):
                dup[max(i, j)] = min(i, j)
    for g in found:
        for m in g["members"]:
            m["duplicate_of"] = dup.get(m["id"])


def is_duplicate(match, sure: int, features: int) -> bool:
    """Whether a verified pair (``verify.PairMatch``) is one photo twice: ``sure`` inliers or more and
    ``DUPLICATE_SHARE`` of the ``features`` each photo keeps, and an affine map at the same scale
    (``DUPLICATE_LOG_SCALE``) and place (``DUPLICATE_SHIFT``)."""
    if match.affine is None or match.n_inliers < max(sure, DUPLICATE_SHARE * features):
        return False
    A = np.asarray(match.affine, np.float64)
    s = np.linalg.svd(A[:, :2], compute_uv=False)
    return bool(s.min() > 0 and np.abs(np.log(s)).max() <= DUPLICATE_LOG_SCALE
                and np.linalg.norm(A[:, 2]) <= DUPLICATE_SHIFT)


__all__ = ["DUPLICATE_LOG_SCALE", "DUPLICATE_MIN_GRID", "DUPLICATE_SHARE", "DUPLICATE_SHIFT", "Rule", "SIMILARITY",
           "SUPPORT", "WEAK", "components", "contact_sheet", "graph", "grouping", "groups", "is_duplicate", "labels",
           "links", "second_looks", "similarities", "unique", "verify", "walks"]
