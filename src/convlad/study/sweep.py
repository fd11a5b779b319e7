"""The paper's measurement study: retrieval quality of the VLAD of every layer at every scale,
uncompressed and PCA-whitened, as rows for a CSV, a Figure-2-style plot and a Tables-2–3-style table.

Local descriptors come from a ``FeatureCache``, so each image is run through the network once per
scale, with every layer tapped in that pass, and a second sweep (another k, dim or training set)
extracts nothing.
"""
from __future__ import annotations

import csv
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ..cache import FeatureCache
from .datasets import RetrievalBenchmark
from ..encoding import PCAWhitening, VLAD
from .evaluate import evaluate_descriptors, extra_query_items
from ..functional import l2n
from ..images import ImageError

FAR = 1e3  # coordinate of the stand-in for an unreadable database image: ranked after every other


BATCH_DESCRIPTORS = 1 << 17  # per encoding batch: its float32 tensors stay under glibc's mmap
# threshold (32 MB), so they are recycled rather than mapped and page-faulted afresh each batch


def _encode(vlad: VLAD, arrays, n: int) -> np.ndarray:
    """VLADs of ``n`` (N_i, d) float16 arrays arriving in order (a list, or a generator fed by
    loader threads, so reading overlaps encoding); consecutive arrays of equal N are batched."""
    out = np.empty((n, vlad.dim), np.float32)
    batch = 1
    pending: list[np.ndarray] = []
    done = 0

    def flush():
        nonlocal done
        x = torch.empty((len(pending), *pending[0].shape), dtype=torch.float32)
        for j, a in enumerate(pending):  # float16 → float32 in the copy itself
            x[j].copy_(torch.from_numpy(a))
        out[done:done + len(pending)] = vlad.encode(x).numpy()
        done += len(pending)
        pending.clear()

    for a in arrays:
        if pending and (len(pending) == batch or a.shape != pending[0].shape):
            flush()
        if not pending:
            batch = max(1, min(32, BATCH_DESCRIPTORS // max(1, a.shape[0] * a.shape[1] // 32)))
        pending.append(a)
    if pending:
        flush()
    return out


def _kmeans_sample(arrays: list[np.ndarray], max_descriptors: int, rng) -> np.ndarray:
    per_image = max(1, -(-max_descriptors // max(1, len(arrays))))
    return np.concatenate([a[rng.choice(len(a), size=min(len(a), per_image), replace=False)]
                           for a in arrays]).astype(np.float32)


def _far_rows(X: np.ndarray, ok: np.ndarray) -> np.ndarray:
    out = np.full((len(ok), X.shape[1]), FAR, np.float32)
    out[ok] = X
    return out


def sweep(bench: RetrievalBenchmark, train_items: Sequence, cache: FeatureCache, layers: Sequence[str],
          scales: Sequence[float] = (1.0, 2.0), k: int = 100, dim: int | None = 128, power: float | None = None,
          seed: int = 0, max_descriptors: int = 25_600, batch_size: int = 16, device=None, progress: bool = True,
          compile: bool | str = "auto", report: Callable[[str], None] | None = None, on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """One row per (layer, scale) and per layer for the concatenation of all scales ("1+2"), with
    the benchmark's metrics on the uncompressed VLAD (``*_full``) and PCA-whitened to ``dim``."""
    from .. import progress as P

    layers = cache.backbone.resolve_layers(list(layers))
    scales = [float(s) for s in scales]
    db, qx, train = list(bench.paths), extra_query_items(bench), list(train_items)
    errors = cache.fill(db + qx + train, layers, scales, batch_size=batch_size, device=device, progress=progress,
                        compile=compile)
    bad = {e.path for e in errors}
    for e in errors:
        if report:
            report(f"skipped {e}")
    bad_q = [item for item in qx if (item if isinstance(item, str) else item[0]) in bad]
    if bad_q:
        raise ImageError(bad_q[0] if isinstance(bad_q[0], str) else bad_q[0][0], "query image unreadable")
    train = [t for t in train if str(t) not in bad]
    db_ok = np.array([p not in bad for p in db])
    db_items = [p for p, ok in zip(db, db_ok) if ok]
    rows: list[dict] = []
    bar = P.bar(len(layers) * len(scales), "layers", "layer·scale", enabled=progress)
    steps = [(layer, s) for layer in layers for s in scales]
    # loader threads (file reads release the GIL) stay one step ahead: while one (layer, scale) is
    # encoded, the next one's training features are read
    pool = ThreadPoolExecutor(4)

    def submit(items, step):
        return [pool.submit(cache.load, item, *step) for item in items]

    next_train = submit(train, steps[0])
    try:
        enc: dict[float, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        positions = {}
        for i, (layer, s) in enumerate(steps):
            Ft = [f.result() for f in next_train]
            db_f, q_f = submit(db_items, (layer, s)), submit(qx, (layer, s))
            if i + 1 < len(steps):
                next_train = submit(train, steps[i + 1])
            rng = np.random.default_rng(seed)
            vlad = VLAD(k, power=power, seed=seed).fit(_kmeans_sample(Ft, max_descriptors, rng))
            positions[s] = Ft[0].shape[0]
            Vt = _encode(vlad, Ft, len(Ft))
            del Ft
            Vd = _encode(vlad, (f.result() for f in db_f), len(db_f))
            Vq = _encode(vlad, (f.result() for f in q_f), len(q_f)) if qx else None
            del db_f, q_f
            enc[s] = (Vt, Vd, Vq)
            bar.update(1)
            if s != scales[-1]:
                continue
            combos = [(f"{s:g}", enc[s], positions[s]) for s in scales]
            if len(scales) > 1:
                cat = tuple(None if enc[scales[0]][i] is None else
                            l2n(torch.from_numpy(np.concatenate([enc[s][i] for s in scales], 1))).numpy()
                            for i in range(3))
                combos.append(("+".join(f"{s:g}" for s in scales), cat, sum(positions.values())))
            for label, (Vt, Vd, Vq), n_pos in combos:
                row = {"layer": layer, "scale": label, "positions": n_pos, "dim_full": Vd.shape[1]}
                for name, value in evaluate_descriptors(bench, _far_rows(Vd, db_ok), Vq).metrics.items():
                    row[f"{name}_full"] = round(value, 4)
                if dim:
                    pca = PCAWhitening(dim).fit(Vt)
                    res = evaluate_descriptors(bench, _far_rows(pca.transform(Vd), db_ok),
                                               pca.transform(Vq) if Vq is not None else None)
                    for name, value in res.metrics.items():
                        row[f"{name}_{dim}"] = round(value, 4)
                rows.append(row)
                if on_row:
                    on_row(row)
            enc, positions = {}, {}
    finally:
        pool.shutdown(cancel_futures=True)
        bar.close()
    return rows


def write_csv(rows: list[dict], path, meta: dict | None = None) -> None:
    """Rows to CSV, atomically; ``meta`` (backbone, dataset, train, ...) repeated as leading columns."""
    path = Path(path)
    rows = [{**(meta or {}), **r} for r in rows]
    fields = list(dict.fromkeys(k for r in rows for k in r))
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for key, value in r.items():
            try:
                r[key] = float(value) if "." in value or "e" in value.lower() else int(value)
            except (ValueError, AttributeError):
                pass
    return rows


def sweep_title(dataset: str, backbone: str, k: int, train_label: str) -> str:
    train = Path(train_label.split(" (")[-1].rstrip(")")) if " (" in train_label else Path(train_label)
    name = train.parent.name if train.name == "images" else train.name
    return f"{dataset}, {backbone} (VLAD k={k}; vocabulary and PCA from {name})"


def plot_sweep(rows: list[dict], path, title: str = "", metric: str = "mAP", dim: int | None = 128) -> None:
    """mAP against layer in the style of the paper's Figure 2: scale 1 solid, scale 2 dashed (their
    concatenation dotted); one colour for the uncompressed VLAD, one for ``dim``-D."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'convlad[plot]'") from None
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    scales = list(dict.fromkeys(str(r["scale"]) for r in rows))
    styles = ["-", "--", ":", "-."]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(layers) + 2), 4.2), dpi=120)
    variants = [("full", "uncompressed", "tab:blue")]
    if dim and f"{metric}_{dim}" in rows[0]:
        variants.append((str(dim), f"{dim}-D", "tab:red"))
    for suffix, name, colour in variants:
        for si, scale in enumerate(scales):
            ys = [next((float(r[f"{metric}_{suffix}"]) for r in rows if r["layer"] == layer and str(r["scale"]) == scale),
                       np.nan) for layer in layers]
            ax.plot(range(len(layers)), ys, styles[si % len(styles)], color=colour, marker="o", markersize=3,
                    label=f"{name}, scale {scale}")
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels(layers, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel(metric)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    tmp = Path(path).with_name(f".{Path(path).name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def markdown_table(tables: list[list[dict]], metric: str = "mAP", dim: int = 128) -> str:
    """Tables 2–3 of the paper from sweeps: per backbone, the best layer at each scale setting,
    uncompressed and ``dim``-D, one column pair per dataset; each cell "mAP (layer)"."""
    datasets = list(dict.fromkeys(t[0]["dataset"] for t in tables))
    head = "| backbone | scales | " + " | ".join(f"{d} full | {d} {dim}-D" for d in datasets) + " |"
    sep = "|" + " --- |" * (2 + 2 * len(datasets))
    lines = [head, sep]
    backbones = list(dict.fromkeys(t[0]["backbone"] for t in tables))
    for bb in backbones:
        scales = list(dict.fromkeys(str(r["scale"]) for t in tables if t[0]["backbone"] == bb for r in t))
        for scale in scales:
            cells = []
            for d in datasets:
                rows = [r for t in tables if t[0]["backbone"] == bb and t[0]["dataset"] == d
                        for r in t if str(r["scale"]) == scale]
                for suffix in ("full", str(dim)):
                    col = f"{metric}_{suffix}"
                    scored = [r for r in rows if col in r and r[col] != ""]
                    if scored:
                        best = max(scored, key=lambda r: float(r[col]))
                        cells.append(f"{float(best[col]):.3f} ({best['layer']})")
                    else:
                        cells.append("")
            lines.append(f"| {bb} | {scale} | " + " | ".join(cells) + " |")
    trains = sorted({f"{t[0]['dataset']}: {t[0]['train']}" for t in tables if "train" in t[0]})
    if trains:
        lines.append("")
        lines.append("Vocabulary and PCA-whitening learned on: " + "; ".join(trains) + ".")
    return "\n".join(lines)
