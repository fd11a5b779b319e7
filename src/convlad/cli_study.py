"""The measuring commands: ``eval``, ``compare``, ``sweep``, ``table``, ``datasets`` and ``figure``
(registered on the command line's app by ``cli.py``)."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import List, Optional

import typer

from .backbones import get_backbone
from .cli_common import (BackboneOpt, BatchOpt, CodecOpt, CompileOpt, DeviceOpt, DimOpt, FullQueryOpt, KindOpt, KOpt, LayerOpt,
                         LocalWhiteningOpt,
                         PooledOpt, PowerOpt, PrecisionOpt, QeOpt, RerankOpt, ScalesOpt, TrainOpt, UserError, WeightsOpt,
                         _check_dim, _compile, _config, _load_bench, _model, _print_metrics, _scales, _warn)
from .images import ImageError, list_images

datasets_app = typer.Typer(no_args_is_help=True, help="Benchmarks: download, check.")
figure_app = typer.Typer(no_args_is_help=True, help="The paper's Figures 3 and 4 for any backbone, layers and scales.")


def eval_(
    args: List[str] = typer.Argument(..., metavar="[KIND] DATASET", help="Benchmark folder, optionally after its kind (mvbench/groups, holidays, oxford-paris, revisited, ukbench)."),
    train_dir: Path = TrainOpt,
    backbone: str = BackboneOpt, layer: Optional[str] = LayerOpt, pooled: Optional[str] = PooledOpt,
    scales: str = ScalesOpt, k: int = KOpt, dim: int = DimOpt, weights: Optional[str] = WeightsOpt,
    power: float = PowerOpt, qe: int = QeOpt,
    rerank: int = RerankOpt, local_codec: str = CodecOpt, local_whitening: bool = LocalWhiteningOpt,
    aps_out: Optional[Path] = typer.Option(None, "--aps", help="Also write every query's AP to this JSON file, for `convlad compare`."),
    full_query: bool = FullQueryOpt, batch_size: int = BatchOpt, device: Optional[str] = DeviceOpt,
    compile: str = CompileOpt, precision: str = PrecisionOpt,
    folds: int = typer.Option(0, "--folds", help="Choose among the --grid candidates by group-wise K-fold "
                              "cross-validation and report the out-of-fold mAP (0: off)."),
    grid: List[str] = typer.Option([], "--grid", help="With --folds: KEY=V1,V2,... candidates (repeatable; the "
                                   "first value of each is the baseline). Keys: layer, pooled, power, gem, whiten, "
                                   "augment, rerank, features, min_similarity, threshold, min_tentative, score, chance, "
                                   "level, per, cap, link (on or off)."),
    whiten: str = typer.Option("pca", "--whiten", help="pca: PCA-whitening learned on --train only. collection: "
                               "also a whitening learned from pairs the verifier mines in the benchmark's own photos "
                               "(transductive, no labels); both settings are reported. With --folds, a --grid key."),
    augment: Optional[str] = typer.Option(None, "--augment", help="verified (default, as an index does): augment "
                                          "each database descriptor with those of the photos it verifies with among its "
                                          "20 nearest (transductive, no labels; queries search with their own); both "
                                          "settings are reported. none: off. With --folds, a --grid key."),
    fold_seed: int = typer.Option(0, "--fold-seed", help="Seed of the deal of groups into folds."),
    folds_out: Optional[Path] = typer.Option(None, "--folds-out", help="With --folds: write every candidate's "
                                             "per-query APs, the folds and the choices to this JSON file."),
    groups: bool = typer.Option(False, "--groups", help="Measure the groups of the database photos (`convlad "
                                "groups`) against the benchmark's: the groups' rule chosen by group-wise K-fold "
                                "(--folds, default 5) beside baselines chosen the same way (global cosine, perceptual "
                                "hash, --peer), with 95%% bootstrap intervals."),
    peer: List[Path] = typer.Option([], "--peer", help="With --groups: a peer's groupings of the same photos "
                                    "(experiments/peer_fastdup.py writes fastdup's), chosen among by the same K-fold."),
    groups_out: Optional[Path] = typer.Option(None, "--groups-out", help="With --groups: write the study as JSON."),
    second_look: bool = typer.Option(False, "--second-look", help="With --groups: also look again, as an index made "
                                     "with `--second-look` does (ASIFT, for each photo in no sure pair against its 5 "
                                     "nearest; 1-3 s a pair, kept in the cache), and choose how many nearest (2 or 5) "
                                     "and its level by the same K-fold."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Keep fitted models and encoded benchmarks here, "
                                         "so a rerun with other search settings skips both (default: "
                                         "$CONVLAD_EVAL_CACHE or ~/.cache/convlad/eval)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Fit and encode afresh, and keep nothing."),
):
    """Measure a descriptor on a benchmark with its official protocol (mAP, and E/M/H, mP@k, N-S where defined)."""
    from .study.datasets import training_paths
    from .study.evalcache import EvalCache
    from .study.evaluate import evaluate_model, fit_model
    from .pairs import AUGMENT, check_augment

    if len(args) > 2:
        raise UserError(f"eval takes [KIND] DATASET, got {len(args)} arguments")
    if rerank < 0:
        raise UserError(f"--rerank must be 0 or more, got {rerank}")
    if whiten not in ("pca", "collection"):
        raise UserError(f"--whiten {whiten!r}: choose pca or collection")
    check_augment(augment, "--augment")
    if folds and (whiten != "pca" or augment is not None):
        raise UserError("--whiten or --augment with --folds: give them as candidates, --grid whiten=pca,collection "
                        "--grid augment=none,verified")
    if grid and not folds:
        raise UserError("--grid needs --folds K: candidates are chosen by cross-validation")
    if folds < 0 or folds == 1:
        raise UserError(f"--folds must be 0 (off) or 2 or more, got {folds}")
    if cache is not None and no_cache:
        raise UserError("--cache and --no-cache: give one")
    if (peer or groups_out or second_look) and not groups:
        raise UserError("--peer, --groups-out and --second-look go with --groups")
    if groups and grid:
        raise UserError("--groups chooses the groups' rule by K-fold; --grid is for the retrieval settings")
    kind = {"mvbench": "groups"}.get(args[0], args[0]) if len(args) == 2 else None
    bench = _load_bench(Path(args[-1]), kind, full_query)
    train_paths, train_label = training_paths(train_dir)
    store = None if no_cache else EvalCache(cache)
    if groups:
        return _eval_groups(bench, train_paths, store, folds or 5, peer, groups_out, second_look,
                            _model(_config(backbone, layer, pooled, scales, k, dim, weights, power, codec=local_codec,
                                           local_whitening=local_whitening), batch_size, device, compile, precision))
    if folds:
        return _eval_folds(bench, train_paths, train_label, grid, folds, fold_seed, folds_out, rerank, store,
                           lambda o: _model(_config(backbone, o.get("layer", layer), o.get("pooled", pooled), scales,
                                                    k, dim, weights, o.get("power", power), o.get("gem", 1.0), local_codec,
                                                    local_whitening),
                                            batch_size, device,
                                            compile, precision))
    model = _model(_config(backbone, layer, pooled, scales, k, dim, weights, power, codec=local_codec,
                           local_whitening=local_whitening), batch_size, device, compile, precision)
    t = time.time()
    fit_cached = fit_model(model, train_paths, cache=store)
    _check_dim(model)
    ev = evaluate_model(model, bench, train_paths, train_label, qe=qe, rerank=rerank, fit=False, whiten=whiten,
                        augment=augment or AUGMENT, cache=store)
    for w in ev.warnings:
        _warn(f"warning: {w}")
    typer.echo(f"{ev.benchmark}")
    typer.echo(f"descriptor: {ev.descriptor}; vocabulary and PCA from {train_label} ({ev.n_train} images)")
    typer.echo(f"whitening: {ev.whitening}")
    kept = [what for what, hit in (("fit", fit_cached), ("encoding", ev.cached[1])) if hit]
    typer.echo(f"query expansion: {qe or 'off'}  time: {time.time() - t:.0f}s (encoding {ev.encode_img_per_s:.1f} "
               f"images/s{'; ' + ' and '.join(kept) + ' from ' + str(store.root) if kept else ''})")
    if ev.rerank:
        typer.echo(f"re-ranking: top {ev.rerank} by spatial verification ({ev.local_bytes_per_image} bytes of local "
                   f"features per image, layer {'@'.join(f'{v:g}' if isinstance(v, float) else v for v in ev.local_key)}, "
                   f"chance level {ev.chance} inliers); "
                   f"ranking + verification {ev.rank_ms_per_query:.1f} ms/query")
    if aps_out is not None:
        from .storage import write_durable

        doc = ev.aps_document()
        write_durable(aps_out, lambda f: f.write(json.dumps(doc, indent=1).encode()))
        typer.echo(f"per-query APs: {aps_out}")
    if ev.pca_result is not None:
        m = ev.pca_result.metrics
        typer.echo("without the collection's steps (PCA-whitening alone): mAP " + f"{m['mAP']:.3f}"
                   + (f", without re-ranking {m['mAP_without_rerank']:.3f}" if "mAP_without_rerank" in m else ""))
    if ev.grouping is not None:
        g = ev.grouping
        typer.echo(f"groups (components of the verified pairs, `convlad groups`): pairwise precision "
                   f"{g['pairwise_precision']:.3f}, recall {g['pairwise_recall']:.3f}, F1 {g['pairwise_f1']:.3f}; "
                   f"B-cubed F1 {g['bcubed_f1']:.3f}")
    _print_metrics(ev.result.metrics)  # last line: mAP, as scripts expect


def _eval_groups(bench, train_paths, store, k, peers, out, second_look, model):
    from .study.evaluate import fit_model
    from .study.grouping import evaluate_groups

    for f in peers:
        if not f.is_file():
            raise UserError(f"--peer {f}: no such file")
    fit_model(model, train_paths, cache=store)
    _check_dim(model)
    typer.echo(f"{bench.describe()}")
    typer.echo(f"descriptor: {model.describe()}; groups of its {len(bench.paths)} database photos, {k} folds of whole "
               "groups (seeds 0/1/2; the table: seed 0)")
    try:
        doc = evaluate_groups(model, bench, store, k, 3, peers, report=typer.echo, second_look=second_look)
    except ValueError as e:
        raise UserError(str(e)) from None
    if out is not None:
        from .storage import write_durable

        write_durable(out, lambda f: f.write(json.dumps(doc, indent=1, default=float).encode()))
        typer.echo(f"study: {out}")


def _eval_folds(bench, train_paths, train_label, grid_specs, k, seed, out, rerank, cache, make_model):
    from .study.folds import cross_validate_model, parse_grid
    from .storage import write_durable

    if not bench.groups or len(set(bench.groups)) < k:
        raise UserError(f"{bench.name}: --folds {k} needs at least {k} groups of queries")
    try:
        grid = parse_grid(grid_specs)
    except ValueError as e:
        raise UserError(str(e)) from None
    grid.setdefault("rerank", [rerank])
    try:
        rep = cross_validate_model(make_model, bench, train_paths, grid, k, seed, cache=cache)
    except ValueError as e:
        raise UserError(str(e)) from None
    typer.echo(f"{rep.benchmark}; vocabulary and PCA from {train_label}")
    for d in rep.descriptors:
        typer.echo(f"descriptor {d}")
    typer.echo(f"{k} folds of whole groups (seed {seed}); {len(rep.reranked.aps)} re-ranked candidates, "
               f"{len(rep.global_.aps)} global; chosen on {k - 1} folds, scored on the held one ({rep.seconds:.0f}s)")
    for name, cv in (("re-ranked", rep.reranked), ("global", rep.global_)):
        mean, lo, hi = cv.gain()
        typer.echo(f"{name}: out-of-fold mAP {cv.mAP:.4f}; baseline ({cv.baseline}) {cv.full_map(cv.baseline):.4f}; "
                   f"gain of choosing {mean:+.4f} [{lo:+.4f}, {hi:+.4f}] 95%")
        for f, c in enumerate(cv.chosen):
            typer.echo(f"  fold {f}: {c}")
    mean, lo, hi = rep.rerank_gain()
    typer.echo(f"re-ranking's gain out of fold: {mean:+.4f} [{lo:+.4f}, {hi:+.4f}] 95%")
    if out is not None:
        doc = rep.document()
        write_durable(out, lambda f: f.write(json.dumps(doc, indent=1).encode()))
        typer.echo(f"candidates' per-query APs and the choices: {out}")
    typer.echo(f"mAP: {rep.reranked.mAP:.4f} (out of fold)")


def compare(
    baseline: Path = typer.Argument(..., help="Per-query APs of the baseline (`convlad eval ... --aps FILE`)."),
    others: List[Path] = typer.Argument(..., help="Per-query APs of the methods to compare with it."),
    n_boot: int = typer.Option(10000, "--boot", help="Bootstrap resamples."),
):
    """Gain of each method over a baseline, with a 95% bootstrap interval over queries: a default
    changes only when the interval excludes zero."""
    import numpy as np

    from .study.metrics import bootstrap_difference

    def read(p: Path) -> dict:
        try:
            doc = json.loads(p.read_text())
            doc["aps"] = np.array([np.nan if a is None else a for a in doc["aps"]], np.float64)
            return doc
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{p}: not a file of per-query APs from `convlad eval --aps` ({e})") from None

    base = read(baseline)
    typer.echo(f"baseline: {base['descriptor']}  mAP {np.nanmean(base['aps']):.3f}  ({base['benchmark']})")
    for p in others:
        doc = read(p)
        if doc.get("benchmark") != base.get("benchmark"):
            raise UserError(f"{p}: measured on {doc.get('benchmark')!r}, the baseline on {base.get('benchmark')!r}")
        try:
            mean, lo, hi = bootstrap_difference(base["aps"], doc["aps"], n_boot)
        except ValueError as e:
            raise UserError(f"{p}: {e}") from None
        verdict = "significant" if lo > 0 or hi < 0 else "within noise"
        typer.echo(f"{doc['descriptor']}  mAP {np.nanmean(doc['aps']):.3f}  gain {mean:+.3f} "
                   f"[{lo:+.3f}, {hi:+.3f}] 95% ({verdict})")


def _default_cache() -> Path:
    import os

    if os.environ.get("CONVLAD_CACHE"):
        return Path(os.environ["CONVLAD_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "convlad" / "features"


def sweep(
    dataset: Path = typer.Argument(..., help="Benchmark folder (any layout `convlad eval` reads)."),
    train_dir: Path = TrainOpt,
    backbone: str = BackboneOpt,
    layers: str = typer.Option("all", "--layers", help="Layers to study, comma-separated, or 'all'."),
    scales: str = ScalesOpt, k: int = KOpt, dim: int = DimOpt, weights: Optional[str] = WeightsOpt,
    power: float = typer.Option(1.0, "--power", help="Signed power on residual sums; 1 = the paper's VLAD (default here)."),
    kind: Optional[str] = KindOpt, full_query: bool = FullQueryOpt,
    out: Path = typer.Option(Path("sweeps"), "--out", "-o", help="Folder for the CSV and the PNG."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Feature cache folder (default: $CONVLAD_CACHE or ~/.cache/convlad/features)."),
    batch_size: int = BatchOpt, device: Optional[str] = DeviceOpt, compile: str = CompileOpt,
):
    """The paper's study: mAP of every layer's VLAD at every scale, uncompressed and PCA-whitened → CSV + PNG."""
    from .cache import FeatureCache
    from .study.datasets import training_paths
    from .study.sweep import plot_sweep, sweep as run_sweep, sweep_title, write_csv

    bench = _load_bench(dataset, kind, full_query)
    train_paths, train_label = training_paths(train_dir)
    bb = get_backbone(backbone, weights)
    fc = FeatureCache(cache or _default_cache(), bb)
    layer_list = bb.resolve_layers(layers)
    typer.echo(f"{bench.describe()}; {backbone}: {len(layer_list)} layers × scales {scales}; "
               f"vocabulary (k={k}) and PCA-whitening from {train_label} ({len(train_paths)} images)")
    t = time.time()

    def show(row):
        metrics = "  ".join(f"{key}={val:.3f}" for key, val in row.items() if key.startswith("mAP_") and
                            key.count("_") == 1)
        _warn(f"{row['layer']:>12s} @ {row['scale']:<4s} {metrics}")

    rows = run_sweep(bench, train_paths, fc, layer_list, _scales(scales), k=k, dim=dim or None,
                     power=None if power == 1 else power, batch_size=batch_size, device=device,
                     compile=_compile(compile),
                     report=_warn, on_row=show)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{bench.name}-{backbone}"
    write_csv(rows, stem.with_suffix(".csv"), {"backbone": backbone, "dataset": bench.name, "train": train_label})
    plot_sweep(rows, stem.with_suffix(".png"), sweep_title(bench.name, backbone, k, train_label), dim=dim or None)
    typer.echo(f"{len(rows)} rows in {time.time() - t:.0f}s → {stem.with_suffix('.csv')}, {stem.with_suffix('.png')}")


def table(
    csvs: List[Path] = typer.Argument(..., metavar="CSV...", help="Sweep CSVs from `convlad sweep`."),
    metric: str = typer.Option("mAP", "--metric", help="Column to compare: mAP, mAP_E, mAP_H, N-S, ..."),
    dim: int = typer.Option(128, "--dim", help="The compressed dimension the sweeps used."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Also write the table to this file."),
):
    """Tables 2–3 of the paper from sweeps: best layer per dataset, scale 1 / 2 / both, uncompressed vs compressed."""
    from .study.sweep import markdown_table, read_csv

    tables = []
    for c in csvs:
        if not c.is_file():
            raise UserError(f"{c}: file not found")
        rows = read_csv(c)
        if not rows or "layer" not in rows[0] or "backbone" not in rows[0]:
            raise UserError(f"{c}: not a sweep CSV (no layer/backbone columns)")
        tables.append(rows)
    text = markdown_table(tables, metric, dim)
    typer.echo(text)
    if out:
        out.write_text(text + "\n")


@datasets_app.command("download")
def datasets_download(
    name: str = typer.Argument(..., help="holidays, oxford5k, paris6k, roxford5k, rparis6k, ukbench."),
    root: Path = typer.Option(Path("data"), "--root", help="Datasets go to ROOT/NAME."),
):
    """Fetch a benchmark's official images and ground truth (needs internet)."""
    from .study.datasets import download, open_dataset

    out = download(name, root)
    typer.echo(f"{out}: {open_dataset(out).describe()}")


