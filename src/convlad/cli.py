"""Command line: ``convlad train | index | search | info | compact | eval | sweep | table | datasets | backbones``.

Every user-facing failure (bad file, missing weights, wrong index) ends in one line on stderr and
exit status 2, never a traceback.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer

from .backbones import BACKBONES, DEFAULT_BACKBONE, WeightsError, get_backbone
from .images import ImageError, list_images
from .storage import FileFormatError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Instance-level image retrieval with VLAD-encoded local CNN features.")
datasets_app = typer.Typer(no_args_is_help=True, help="Benchmarks: download, check.")
app.add_typer(datasets_app, name="datasets")
figure_app = typer.Typer(no_args_is_help=True, help="The paper's Figures 3 and 4 for any backbone, layers and scales.")
app.add_typer(figure_app, name="figure")


class UserError(Exception):
    pass


def _warn(msg: str) -> None:
    """A line on stderr that does not tear through a progress bar."""
    from tqdm.auto import tqdm

    tqdm.write(msg, file=sys.stderr)


def _scales(text: str) -> list[float]:
    try:
        scales = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--scales {text!r}: expected numbers separated by commas, e.g. 1,2") from None
    if not scales or any(s <= 0 for s in scales):
        raise UserError(f"--scales {text!r}: scales must be positive")
    return scales


def _layers(text: Optional[str]) -> Optional[list[str]]:
    """None → the backbone's default; "none" → no layer; else a comma-separated list."""
    if text is None:
        return None
    return [] if text.strip().lower() == "none" else [s for s in text.split(",") if s]


def _config(backbone, layer, pooled, scales, k, dim, weights, power):
    from .pipeline import Config

    cfg = Config(backbone=backbone, layers=_layers(layer), pooled=_layers(pooled), scales=_scales(scales),
                 k=k, dim=dim or None, weights=weights, power=None if power == 1 else power)
    if cfg.layers == [] and cfg.pooled == []:
        raise UserError("--layer none and --pooled none leave nothing to encode")
    return cfg


def _check_dim(model) -> None:
    if model.config.dim and model.dim < model.config.dim:
        _warn(f"warning: PCA-whitening to {model.config.dim}-D needs more than {model.config.dim} training "
              f"images; {model.n_train_} give {model.dim}-D (train on more images, or --dim 0)")


def _compile(value: str):
    choices = {"auto": "auto", "on": True, "off": False}
    if value not in choices:
        raise UserError(f"--compile {value!r}: choose auto, on or off")
    return choices[value]


def _precision(value: str) -> str:
    from .extract import PRECISIONS

    if value not in PRECISIONS:
        raise UserError(f"--precision {value!r}: choose {', '.join(PRECISIONS)}")
    return value


def _model(cfg, batch_size: int, device: Optional[str], compile: str = "auto", precision: str = "fp32"):
    from .pipeline import ConvVLAD

    model = ConvVLAD(cfg)
    model.batch_size, model.device, model.compile = batch_size, device, _compile(compile)
    model.precision = _precision(precision)
    _ = model.backbone  # loads the weights now: a missing file fails before any work is done
    return model


BackboneOpt = typer.Option(DEFAULT_BACKBONE, "--backbone", "-b", help="Network: see `convlad backbones`.")
LayerOpt = typer.Option(None, "--layer", "-l", help="Layer(s) to VLAD-encode, comma-separated ('none': no VLAD); default: the backbone's.")
PooledOpt = typer.Option(None, "--pooled", help="Layer(s) mean-pooled beside the VLAD; 'none' for the paper's pure VLAD; default: the backbone's.")
ScalesOpt = typer.Option("1,2", "--scales", "-s", help="Scales, comma-separated: s warps to (224·s)².")
KOpt = typer.Option(100, "--k", help="Vocabulary size (k-means centroids) per layer and scale.")
DimOpt = typer.Option(128, "--dim", help="PCA-whitened dimension; 0 keeps the uncompressed VLAD.")
WeightsOpt = typer.Option(None, "--weights", help="Weights file (VGG16/GoogLeNet official .pth, ...).")
PowerOpt = typer.Option(0.5, "--power", help="Signed power on residual sums before intra-norm; 1 = the paper's plain VLAD.")
RERANK = 100  # +0.055 mAP on mvbench-dev [+0.030, +0.085]; as much on Lite1/2, MobileNetV2, synthetic views (docs/defaults.md)
RerankOpt = typer.Option(RERANK, "--rerank", help="Re-rank the top N by spatial verification of local features (0: off, the global ranking alone).")
SearchRerankOpt = typer.Option(None, "--rerank", show_default=False, help="Re-rank the top N by spatial verification "
                               f"of the local features kept in the index (0: off). Default: {RERANK} where the index keeps them, else 0.")
