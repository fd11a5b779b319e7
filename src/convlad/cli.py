"""Command line: ``convlad train | index | search | explain | info | compact | serve | eval | compare |
sweep | table | datasets | figure | backbones``. The index and search commands are here; the measuring
ones in ``cli_study.py``; what they share in ``cli_common.py``.

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

from . import cli_study
from .backbones import BACKBONES, WeightsError, get_backbone
from .cli_common import (BackboneOpt, BatchOpt, CoarseLocalOpt, CodecOpt, CompileOpt, DeviceOpt, DimOpt, KOpt, LayerOpt, LocalWhiteningOpt,
                         PooledOpt, PowerOpt,
                         PrecisionOpt, QeOpt, ScalesOpt, SearchRerankOpt, UserError, WaitOpt, WeightsOpt, _check_dim,
                         _compile, _config, _model, _precision, _runtime, _settings, _warn)
from .images import ImageError, list_images
from .index.segments import has_model, is_index
from .storage import FileFormatError

def _flags_as_flags():
    """Typer ≥ 0.2x labels every option with its type, so a flag reads ``--json <bool>`` as if it took
    a value; it has no hook for this, hence the patch: a flag shows no type."""
    from typer.core import TyperOption

    shown = TyperOption.display_type_rich
    if getattr(shown, "convlad", False):
        return

    def display_type_rich(self, ctx):
        return None if self.is_flag else shown(self, ctx)

    display_type_rich.convlad = True
    TyperOption.display_type_rich = display_type_rich


_flags_as_flags()

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Instance-level image retrieval with VLAD-encoded local CNN features.")
app.add_typer(cli_study.datasets_app, name="datasets")
app.add_typer(cli_study.figure_app, name="figure")


@app.command()
def train(
    images: Path = typer.Option(..., "--images", help="Folder of training photos (vocabulary and PCA)."),
    out: Path = typer.Option(..., "--out", "-o", help="Model file to write (.npz)."),
    backbone: str = BackboneOpt, layer: Optional[str] = LayerOpt, pooled: Optional[str] = PooledOpt,
    scales: str = ScalesOpt, k: int = KOpt, dim: int = DimOpt, weights: Optional[str] = WeightsOpt,
    power: float = PowerOpt, local_codec: str = CodecOpt, local_whitening: bool = LocalWhiteningOpt,
    coarse_local: Optional[int] = CoarseLocalOpt,
    batch_size: int = BatchOpt, device: Optional[str] = DeviceOpt, compile: str = CompileOpt, precision: str = PrecisionOpt,
):
    """Learn the vocabularies and the PCA-whitening from a folder of photos."""
    skipped: list[str] = []
    paths = [str(images / p) for p in list_images(images, skipped=skipped)]
    for msg in skipped:
        _warn(f"skipped {msg}")
    if not paths:
        raise UserError(f"{images}: no image files found")
    model = _model(_config(backbone, layer, pooled, scales, k, dim, weights, power, codec=local_codec,
                           local_whitening=local_whitening, coarse_local=coarse_local), batch_size, device, compile,
                   precision)
    t = time.time()
    model.fit(paths)
    for err in model.errors_:
        _warn(f"skipped {err}")
    _check_dim(model)
    model.save(out)
    typer.echo(f"trained {model.describe()} on {model.n_train_} images in {time.time() - t:.0f}s → {out} "
               f"(chance level of spatial verification: {model.chance_} inliers"
               + (f"; of pairs, as mining matches them: {model.pair_chance_})"
                  if model.pair_chance_ != model.chance_ or model.local_whitening_ is not None else ")"))


@app.command()
def index(
    args: List[Path] = typer.Argument(..., metavar="[MODEL] FOLDER", help="A model file from `convlad train` "
                                      "(without one, a new index fits its own on a sample of FOLDER; an existing "
                                      "one keeps its model), then the folder of photos to index (searched recursively)."),
    out: Path = typer.Option(..., "--out", "-o", help="Index folder; if it exists, it is updated."),
    checkpoint_every: int = typer.Option(500, "--checkpoint-every", help="Commit a segment every N images."),
    ann: Optional[str] = typer.Option(None, "--ann", help="Search structure: exact, ivfpq, or auto (IVF-PQ from "
                                      "100 000 images on; the default for a new index)."),
    wait: bool = WaitOpt,
    local: Optional[int] = typer.Option(None, "--local-features", help="Local features kept per image for `search "
                                        "--rerank` (about 82 bytes each; 0: none). Default: 300 for a new index, "
                                        "else the index's setting."),
    augment: Optional[str] = typer.Option(None, "--augment", help="verified: mine each added photo's pairs (its 20 "
                                          "nearest, verified) and search each indexed photo's descriptor summed with "
                                          "its partners'; none: plain. Default: verified for a new index that keeps "
                                          "local features, else the index's setting (docs/defaults.md)."),
    ray: Optional[str] = typer.Option(None, "--ray", help="Encode on Ray: 'local' starts Ray on this machine, "
                                      "'auto' or 'ray://HOST:PORT' joins a cluster (pip install 'convlad[ray]')."),
    shards: Optional[int] = typer.Option(None, "--shards", help="Spread the index over N shards, for `serve --ray` "
                                         "(each commit is split among them, the emptiest first; an existing index's "
                                         "segments are re-spread, no file moved). Default: 1 for a new index, else the "
                                         "index's."),
    second_look: Optional[bool] = typer.Option(None, "--second-look/--no-second-look", help="Look again at each photo "
                                               "added without a sure pair: ASIFT against its 5 nearest, which joins "
                                               "extreme viewpoints to their groups (`convlad groups`; about 4.5 s a "
                                               "lonely photo on 2 cores, docs/defaults.md). Default: off for a new "
                                               "index, else the index's setting."),
    local_codec: Optional[str] = typer.Option(None, "--local-codec", help="For a new index that fits its own model: "
                                              "how it stores the local features, int8 (the default) or rqM/pqM "
                                              "(see `convlad train --local-codec`). A given model brings its own."),
    batch_size: int = BatchOpt, device: Optional[str] = DeviceOpt, compile: str = CompileOpt,
    precision: str = PrecisionOpt,
):
    """Index a folder; run again on a grown folder to add only the new images."""
    from .pipeline import ConvVLAD
    from .index.store import MAX_SHARDS, IndexStore
    from .index.sync import sync
    from .pairs import check_augment

    if ann is not None and ann not in ("auto", "exact", "ivfpq"):
        raise UserError(f"--ann {ann!r}: choose auto, exact or ivfpq")
    if checkpoint_every < 1:
        raise UserError(f"--checkpoint-every {checkpoint_every}: must be at least 1")
    if local is not None and not 0 <= local <= 65535:
        raise UserError(f"--local-features {local}: must be between 0 and 65535")
    check_augment(augment, "--augment")
    if shards is not None and not 1 <= shards <= MAX_SHARDS:
        raise UserError(f"--shards {shards}: must be between 1 and {MAX_SHARDS}")
    if augment == "verified" and local == 0:
        raise UserError("--augment verified with --local-features 0: pairs are mined by verifying local features")
    if second_look and (augment == "none" or local == 0):
        raise UserError("--second-look looks again at the photos mining leaves without a sure pair: it needs "
                        "--augment verified and local features")
    if len(args) > 2:
        raise UserError(f"index takes [MODEL] FOLDER, got {len(args)} arguments")
    model, folder = (None, args[0]) if len(args) == 1 else args
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder")
    runtime = _runtime(batch_size, device, compile, precision)
    if local_codec is not None and (model is not None or has_model(out)):
        raise UserError("--local-codec is the model's: give it to `convlad train` (or to a new index without a model)")
    if model is not None:
        model = ConvVLAD.load(model)
    elif not has_model(out):  # an index made before keeps the model it was made with (model None)
        if out.exists() and (not out.is_dir() or any(out.iterdir())) and not is_index(out):
            raise UserError(f"{out}: exists and is not an index; choose another --out (or give a model, to "
                            "convert an index of convlad 0.1)")
        model = _fit_on_sample(folder, batch_size, device, compile, precision, local_codec or "int8")
    with IndexStore.create(out, model=model, root=folder, ann=ann, wait=wait, report=_warn, local=local,
                           augment=augment, runtime=runtime, shards=shards, second_look=second_look) as idx:
        t = time.time()
        if ray is not None:
            from .index.cluster import RayMissing, sync_with_ray

            try:
                s = sync_with_ray(idx, None if ray == "local" else ray, batch_size=batch_size, report=_warn)
            except RayMissing as e:
                raise UserError(str(e)) from None
        else:
            s = sync(idx, commit_every=checkpoint_every, report=_warn)
        info = idx.info()
        aug = f"; augmented over {info['pairs']} verified pairs" if info["augment"] == "verified" else ""
        aug += f"; a second look at {len(idx.looks()[0])} pairs" if info["second_look"] else ""
        typer.echo(f"{out}: {len(idx)} images ({s['added']} added, {s['kept']} unchanged, {s['removed']} removed, "
                   f"{s['skipped']} skipped) in {time.time() - t:.0f}s; search: {info['search']}{aug}")


FIT_SAMPLE = 1000  # photos of a collection a model is fitted on when `index` is given none


def _fit_on_sample(folder: Path, batch_size: int, device, compile: str, precision: str, codec: str = "int8"):
    """A model of the default descriptor fitted on an even sample of the folder's own photos."""
    from .pipeline import Config

    paths = [str(folder / p) for p in list_images(folder)]
    if not paths:
        raise UserError(f"{folder}: no image files found")
    sample = paths[::max(1, len(paths) // FIT_SAMPLE)][:FIT_SAMPLE]
    _warn(f"no model given: fitting the default descriptor on {len(sample)} of the {len(paths)} photos in {folder} "
          f"(vocabulary, PCA-whitening, chance level); it is kept in the index. For a model of your own: convlad train")
    try:
        config = Config(local_codec=codec)
    except ValueError as e:
        raise UserError(f"--local-codec: {e}") from None
    m = _model(config, batch_size, device, compile, precision)
    t = time.time()
    m.fit(sample)
    _check_dim(m)
    _warn(f"fitted {m.describe()} on {m.n_train_} photos in {time.time() - t:.0f}s")
    return m


@app.command()
def search(
    index_file: Path = typer.Argument(..., metavar="INDEX", help="Index from `convlad index`."),
    images: List[Path] = typer.Argument(..., metavar="IMAGE...", help="Query photo(s), or folders of them (each photo in it searched)."),
    k: int = typer.Option(10, "-k", help="Results per query."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    qe: int = QeOpt,
    rerank: Optional[int] = SearchRerankOpt,
    device: Optional[str] = DeviceOpt,
):
    """Rank the indexed photos by similarity to each query photo (ids for `convlad explain --id`)."""
    from .index.store import IndexStore
    from .runtime import Runtime
    from .search import search_images

    idx = IndexStore.open(index_file, runtime=Runtime(device=device))
    settings = _settings(idx, k, rerank, qe, str(index_file))
    queries = []
    for p in images:  # a folder stands for each photo in it
        queries += [str(p / q) for q in list_images(p)] if p.is_dir() else [str(p)]
    if not queries:
        raise UserError(f"{', '.join(map(str, images))}: no photos to search with")
    results, errors = search_images(idx, queries, settings)
    for err in errors:
        _warn(f"skipped {err}")

    def same(a, b):
        try:
            return os.path.samefile(a, b)
        except OSError:  # an indexed file gone since
            return False

    def rows(q, hits):
        return [{**h.to_dict(), "path": idx.path_of(h.id), "query_itself": same(q, idx.path_of(h.id))} for h in hits]

    if as_json:
        typer.echo(json.dumps([{"query": q, "results": rows(q, hits)} for q, hits in results], indent=1))
    else:
        for q, hits in results:
            typer.echo(f"query: {q}")
            typer.echo(f"  {'rank':>4}  {'id':>8}  {'distance':>8}  "
                       + (f"{'inliers':>7}  {'same?':<5}  " if settings.rerank else "") + "path")
            for r in rows(q, hits):
                same_ = {True: "same", False: "alike", None: "-"}[r["same"]]
                typer.echo(f"  {r['rank']:4d}  {r['id']:8d}  {r['distance']:8.4f}  "
                           + (f"{'-' if r['inliers'] is None else r['inliers']:>7}  {same_:<5}  " if settings.rerank else "")
                           + r["path"] + ("   (the query itself)" if r["query_itself"] else ""))
            if settings.rerank:
                typer.echo("  (same: the same object or place, verified as `convlad groups` joins photos; "
                           "alike: similar only)")
    if errors and not results:
        raise UserError(f"no query could be read ({len(errors)} skipped)")


@app.command()
def info(
    index_file: Path = typer.Argument(..., metavar="INDEX", help="Index from `convlad index`."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
):
    """Describe an index: model, images, segments, dead rows, generation, size on disk."""
    from .index.store import IndexStore

    from .runtime import cpu_flags, default_device, resolve_precision

    store = IndexStore.open(index_file)
    d = store.info()
    if store.m.get("model"):  # what encoding with it runs in here: `--precision auto` resolved on this machine
        d["precision"] = f"{resolve_precision(store.model.precision, default_device())} ({store.model.precision} on this machine)"
        d["cpu_flags"] = " ".join(cpu_flags())
    if as_json:
        typer.echo(json.dumps(d, indent=1))
        return
    for key, value in d.items():
        if key == "bytes":
            key, value = "size", f"{value / 1e6:.1f} MB"
        elif key == "local":
            if value is None:
                continue
            coarse = f" (and {value['coarse']} of the smaller scale)" if value.get("coarse") else ""
            key, value = "local features", (f"{value['features']} a photo{coarse}, {value['codec']}, "
                                            f"{value['bytes_per_image']} bytes a photo")
        elif key == "shards":
            if value is None:
                continue
            value = f"{len(value)} (" + ", ".join(f"{s['shard']}: {s['images']} images in {s['segments']} segments"
                                                  for s in value) + ")"
        typer.echo(f"{key}: {value}")


@app.command()
def compact(
    index_file: Path = typer.Argument(..., metavar="INDEX", help="Index from `convlad index`."),
    wait: bool = WaitOpt,
):
    """Merge small segments and drop deleted rows; safe while others search."""
    from .index.store import IndexStore

    t = time.time()
    with IndexStore.open(index_file, write=True, wait=wait) as idx:
        s = idx.compact(progress=True)
        typer.echo(f"{index_file}: {s['segments_before']} → {s['segments_after']} segments, {s['dropped']} dead rows "
                   f"dropped, {len(idx)} images, in {time.time() - t:.1f}s")


@app.command()
def explain(
    index_file: Path = typer.Argument(..., metavar="INDEX", help="Index from `convlad index`."),
    query: Path = typer.Argument(..., metavar="QUERY", help="Query photo."),
    rank: Optional[int] = typer.Option(None, "--rank", help="The result at this rank (1 = first) of `convlad search "
                                       "INDEX QUERY` with the same options."),
    id_: Optional[int] = typer.Option(None, "--id", help="The indexed photo with this id (the id column of `search`)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="PNG to write (default: match.png)."),
    as_json: bool = typer.Option(False, "--json", help="Print the matches as JSON instead of drawing them."),
    qe: int = QeOpt, rerank: Optional[int] = SearchRerankOpt,
):
    """Why a result matched: the spatial verification that ranked it, drawn (give it by --rank or --id)."""
    from .explain import draw_matches, match_in_index
    from .index.store import IndexStore
    from .search import encode, features, rank as rank_of

    if (rank is None) == (id_ is None):
        raise UserError("give the result by --rank N (its place in `convlad search`) or by --id N (its id), one of them")
    if rank is not None and rank < 1:
        raise UserError(f"--rank {rank}: ranks start at 1")
    if not query.is_file():
        raise UserError(f"{query}: no such file")
    idx = IndexStore.open(index_file)
    shown = None
    enc = encode(idx, [str(query)])  # once: the search and the match view verify the same features
    if enc.errors:
        raise UserError(str(enc.errors[0]))
    if rank is not None:
        settings = _settings(idx, rank, rerank, qe, str(index_file))
        (hits,) = rank_of(idx, enc.X, features(enc.local, 1), settings)
        if len(hits) < rank:
            raise UserError(f"{index_file}: {len(hits)} results, no rank {rank}")
        id_, shown = hits[rank - 1].id, hits[rank - 1]
    try:
        result = idx.path_of(id_)
    except KeyError as e:
        raise UserError(str(e).strip("'\"")) from None
    if enc.local is None:
        raise UserError(f"{index_file}: keeps no local features (indexed with --local-features 0): nothing to verify")
    m = match_in_index(idx, enc.local, str(query), id_)
    where = {"id": id_, "path": result,
             **({"rank": shown.rank, "ranked_inliers": shown.inliers, "via": shown.via} if shown else {})}
    if as_json:
        typer.echo(json.dumps({**where, **m.to_dict()}, indent=1))
        return
    out = out or Path("match.png")
    draw_matches(m, str(query), result, out)
    at = f"rank {shown.rank}, " if shown else ""
    via = (f"; ranked through id {shown.via}, which the index's verified pairs join it to (a sure match of the "
           "query, or a photo linked to one)"
           if shown is not None and shown.via is not None else "")
    typer.echo(f"{query} ↔ {result} ({at}id {id_}): {m.n_inliers} inliers of {m.n_matches} tentative matches "
               f"(layer {m.layer} at scale {m.scale:g}, affine){via} → {out}")


@app.command()
def groups(
    index_file: Path = typer.Argument(..., metavar="INDEX", help="Index from `convlad index`."),
    min_size: int = typer.Option(2, "--min-size", help="The smallest group listed (1: every photo, alone or not)."),
    duplicates: bool = typer.Option(False, "--duplicates", help="Only the duplicates (the same photo re-encoded, "
                                    "resized, lightly cropped or stripped) and the photos they duplicate."),
    limit: Optional[int] = typer.Option(None, "--limit", help="The largest N groups only (default: all)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (docs/cli.md gives its schema) instead of a table."),
    csv_out: Optional[Path] = typer.Option(None, "--csv", help="Also write one row per member to this CSV file."),
    sheet: Optional[Path] = typer.Option(None, "--sheet", help="Also draw the largest groups shown (6 at most, 8 "
                                         "photos each) as a contact sheet, to this PNG."),
    weak: Optional[float] = typer.Option(None, "--weak", help="The groups' rule (default: the one chosen by K-fold, "
                                         "docs/defaults.md): weak links from this many times the chance level of "
                                         "inliers (default 1.75; 3 or more: the sure pairs alone, the strictest)."),
    similarity: Optional[float] = typer.Option(None, "--similarity", help="... at a global cosine of this or more "
                                               "(default 0.6)."),
    support: Optional[int] = typer.Option(None, "--support", help="... and this many of them to join two groups "
                                          "(default 2; 1: any one, which lets a chain of weak links merge groups)."),
    look: Optional[int] = typer.Option(None, "--look", help="A photo no link joins joins the photo its second look "
                                       "verified best with, from this many ASIFT inliers (default 15; 0: never; an "
                                       "index made with --second-look keeps them)."),
):
    """Which photos show the same thing: the groups the index's verified pairs join, with the evidence."""
    from .groups import Rule
    from .groups import groups as find_groups
    from .groups import verify as verify_group
    from .index.store import IndexStore

    if min_size < 1:
        raise UserError(f"--min-size {min_size}: must be at least 1")
    if limit is not None and limit < 1:
        raise UserError(f"--limit {limit}: must be at least 1")
    try:
        given = {"weak": weak, "similarity": similarity, "support": support, "look": look}
        rule = Rule(**{k: (None if k == "look" and v == 0 else v) for k, v in given.items() if v is not None})
    except ValueError as e:
        raise UserError(str(e)) from None
    idx = IndexStore.open(index_file)
    if not idx.augments:
        _warn(f"note: {index_file} keeps no verified pairs (indexed with --augment none): every photo is alone")
    # every group's evidence where the CSV lists them all, else only the shown ones' (each verifies)
    found = find_groups(idx, min_size=min_size, duplicates_only=duplicates, evidence=csv_out is not None, rule=rule)
    shown = found[:limit] if limit else found
    for g in shown:
        if csv_out is None and not duplicates:
            verify_group(idx, g)
    if csv_out is not None:
        import csv
        import io

        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["group", "id", "path", "via", "inliers", "similarity", "second_look", "duplicate_of", "representative"])
        for g in found:
            for m in g["members"]:
                w.writerow([g["id"], m["id"], m["path"], "" if m["via"] is None else m["via"],
                            "" if m["inliers"] is None else m["inliers"],
                            "" if m["similarity"] is None else m["similarity"], int(m["second_look"]),
                            "" if m["duplicate_of"] is None else m["duplicate_of"],
                            int(m["id"] == g["representative"])])
        from .storage import write_durable

        write_durable(csv_out, lambda f: f.write(buf.getvalue().encode()))
    if sheet is not None:
        from .groups import contact_sheet

        contact_sheet(shown, sheet)
    if as_json:
        typer.echo(json.dumps({"index": str(index_file), "images": len(idx), "generation": idx.generation,
                               "groups": shown, "total_groups": len(found)}, indent=1))
        return
    grouped = sum(g["size"] for g in found)
    typer.echo(f"{index_file}: {len(found)} groups of {min_size} or more photos ({grouped} of {len(idx)} photos)"
               + (f"; the largest {len(shown)} shown" if len(shown) < len(found) else ""))
    for g in shown:
        typer.echo(f"\ngroup {g['id']}: {g['size']} photos")
        for m in g["members"]:
            dup = "" if m["duplicate_of"] is None else f"; a duplicate of {m['duplicate_of']}"
            if m["via"] is None:
                typer.echo(f"  {m['id']:>7}  {m['path']}  (representative{dup})")
                continue
            inl = "" if m["inliers"] is None else f"{m['inliers']} {'ASIFT inliers at a second look' if m['second_look'] else 'inliers'}, "
            typer.echo(f"  {m['id']:>7}  {m['path']}  (via {m['via']}: {inl}similarity {m['similarity']:.3f}{dup})")
    if csv_out is not None:
        typer.echo(f"\none row per member: {csv_out}")
    if sheet is not None:
        typer.echo(f"contact sheet of the largest groups: {sheet}")


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
    max_active: Optional[int] = typer.Option(None, "--max-active", help="Heavy requests (searches, uploads, match "
                                             "views) at work at once; default: --max-batch."),
    max_queue: int = typer.Option(64, "--max-queue", help="Heavy requests waiting beyond those; more get a 503 with "
                                  "Retry-After at once."),
    compile: str = typer.Option("auto", "--compile", help="torch.compile the network, warmed at start for every "
                                "batch shape (10–60 s, once): auto (on CPU wherever it can be), on, off."),
    precision: str = PrecisionOpt,
    ray: Optional[str] = typer.Option(None, "--ray", help="Serve the index's shards (`index --shards N`) on Ray "
                                      "Serve: 'local' starts Ray here, 'auto' or HOST:PORT joins a cluster whose "
                                      "nodes see the index at the same path; this process is the ingress "
                                      "(pip install 'convlad[ray]')."),
    replicas: int = typer.Option(1, "--replicas", help="With --ray: replicas of each shard, for queries per second."),
    shard_cpus: float = typer.Option(1.0, "--shard-cpus", help="With --ray: CPUs (and threads) of each replica: a "
                                     "node's cores for one replica a node."),
):
    """Serve an index: search API (docs at /docs) and a web page at /."""
    from .index.cluster import RayMissing
    from .serving.ray_shards import ShardFailed
    from .serving.serve import serve as run_server

    if not 0 < port < 65536:
        raise UserError(f"--port {port}: must be from 1 to 65535")
    if max_batch < 1 or batch_window_ms < 0 or max_upload_mb < 1 or body_timeout <= 0 or max_queue < 0 \
            or (max_active is not None and max_active < 1) or replicas < 1 or not shard_cpus > 0:
        raise UserError("--max-batch, --max-active, --max-upload-mb, --body-timeout, --replicas and --shard-cpus must be positive, "
                        "--batch-window-ms and --max-queue ≥ 0")
    try:
        run_server(index_file, host=host, port=port, token=token, cors=[c for c in (cors or "").split(",") if c] or None,
                   window_ms=batch_window_ms, max_batch=max_batch, max_upload_mb=max_upload_mb,
                   body_timeout=body_timeout, max_active=max_active, max_queue=max_queue,
                   compile=_compile(compile), precision=_precision(precision), log=lambda m: typer.echo(m, err=True),
                   ray=ray, replicas=replicas, shard_cpus=shard_cpus)
    except (RayMissing, ShardFailed) as e:
        raise UserError(str(e)) from None


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

# the measuring commands, in the order `convlad --help` lists them
app.command("eval")(cli_study.eval_)
for _command in (cli_study.compare, cli_study.sweep, cli_study.table):
    app.command()(_command)


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


# modules of the optional extras (pyproject.toml), for a one-line error where one is missing
EXTRAS = {"fastapi": "serve", "uvicorn": "serve", "multipart": "serve", "python_multipart": "serve",
          "starlette": "serve", "fastapi_offline": "serve", "ray": "ray", "matplotlib": "plot"}


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
        if isinstance(e, ModuleNotFoundError) and (e.name or "").split(".")[0] in EXTRAS:
            extra = EXTRAS[e.name.split(".")[0]]
            typer.echo(f"error: this command needs the '{extra}' extra, which is not installed (no module "
                       f"{e.name!r}): pip install 'convlad[{extra}]'", err=True)
            sys.exit(2)
        raise
    if rc == 130:  # typer ≥ 0.2x turns ^C into Exit(130), returned in non-standalone mode
        typer.echo(interrupted, err=True)
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
