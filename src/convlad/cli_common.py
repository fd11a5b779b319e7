"""What the command line's commands share: the one-line user error, warnings that keep clear of
progress bars, the options of the descriptor and of the search, and their parsing."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .backbones import DEFAULT_BACKBONE

class UserError(Exception):
    pass


def _warn(msg: str) -> None:
    """A line on stderr that does not tear through a progress bar."""
    from .progress import write

    write(msg)


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


def _config(backbone, layer, pooled, scales, k, dim, weights, power, gem=1.0, codec="int8", local_whitening=True,
            coarse_local: int | None = None):
    from .local_codec import check
    from .pipeline import Config
    from .verify import COARSE_LOCAL

    try:
        check(codec)
    except ValueError as e:
        raise UserError(f"--local-codec: {e}") from None
    cfg = Config(backbone=backbone, layers=_layers(layer), pooled=_layers(pooled), scales=_scales(scales),
                 k=k, dim=dim or None, weights=weights, power=None if power == 1 else power, gem=gem, local_codec=codec,
                 local_whitening=local_whitening, coarse_local=COARSE_LOCAL if coarse_local is None else coarse_local)
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
    from .runtime import PRECISION_SETTINGS

    if value not in PRECISION_SETTINGS:
        raise UserError(f"--precision {value!r}: choose {', '.join(PRECISION_SETTINGS)}")
    return value


def _runtime(batch_size: int, device: Optional[str], compile: str = "auto", precision: str = "auto"):
    """The runtime options of a command (``runtime.Runtime``), each checked with one line on error."""
    from .runtime import Runtime

    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be at least 1")
    return Runtime(device=device, batch_size=batch_size, compile=_compile(compile), precision=_precision(precision))


def _model(cfg, batch_size: int, device: Optional[str], compile: str = "auto", precision: str = "auto"):
    from .pipeline import ConvVLAD

    model = ConvVLAD(cfg, runtime=_runtime(batch_size, device, compile, precision))
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
RERANK = 100  # search.RERANK, without importing numpy for `--help`
RerankOpt = typer.Option(RERANK, "--rerank", help="Re-rank the top N by spatial verification of local features (0: off, the global ranking alone).")
SearchRerankOpt = typer.Option(None, "--rerank", show_default=False, help="Re-rank the top N by spatial verification "
                               f"of the local features kept in the index (0: off). Default: {RERANK} where the index keeps them, else 0.")
CodecOpt = typer.Option("int8", "--local-codec", help="How an index stores each photo's local features: int8 "
                        "(32.8 kB a photo with Lite0, the smaller scale's 100 included) or a compact code learned "
                        "with the model, rqM or pqM (M bytes a feature; rq12: 5.0 kB, for 100 M photos; what it "
                        "costs: docs/defaults.md).")
LocalWhiteningOpt = typer.Option(True, "--local-whitening/--no-local-whitening",
                                 help="Learn a whitening of the local features the verifier matches, from synthetic "
                                      "views of the training photos.")
CoarseLocalOpt = typer.Option(None, "--coarse-local", min=0, show_default=False,
                              help="The smaller scale's features an index keeps a photo beside the 300 of the larger "
                                   "(default 100: 8.2 kB with Lite0), so that a wider view added after a nearer one "
                                   "joins it; 0 keeps none.")
QeOpt = typer.Option(0, "--qe", help="α-query expansion with the top N results (0: off).")
BatchOpt = typer.Option(16, "--batch-size", help="Images decoded and encoded per batch (on CPU the network runs "
                        "them in chunks of 4 at scale 1, 1 at scale 2).")
DeviceOpt = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ...; default: CUDA when present.")
CompileOpt = typer.Option("auto", "--compile", help="torch.compile the network (1.2–1.5× on 2 CPU cores after 7–30 s "
                          "of compilation per input size): auto (CPU jobs of 2 000+ images at scales 1+2, "
                          "10 000+ at scale 1), on, off.")
PrecisionOpt = typer.Option("auto", "--precision", help="Network arithmetic: auto (bf16 on a CPU with AMX-BF16 or "
                            "AVX512-BF16 and on CUDA, else fp32; CONVLAD_PRECISION forces one), fp32, bf16, fp16.")


WaitOpt = typer.Option(False, "--wait", help="If another process is writing to the index, wait for it "
                       "instead of failing.")


def _settings(index, k: int, rerank: Optional[int], qe: int, where: str):
    """The search's settings from the options, said once where the index cannot re-rank."""
    from .search import Settings

    if k < 1:
        raise UserError(f"-k {k}: must be at least 1")
    if rerank is not None and rerank < 0:
        raise UserError(f"--rerank {rerank}: must be 0 or more")
    if qe < 0:
        raise UserError(f"--qe {qe}: must be 0 or more")
    if rerank and not index.local_k:
        _warn(f"warning: {where} keeps no local features (indexed with --local-features 0): results in global order")
    return Settings(k=k, rerank=rerank, qe=qe).resolve(index)


def _load_bench(dataset: Path, kind: Optional[str], full_query: bool):
    from .study.datasets import open_dataset

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