BatchOpt = typer.Option(16, "--batch-size", help="Images decoded and encoded per batch (on CPU the network runs "
                        "them in chunks of 4 at scale 1, 1 at scale 2).")
DeviceOpt = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ...; default: CUDA when present.")
CompileOpt = typer.Option("auto", "--compile", help="torch.compile the network (1.2–1.5× on 2 CPU cores after 7–30 s "
                          "of compilation per input size): auto (CPU jobs of 2 000+ images at scales 1+2, "
                          "10 000+ at scale 1), on, off.")
PrecisionOpt = typer.Option("fp32", "--precision", help="Network arithmetic: fp32, or bf16/fp16 autocast for "
                            "GPUs (emulated, so slow, on most CPUs).")


@app.command()
def train(
    images: Path = typer.Option(..., "--images", help="Folder of training photos (vocabulary and PCA)."),
    out: Path = typer.Option(..., "--out", "-o", help="Model file to write (.npz)."),
    backbone: str = BackboneOpt, layer: Optional[str] = LayerOpt, pooled: Optional[str] = PooledOpt,
    scales: str = ScalesOpt, k: int = KOpt, dim: int = DimOpt, weights: Optional[str] = WeightsOpt,
    power: float = PowerOpt, batch_size: int = BatchOpt, device: Optional[str] = DeviceOpt,
    compile: str = CompileOpt, precision: str = PrecisionOpt,
):
    """Learn the vocabularies and the PCA-whitening from a folder of photos."""
    skipped: list[str] = []
    paths = [str(images / p) for p in list_images(images, skipped=skipped)]
    for msg in skipped:
        _warn(f"skipped {msg}")
    if not paths:
        raise UserError(f"{images}: no image files found")
    model = _model(_config(backbone, layer, pooled, scales, k, dim, weights, power), batch_size, device, compile,
                   precision)
    t = time.time()
    model.fit(paths)
    for err in model.errors_:
        _warn(f"skipped {err}")
    _check_dim(model)
    model.save(out)
    typer.echo(f"trained {model.describe()} on {model.n_train_} images in {time.time() - t:.0f}s → {out} "
               f"(chance level of spatial verification: {model.chance_} inliers)")


WaitOpt = typer.Option(False, "--wait", help="If another process is writing to the index, wait for it "
                       "instead of failing.")


@app.command()
def index(
    model: Path = typer.Argument(..., help="Model file from `convlad train`."),
    folder: Path = typer.Argument(..., help="Folder of photos to index (searched recursively)."),
    out: Path = typer.Option(..., "--out", "-o", help="Index folder; if it exists, it is updated."),
    checkpoint_every: int = typer.Option(500, "--checkpoint-every", help="Commit a segment every N images."),
    ann: Optional[str] = typer.Option(None, "--ann", help="Search structure: exact, ivfpq, or auto (IVF-PQ from "
                                      "100 000 images on; the default for a new index)."),
    wait: bool = WaitOpt,
    local: Optional[int] = typer.Option(None, "--local-features", help="Local features kept per image for `search "
                                        "--rerank` (about 82 bytes each; 0: none). Default: 300 for a new index, "
                                        "else the index's setting."),
    ray: Optional[str] = typer.Option(None, "--ray", help="Encode on Ray: 'local' starts Ray on this machine, "
                                      "'auto' or 'ray://HOST:PORT' joins a cluster (pip install 'convlad[ray]')."),
    batch_size: int = BatchOpt, device: Optional[str] = DeviceOpt, compile: str = CompileOpt,
    precision: str = PrecisionOpt,
):
    """Index a folder; run again on a grown folder to add only the new images."""
    from .pipeline import ConvVLAD
    from .store import IndexStore

    if ann is not None and ann not in ("auto", "exact", "ivfpq"):
        raise UserError(f"--ann {ann!r}: choose auto, exact or ivfpq")
    if checkpoint_every < 1:
        raise UserError(f"--checkpoint-every {checkpoint_every}: must be at least 1")
    if local is not None and not 0 <= local <= 65535:
        raise UserError(f"--local-features {local}: must be between 0 and 65535")
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder")
    with IndexStore.create(out, model=ConvVLAD.load(model), root=folder, ann=ann, wait=wait, report=_warn,
                           local=local) as idx:
        idx.model.batch_size, idx.model.device, idx.model.compile = batch_size, device, _compile(compile)
        idx.model.precision = _precision(precision)
        t = time.time()
        if ray is not None:
            from .cluster import RayMissing, sync_with_ray

            try:
                s = sync_with_ray(idx, None if ray == "local" else ray, batch_size=batch_size, report=_warn)
            except RayMissing as e:
                raise UserError(str(e)) from None
        else:
            s = idx.sync(commit_every=checkpoint_every, report=_warn)
        search = idx.info()["search"]
        typer.echo(f"{out}: {len(idx)} images ({s['added']} added, {s['kept']} unchanged, {s['removed']} removed, "
                   f"{s['skipped']} skipped) in {time.time() - t:.0f}s; search: {search}")