@datasets_app.command("info")
def datasets_info(
    dataset: Path = typer.Argument(..., help="Benchmark folder."),
    kind: Optional[str] = KindOpt, full_query: bool = FullQueryOpt,
):
    """Check a benchmark folder: its detected layout, queries and database size."""
    bench = _load_bench(dataset, kind, full_query)
    n_pos = [len(p) for p in bench.positives]
    typer.echo(f"{bench.describe()}; positives per query {min(n_pos)}–{max(n_pos)}")


FigLayersOpt = typer.Option(None, "--layers", help="Layers as NAME@SCALE, comma-separated (default: the backbone's "
                            "VLAD layer at scale 1, its last pooled layer at scales 1 and 2).")


def _banks(database: Path, extra: list[Path], backbone: str, weights: Optional[str], layers: Optional[str]):
    """The images (``extra`` first, then the database folder's) and a patch bank per layer spec."""
    from .study.figures import parse_layer_spec, patch_bank

    if not database.is_dir():
        raise UserError(f"{database}: not a folder")
    bb = get_backbone(backbone, weights)
    try:
        specs = ([parse_layer_spec(t) for t in layers.split(",") if t.strip()] if layers else
                 [(bb.default_layer or bb.layers[-1], 1.0), *(((bb.default_pooled or bb.layers)[-1], s) for s in (1.0, 2.0))])
        for layer, _ in specs:
            bb.resolve_layers(layer)
    except ValueError as e:
        raise UserError(str(e)) from None
    seen = {str(p.resolve()) for p in extra}
    images = [str(p) for p in extra] + [str(database / p) for p in list_images(database)
                                        if str((database / p).resolve()) not in seen]
    if len(images) < 2:
        raise UserError(f"{database}: the database needs at least two images")
    try:
        return [patch_bank(bb, images, layer, scale, progress=True) for layer, scale in specs]
    except (ValueError, ImageError) as e:
        raise UserError(str(e)) from None


