"""Command line: ``convlad train | index | search | eval | backbones``.

Every user-facing failure (bad file, missing weights, wrong index) ends in one line on stderr and
exit status 2, never a traceback.
"""
from __future__ import annotations

import json
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
eval_app = typer.Typer(no_args_is_help=True, help="Measure mAP on a benchmark.")
app.add_typer(eval_app, name="eval")


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


def _model(cfg, batch_size: int, device: Optional[str]):
    from .pipeline import ConvVLAD

    model = ConvVLAD(cfg)
    model.batch_size, model.device = batch_size, device
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
BatchOpt = typer.Option(16, "--batch-size", help="Images per forward pass.")
DeviceOpt = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ...; default: CUDA when present.")


@app.command()
def train(
    images: Path = typer.Option(..., "--images", help="Folder of training photos (vocabulary and PCA)."),
    out: Path = typer.Option(..., "--out", "-o", help="Model file to write (.npz)."),
    backbone: str = BackboneOpt, layer: Optional[str] = LayerOpt, pooled: Optional[str] = PooledOpt,
    scales: str = ScalesOpt, k: int = KOpt, dim: int = DimOpt, weights: Optional[str] = WeightsOpt,
    power: float = PowerOpt, batch_size: int = BatchOpt, device: Optional[str] = DeviceOpt,
):
    """Learn the vocabularies and the PCA-whitening from a folder of photos."""
    paths = [str(images / p) for p in list_images(images)]
    if not paths:
        raise UserError(f"{images}: no image files found")
    model = _model(_config(backbone, layer, pooled, scales, k, dim, weights, power), batch_size, device)
    t = time.time()
    model.fit(paths)
    for err in model.errors_:
        _warn(f"skipped {err}")
    _check_dim(model)
    model.save(out)
    typer.echo(f"trained {model.describe()} on {model.n_train_} images in {time.time() - t:.0f}s → {out}")


@app.command()
def index(
    model: Path = typer.Argument(..., help="Model file from `convlad train`."),
    folder: Path = typer.Argument(..., help="Folder of photos to index (searched recursively)."),
    out: Path = typer.Option(..., "--out", "-o", help="Index file; if it exists, it is updated."),
    checkpoint_every: int = typer.Option(500, "--checkpoint-every", help="Save progress every N images."),
    batch_size: int = BatchOpt, device: Optional[str] = DeviceOpt,
):
    """Index a folder; run again on a grown folder to add only the new images."""
    from .index import open_or_create

    idx = open_or_create(model, folder, out)
    idx.model.batch_size, idx.model.device = batch_size, device
    t = time.time()
    s = idx.sync(out, checkpoint_every=checkpoint_every, report=_warn)
    typer.echo(f"{out}: {len(idx)} images ({s['added']} added, {s['kept']} unchanged, {s['removed']} removed, "
               f"{s['skipped']} skipped) in {time.time() - t:.0f}s")


@app.command()
def search(
    index_file: Path = typer.Argument(..., metavar="INDEX", help="Index file from `convlad index`."),
    images: List[Path] = typer.Argument(..., metavar="IMAGE...", help="Query photo(s)."),
    k: int = typer.Option(10, "-k", help="Results per query."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    qe: int = typer.Option(0, "--qe", help="α-query expansion with the top N results (0: off)."),
    device: Optional[str] = DeviceOpt,
):
    """Rank the indexed photos by similarity to each query photo (exact L2 search)."""
    from .index import ImageIndex

    idx = ImageIndex.load(index_file)
    idx.model.device = device
    results, errors = idx.search_images([str(p) for p in images], k=k, qe=qe)
    for err in errors:
        _warn(f"skipped {err}")
    if as_json:
        typer.echo(json.dumps([{"query": q, "results": [{"rank": r + 1, "path": p, "distance": round(d, 6)}
                                                         for r, (p, d) in enumerate(hits)]}
                               for q, hits in results], indent=1))
    else:
        for q, hits in results:
            typer.echo(f"query: {q}")
            for r, (p, d) in enumerate(hits):
                typer.echo(f"  {r + 1:3d}  {d:8.4f}  {p}")
    if errors and not results:
        raise typer.Exit(2)


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


@eval_app.command("mvbench")
def eval_mvbench(
    dataset: Path = typer.Argument(..., help="Benchmark folder: images/, groups.json, distractors/."),
    train_dir: Path = typer.Option(..., "--train", help="Training set (folder, or one with images/)."),
    backbone: str = BackboneOpt, layer: Optional[str] = LayerOpt, pooled: Optional[str] = PooledOpt,
    scales: str = ScalesOpt, k: int = KOpt, dim: int = DimOpt, weights: Optional[str] = WeightsOpt,
    power: float = PowerOpt, qe: int = typer.Option(0, "--qe", help="α-query expansion with the top N (0: off)."),
    batch_size: int = BatchOpt, device: Optional[str] = DeviceOpt,
):
    """mAP on a groups benchmark (mvbench protocol: each group image a query, itself excluded)."""
    from .evaluate import evaluate_descriptors, load_groups_dataset

    bench = load_groups_dataset(dataset)
    tdir = train_dir / "images" if (train_dir / "images").is_dir() else train_dir
    train_paths = [str(tdir / p) for p in list_images(tdir)]
    model = _model(_config(backbone, layer, pooled, scales, k, dim, weights, power), batch_size, device)
    t = time.time()
    model.fit(train_paths)
    _check_dim(model)
    ok, X, errors = model.transform(bench.paths)
    if errors:
        raise UserError(f"benchmark images unreadable: {errors[0]}")
    res = evaluate_descriptors(bench, X, qe=qe)
    typer.echo(f"{bench.name}: {model.describe()}, vocabulary and PCA from {tdir} ({model.n_train_} images)")
    typer.echo(f"queries: {len(bench.queries)}  database: {len(bench.paths)}  query expansion: {qe or 'off'}  "
               f"time: {time.time() - t:.0f}s")
    if "mAP_groups_ge3" in res.extra:
        typer.echo(f"mAP (groups with >= 3 images): {res.extra['mAP_groups_ge3']:.3f}")
    typer.echo(f"mAP: {res.mAP:.3f}")


def main(argv=None):
    try:
        app(args=argv, standalone_mode=False)
    except (UserError, ImageError, WeightsError, FileFormatError, FileNotFoundError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted: indexes are checkpointed; run the same command again to resume", err=True)
        sys.exit(130)
    except Exception as e:  # click's usage errors
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Exit):
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Abort):
            sys.exit(1)
        raise


if __name__ == "__main__":
    main()