@app.command()
def search(
    index_file: Path = typer.Argument(..., metavar="INDEX", help="Index from `convlad index`."),
    images: List[Path] = typer.Argument(..., metavar="IMAGE...", help="Query photo(s)."),
    k: int = typer.Option(10, "-k", help="Results per query."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    qe: int = typer.Option(0, "--qe", help="α-query expansion with the top N results (0: off)."),
    rerank: Optional[int] = SearchRerankOpt,
    device: Optional[str] = DeviceOpt,
):
    """Rank the indexed photos by similarity to each query photo."""
    from .store import IndexStore

    if k < 1:
        raise UserError(f"-k {k}: must be at least 1")
    if rerank is not None and rerank < 0:
        raise UserError(f"--rerank {rerank}: must be 0 or more")
    idx = IndexStore.open(index_file)
    if rerank is None:
        rerank = RERANK if idx.local_k else 0
    elif rerank and not idx.local_k:
        _warn(f"warning: {index_file} keeps no local features (indexed with --local-features 0): results in global order")
        rerank = 0
    idx.model.device = device
    results, errors = idx.search_images([str(p) for p in images], k=k, qe=qe, rerank=rerank)
    for err in errors:
        _warn(f"skipped {err}")
    if as_json:
        typer.echo(json.dumps([{"query": q, "results": [{"rank": r + 1, "id": i, "path": p, "distance": round(d, 6),
                                                          **({"inliers": n} if rerank else {})}
                                                         for r, (p, d, i, n) in enumerate(hits)]}
                               for q, hits in results], indent=1))
    else:
        for q, hits in results:
            typer.echo(f"query: {q}")
            for r, (p, d, _, n) in enumerate(hits):
                typer.echo(f"  {r + 1:3d}  {d:8.4f}  " + (f"{'-' if n is None else n:>4} inliers  " if rerank else "") + p)
    if errors and not results:
        raise UserError(f"no query could be read ({len(errors)} skipped)")


@app.command()
def info(
    index_file: Path = typer.Argument(..., metavar="INDEX", help="Index from `convlad index`."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
):
    """Describe an index: model, images, segments, dead rows, generation, size on disk."""
    from .store import IndexStore

    d = IndexStore.open(index_file).info()
    if as_json:
        typer.echo(json.dumps(d, indent=1))
        return
    for key, value in d.items():
        if key == "bytes":
            key, value = "size", f"{value / 1e6:.1f} MB"
        typer.echo(f"{key}: {value}")


@app.command()
def compact(
    index_file: Path = typer.Argument(..., metavar="INDEX", help="Index from `convlad index`."),
    wait: bool = WaitOpt,
):
    """Merge small segments and drop deleted rows; safe while others search."""
    from .store import IndexStore

    t = time.time()
    with IndexStore.open(index_file, write=True, wait=wait) as idx:
        s = idx.compact()
        typer.echo(f"{index_file}: {s['segments_before']} → {s['segments_after']} segments, {s['dropped']} dead rows "
                   f"dropped, {len(idx)} images, in {time.time() - t:.1f}s")


@app.command()
def explain(
    index_file: Path = typer.Argument(..., metavar="INDEX", help="Index from `convlad index`."),
    query: Path = typer.Argument(..., metavar="QUERY", help="Query photo."),
    result: str = typer.Argument(..., metavar="RESULT", help="An indexed photo: its id (from search --json) or a path."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="PNG to write (default: match.png)."),
    as_json: bool = typer.Option(False, "--json", help="Print the matches as JSON instead of drawing them."),
    layer: Optional[str] = typer.Option(None, "--layer", "-l", help="Layer whose local features are matched "
                                        "(default: the model's first VLAD layer)."),
):
    """Why a result matched: local-feature correspondences and their geometric inliers, drawn."""
    from .explain import draw_matches, match_images
    from .store import IndexStore

    idx = IndexStore.open(index_file)
    if result.isdigit():
        try:
            result = idx.path_of(int(result))
        except KeyError as e:
            raise UserError(str(e).strip("'\"")) from None
    elif not Path(result).is_file():
        raise UserError(f"{result}: no such file (give an indexed photo's id or path)")
    if not query.is_file():
        raise UserError(f"{query}: no such file")
    m = match_images(idx.model, str(query), result, layer=layer)
    if as_json:
        typer.echo(json.dumps(m.to_dict(), indent=1))
        return
    out = out or Path("match.png")
    draw_matches(m, str(query), result, out)
    typer.echo(f"{query} ↔ {result}: {len(m.pairs)} matches, {m.n_inliers} geometric inliers → {out}")


@app.command()
def serve(
    index_file: Path = typer.Argument(..., metavar="INDEX", help="Index from `convlad index`."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (loopback by default)."),
    port: int = typer.Option(8000, "--port", help="TCP port."),
    token: Optional[str] = typer.Option(None, "--token", envvar="CONVLAD_TOKEN",
                                        help="Token for uploads and deletes (header 'Authorization: Bearer TOKEN'); "
                                        "without one, writes are refused beyond loopback."),
    cors: Optional[str] = typer.Option(None, "--cors", help="Origins allowed to call the API from a browser, "
                                       "comma-separated (default: none)."),
    batch_window_ms: float = typer.Option(5.0, "--batch-window-ms", help="How long the encoder waits for more "
                                          "queries to batch with the first; 0 with --max-batch 1: one query per pass."),
    max_batch: int = typer.Option(16, "--max-batch", help="Queries encoded in one forward pass, at most."),
    max_upload_mb: int = typer.Option(20, "--max-upload-mb", help="Largest request body accepted."),
    body_timeout: float = typer.Option(30.0, "--body-timeout", help="Seconds a request body may stall."),
):
    """Serve an index: search API (docs at /docs) and a web page at /."""
    from .serve import serve as run_server

    if not 0 < port < 65536:
        raise UserError(f"--port {port}: must be from 1 to 65535")
    if max_batch < 1 or batch_window_ms < 0 or max_upload_mb < 1 or body_timeout <= 0:
        raise UserError("--max-batch, --max-upload-mb and --body-timeout must be positive, --batch-window-ms ≥ 0")
    run_server(index_file, host=host, port=port, token=token, cors=[c for c in (cors or "").split(",") if c] or None,
               window_ms=batch_window_ms, max_batch=max_batch, max_upload_mb=max_upload_mb,
               body_timeout=body_timeout, log=lambda m: typer.echo(m, err=True))


@app.command()
def backbones():
    """List the backbones and their tap-able layers."""
    import inspect

    for name, factory in BACKBONES.items():
        try:
            bb, status = get_backbone(name), "weights ok"
        except WeightsError as e:
            if "pretrained" not in inspect.signature(factory).parameters:
                typer.echo(f"{name}: unavailable here: {e}")
                continue
            bb, status = factory(None, pretrained=False), f"weights missing: {e}"
        pooled = f", pooled {','.join(bb.default_pooled)}" if bb.default_pooled else ""
        typer.echo(f"{name} (default layer {bb.default_layer}{pooled}; {status})\n  layers: {', '.join(bb.layers)}")


def _load_bench(dataset: Path, kind: Optional[str], full_query: bool):
    from .datasets import open_dataset

    return open_dataset(dataset, kind, full_query=full_query or None)


KindOpt = typer.Option(None, "--kind", help="Dataset layout: groups, holidays, oxford-paris, revisited, ukbench (default: detected).")
FullQueryOpt = typer.Option(False, "--full-query", help="Oxford/Paris: query with the whole image, not its box (the paper's choice).")
TrainOpt = typer.Option(..., "--train", help="Training photos (a folder, or one with images/), or a benchmark folder "
                        "whose database is used (Oxford evaluated with Paris, and vice versa).")


def _print_metrics(metrics: dict[str, float]) -> None:
    for name, value in metrics.items():
        if name != "mAP":
            typer.echo(f"{name}: {value:.3f}")
    typer.echo(f"mAP: {metrics['mAP']:.3f}")


def _available_memory() -> float:
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        except (OSError, ValueError):  # no such figure here (macOS): nothing to hold re-ranking back
            return float("inf")


@app.command("eval")
def eval_(
    args: List[str] = typer.Argument(..., metavar="[KIND] DATASET", help="Benchmark folder, optionally after its kind (mvbench/groups, holidays, oxford-paris, revisited, ukbench)."),
    train_dir: Path = TrainOpt,
    backbone: str = BackboneOpt, layer: Optional[str] = LayerOpt, pooled: Optional[str] = PooledOpt,
    scales: str = ScalesOpt, k: int = KOpt, dim: int = DimOpt, weights: Optional[str] = WeightsOpt,
    power: float = PowerOpt, qe: int = typer.Option(0, "--qe", help="α-query expansion with the top N (0: off)."),
    rerank: int = RerankOpt,
    aps_out: Optional[Path] = typer.Option(None, "--aps", help="Also write every query's AP to this JSON file, for `convlad compare`."),
    full_query: bool = FullQueryOpt, batch_size: int = BatchOpt, device: Optional[str] = DeviceOpt,
    compile: str = CompileOpt, precision: str = PrecisionOpt,
):
    """Measure a descriptor on a benchmark with its official protocol (mAP, and E/M/H, mP@k, N-S where defined)."""
    from .datasets import training_paths
    from .evaluate import evaluate_descriptors, extra_query_items
    import numpy as np

    from .verify import LOCAL_K, LocalCodes

    if len(args) > 2:
        raise UserError(f"eval takes [KIND] DATASET, got {len(args)} arguments")
    if rerank < 0:
        raise UserError(f"--rerank must be 0 or more, got {rerank}")
    kind = {"mvbench": "groups"}.get(args[0], args[0]) if len(args) == 2 else None
    bench = _load_bench(Path(args[-1]), kind, full_query)
    train_paths, train_label = training_paths(train_dir)
    model = _model(_config(backbone, layer, pooled, scales, k, dim, weights, power), batch_size, device, compile,
                   precision)
    t = time.time()
    model.fit(train_paths)
    _check_dim(model)
    need = len(bench.paths) * LocalCodes.size(LOCAL_K, model.local_dim)
    if rerank and need > _available_memory() / 2:
        _warn(f"warning: re-ranking off: {len(bench.paths)} images would need {need / 2**30:.1f} GiB of local "
              f"features in memory, more than half of what is free (--rerank 0: the global ranking, without this warning)")
        rerank = 0
    local = LOCAL_K if rerank else 0
    t_enc = time.time()
    ok, X, errors, *L = model.transform(bench.paths, local=local)
    t_enc = len(bench.paths) / max(1e-9, time.time() - t_enc)
    if errors:
        raise UserError(f"benchmark images unreadable: {errors[0]}")
    X_q, L_q, crops = None, [None], extra_query_items(bench)
    if crops:
        _, X_q, errors, *L_q = model.transform(crops, local=local)
        if errors:
            raise UserError(f"query images unreadable: {errors[0]}")
    t_rank = time.time()
    res = evaluate_descriptors(bench, X, X_q, qe=qe, rerank=rerank, local=(L or [None])[0], local_q=L_q[0],
                               verifier=model.verifier())
    t_rank = (time.time() - t_rank) / max(1, bench.n_queries) * 1000
    typer.echo(f"{bench.describe()}")
    typer.echo(f"descriptor: {model.describe()}; vocabulary and PCA from {train_label} ({model.n_train_} images)")
    typer.echo(f"query expansion: {qe or 'off'}  time: {time.time() - t:.0f}s (encoding {t_enc:.1f} images/s)")
    if rerank:
        typer.echo(f"re-ranking: top {rerank} by spatial verification ({L[0].bytes_per_image} bytes of local "
                   f"features per image, layer {'@'.join(f'{v:g}' if isinstance(v, float) else v for v in model.local_key)}, "
                   f"chance level {model.chance_} inliers); "
                   f"ranking + verification {t_rank:.1f} ms/query")
    if aps_out is not None:
        from .storage import write_durable

        label = f"{model.describe()}" + (f" qe={qe}" if qe else "") + (f" rerank={rerank}" if rerank else "")

        def listed(aps):
            return [None if np.isnan(a) else float(a) for a in aps]

        doc = {"benchmark": bench.describe(), "descriptor": label, "mAP": res.mAP, "aps": listed(res.aps),
               "encode_img_per_s": t_enc}
        if res.aps_without_rerank is not None:
            doc.update(mAP_without_rerank=res.extra["mAP_without_rerank"], rerank_ms_per_query=t_rank,
                       aps_without_rerank=listed(res.aps_without_rerank), local_bytes_per_image=L[0].bytes_per_image,
                       chance_level=model.chance_)
        write_durable(aps_out, lambda f: f.write(json.dumps(doc, indent=1).encode()))
        typer.echo(f"per-query APs: {aps_out}")
    _print_metrics(res.metrics)  # last line: mAP, as scripts expect


@app.command()
def compare(
    baseline: Path = typer.Argument(..., help="Per-query APs of the baseline (`convlad eval ... --aps FILE`)."),
    others: List[Path] = typer.Argument(..., help="Per-query APs of the methods to compare with it."),
    n_boot: int = typer.Option(10000, "--boot", help="Bootstrap resamples."),
):
    """Gain of each method over a baseline, with a 95% bootstrap interval over queries: a default
    changes only when the interval excludes zero."""
    import numpy as np

    from .metrics import bootstrap_difference

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


@app.command()
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
    from .datasets import training_paths
    from .study import plot_sweep, sweep as run_sweep, sweep_title, write_csv

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


@app.command()
def table(
    csvs: List[Path] = typer.Argument(..., metavar="CSV...", help="Sweep CSVs from `convlad sweep`."),
    metric: str = typer.Option("mAP", "--metric", help="Column to compare: mAP, mAP_E, mAP_H, N-S, ..."),
    dim: int = typer.Option(128, "--dim", help="The compressed dimension the sweeps used."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Also write the table to this file."),
):
    """Tables 2–3 of the paper from sweeps: best layer per dataset, scale 1 / 2 / both, uncompressed vs compressed."""
    from .study import markdown_table, read_csv

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
    from .datasets import download, open_dataset

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
    from .figures import parse_layer_spec, patch_bank

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
        return [patch_bank(bb, images, layer, scale) for layer, scale in specs]
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
    from .figures import correspondence_figure

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
    from .figures import clusters_figure

    if refs < 1 or neighbours < 1:
        raise UserError("--refs and --neighbours must be at least 1")
    banks = _banks(database, [], backbone, weights, layers)
    clusters_figure(banks, refs, neighbours, seed=seed, out=out)
    typer.echo(f"{out}: {refs} references × {neighbours} neighbours for {', '.join(b.label for b in banks)}")


def _show_warning(message, category, filename, lineno, file=None, line=None):
    _warn(f"warning: {message}")


def _usage_error_class() -> type:
    """The usage-error class of whichever click typer runs on: typer ≥ 0.2x vendors its own copy
    (no ``click`` module installed), older typer re-exports click's; both reach it from the public
    ``typer.BadParameter``."""
    return next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


def _usage_line(e) -> str:
    ctx = getattr(e, "ctx", None)
    path = ctx.command_path if ctx is not None else "convlad"
    return f"error: {path}: {e.format_message()} (see '{path} --help')"


def main(argv=None):
    import warnings

    warnings.showwarning = _show_warning  # one line each, through the progress bars
    interrupted = "interrupted: indexes are checkpointed; run the same command again to resume"
    try:
        rc = app(args=argv, prog_name="convlad", standalone_mode=False)
    except (KeyboardInterrupt, typer.Abort):  # older click turns ^C into Abort
        typer.echo(interrupted, err=True)
        sys.exit(130)
    except Exception as e:
        if isinstance(e, _usage_error_class()):
            # `convlad` or `convlad datasets` alone: typer has printed the help already
            if type(e).__name__ != "NoArgsIsHelpError":
                typer.echo(_usage_line(e), err=True)
            sys.exit(2)
        if isinstance(e, (UserError, ImageError, WeightsError, FileFormatError, OSError, ValueError)):
            typer.echo(f"error: {e}", err=True)
            sys.exit(2)
        raise
    if rc == 130:  # typer ≥ 0.2x turns ^C into Exit(130), returned in non-standalone mode
        typer.echo(interrupted, err=True)
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