@figure_app.command("correspondence")
def figure_correspondence(
    images: List[Path] = typer.Argument(..., metavar="IMAGE...", help="Photos to rebuild from the database's patches."),
    database: Path = typer.Option(..., "--database", "-d", help="Folder of photos whose local features stand in."),
    out: Path = typer.Option(Path("correspondence.png"), "--out", "-o", help="PNG to write."),
    layers: Optional[str] = FigLayersOpt, backbone: str = BackboneOpt, weights: Optional[str] = WeightsOpt,
):
    """Fig. 3: each patch of an image replaced by the mean patch of its 1 and 5 nearest local features
    in the database: what a layer keeps of local appearance."""
    from .study.figures import correspondence_figure

    for p in images:
        if not p.is_file():
            raise UserError(f"{p}: no such file")
    banks = _banks(database, images, backbone, weights, layers)
    correspondence_figure(banks, list(range(len(images))), out=out)
    typer.echo(f"{out}: {len(images)} images × {len(banks)} layers, from {len(banks[0].desc) // len(set(banks[0].image))}"
               f"-feature maps of {len(set(banks[0].image))} images")


@figure_app.command("clusters")
def figure_clusters(
    database: Path = typer.Option(..., "--database", "-d", help="Folder of photos to sample patches from."),
    out: Path = typer.Option(Path("clusters.png"), "--out", "-o", help="PNG to write."),
    refs: int = typer.Option(6, "--refs", help="Reference patches per layer."),
    neighbours: int = typer.Option(8, "--neighbours", help="Nearest patches shown for each."),
    seed: int = typer.Option(0, "--seed", help="Seed of the reference sample."),
    layers: Optional[str] = FigLayersOpt, backbone: str = BackboneOpt, weights: Optional[str] = WeightsOpt,
):
    """Fig. 4: sampled reference patches, each followed by the patches of its nearest local features
    in other images, sorted by L2 distance."""
    from .study.figures import clusters_figure

    if refs < 1 or neighbours < 1:
        raise UserError("--refs and --neighbours must be at least 1")
    banks = _banks(database, [], backbone, weights, layers)
    clusters_figure(banks, refs, neighbours, seed=seed, out=out)
    typer.echo(f"{out}: {refs} references × {neighbours} neighbours for {', '.join(b.label for b in banks)}")
