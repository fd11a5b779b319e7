"""Instance-retrieval benchmarks in their standard layouts, each loaded into one shape: a database,
queries (database images or crops), and each query's positives and junk.

Loaders read what the official archives unpack to; ``download`` fetches them for users who are
online. Protocols, in short:

- INRIA Holidays: ``jpg/`` (or ``jpg_rotated/``, the manually rotated copy); a group is the first 4
  digits of the 6-digit name; the 500 queries are the images whose number is divisible by 100;
  the query is removed from its own ranking.
- Oxford5k / Paris6k: ``jpg/`` + ``gt_files/``; positives good ∪ ok, junk skipped; queries are
  cropped to their box (``full_query=True``: the whole image, as the paper did).
- Revisited Oxford / Paris (``gnd_r*.pkl``): Easy (positives easy; junk junk ∪ hard), Medium
  (easy ∪ hard; junk), Hard (hard; junk ∪ easy); queries cropped; mP@1,5,10.
- UKBench: groups of 4 consecutive images; every image a query; N-S score (top 4, the query
  included) and mAP (the query removed).
- Generic groups (the mvbench layout): ``images/`` + ``groups.json`` (+ ``distractors/``).
"""
from __future__ import annotations

import json
import pickle
import re
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from ..images import list_images


class DatasetError(ValueError):
    """A dataset folder that does not have the expected layout; the message is one line."""


@dataclass
class RetrievalBenchmark:
    """A database of images, the queries, and each query's positives and junk (database indices).

    ``query_items[q]`` is what to extract for query q: a path, or ``(path, box)`` for a cropped
    query. ``query_db[q]`` is the database index whose descriptor *is* the query's (an uncropped
    query that is a database image), or None. Junk is skipped in the ranking and consumes no rank;
    a query that is a database image is junk to itself (removed from its own ranking).
    ``protocols`` holds further (positives, junk) sets by name (revisited Easy/Medium/Hard); the
    main ``positives``/``junk`` are then Medium's.
    """

    name: str
    root: Path
    paths: list[str]
    query_items: list
    positives: list[set[int]]
    junk: list[set[int]]
    query_db: list[int | None]
    groups: list[str] = field(default_factory=list)  # each query's group, for the reports
    protocols: dict[str, tuple[list[set[int]], list[set[int]]]] = field(default_factory=dict)
    kind: str = "groups"

    @property
    def n_queries(self) -> int:
        return len(self.query_items)

    @property
    def queries(self) -> list[int | None]:
        return self.query_db

    def describe(self) -> str:
        return f"{self.name} ({self.kind}): {self.n_queries} queries, {len(self.paths)} database images"


def _group_benchmark(name, root, paths, group_of, kind, queries=None) -> RetrievalBenchmark:
    """The first ``len(group_of)`` paths belong to groups; each query (default: every one of them)
    is removed from its own ranking, and its positives are the rest of its group."""
    members: dict[str, set[int]] = {}
    for i, g in enumerate(group_of):
        members.setdefault(g, set()).add(i)
    queries = list(range(len(group_of))) if queries is None else queries
    return RetrievalBenchmark(name=name, root=root, paths=paths, query_items=[paths[q] for q in queries],
                              positives=[members[group_of[q]] - {q} for q in queries],
                              junk=[{q} for q in queries], query_db=queries,
                              groups=[group_of[q] for q in queries], kind=kind)


def load_groups(root) -> RetrievalBenchmark:
    """The mvbench layout: ``images/`` + ``groups.json`` (+ ``distractors/`` + ``distractors.json``).

    Every group image is a query in turn; positives are the other images of its group.
    """
    root = Path(root)
    groups_file = root / "groups.json"
    if not groups_file.is_file():
        raise DatasetError(f"{groups_file}: missing (a groups dataset needs images/ and groups.json)")
    try:
        groups = json.loads(groups_file.read_text())
    except json.JSONDecodeError as e:
        raise DatasetError(f"{groups_file}: not valid JSON ({e})") from None
    paths, group_of = [], []
    for g, files in groups.items():
        for f in files:
            paths.append(str(root / "images" / f))
            group_of.append(g)
    distractors_file = root / "distractors.json"
    if distractors_file.is_file():
        paths += [str(root / "distractors" / f) for f in json.loads(distractors_file.read_text())]
    return _group_benchmark(root.name, root, paths, group_of, "groups")


def load_holidays(root, rotated: bool = False) -> RetrievalBenchmark:
    """INRIA Holidays: 1491 images in 500 groups; a query is an image whose number is divisible by 100."""
    root = Path(root)
    folder = next((d for d in ([root / "jpg_rotated"] if rotated else [root / "jpg", root])
                   if d.is_dir() and any(_HOLIDAYS_NAME.fullmatch(Path(f).stem) for f in list_images(d))), None)
    if folder is None:
        raise DatasetError(f"{root}: no Holidays images ({'jpg_rotated/' if rotated else 'jpg/'} with files "
                           "named like 100000.jpg)")
    names = sorted(f for f in list_images(folder) if _HOLIDAYS_NAME.fullmatch(Path(f).stem))
    paths = [str(folder / f) for f in names]
    stems = [Path(f).stem for f in names]
    queries = [i for i, s in enumerate(stems) if int(s) % 100 == 0]
    return _group_benchmark("holidays", root, paths, [s[:4] for s in stems], "holidays", queries)


_HOLIDAYS_NAME = re.compile(r"\d{6}")
_UKBENCH_NAME = re.compile(r"ukbench(\d{5})")


def load_ukbench(root) -> RetrievalBenchmark:
    """UKBench: ``ukbenchNNNNN.jpg`` at any depth (the archive's ``full/``); image i shows object i // 4."""
    root = Path(root)
    found: dict[str, str] = {}
    for f in list_images(root):
        m = _UKBENCH_NAME.fullmatch(Path(f).stem)
        if m and (m.group(1) not in found or "full" in Path(f).parts):
            found[m.group(1)] = f
    if not found:
        raise DatasetError(f"{root}: no UKBench images (files named like ukbench00000.jpg)")
    numbers = sorted(found)
    group_of = [f"{int(n) // 4:04d}" for n in numbers]
    return _group_benchmark("ukbench", root, [str(root / found[n]) for n in numbers], group_of, "ukbench")


def _gt_folder(root: Path) -> Path:
    for d in (root / "gt_files", root / "gt", root / "lab", root):
        if d.is_dir() and any(d.glob("*_query.txt")):
            return d
    raise DatasetError(f"{root}: no ground-truth files (gt_files/<name>_<n>_query.txt)")


def _image_folder(root: Path) -> Path:
    d = root / "jpg"
    if not d.is_dir():
        raise DatasetError(f"{root}: missing jpg/ (the dataset's images)")
    return d


def _read_names(path: Path) -> list[str]:
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def load_oxford_paris(root, name: str | None = None, full_query: bool = False) -> RetrievalBenchmark:
    """Oxford5k / Paris6k with the original ground truth: ``jpg/`` (any depth) + ``gt_files/``.

    Each ``<landmark>_<n>_query.txt`` holds ``<image> x1 y1 x2 y2`` (Oxford prefixes the image
    name with ``oxc1_``). Positives: good ∪ ok; junk: skipped. Queries are searched against the
    whole database, their own image included, as the official protocol does.
    """
    root = Path(root)
    gt, folder = _gt_folder(root), _image_folder(root)
    paths = {Path(f).stem: str(folder / f) for f in list_images(folder)}
    stems = sorted(paths)
    index = {s: i for i, s in enumerate(stems)}
    db = [paths[s] for s in stems]

    def ids(names, what):
        missing = [n for n in names if n not in index]
        if missing:
            raise DatasetError(f"{what}: {len(missing)} image(s) not found in {folder}, e.g. {missing[0]}")
        return {index[n] for n in names}

    items, positives, junk, query_db, groups = [], [], [], [], []
    for qfile in sorted(gt.glob("*_query.txt")):
        qname = qfile.name[: -len("_query.txt")]
        fields = qfile.read_text().split()
        if len(fields) != 5:
            raise DatasetError(f"{qfile}: expected '<image> x1 y1 x2 y2', got {' '.join(fields)!r}")
        image = fields[0][len("oxc1_"):] if fields[0].startswith("oxc1_") else fields[0]
        (q,) = ids([image], qfile)
        box = tuple(float(v) for v in fields[1:])
        items.append(paths[image] if full_query else (paths[image], box))
        query_db.append(q if full_query else None)
        positives.append(ids(_read_names(gt / f"{qname}_good.txt") + _read_names(gt / f"{qname}_ok.txt"), qfile))
        junk.append(ids(_read_names(gt / f"{qname}_junk.txt"), qfile))
        groups.append(qname.rsplit("_", 1)[0])
    name = name or ("oxford5k" if stems and stems[0][0].isalpha() and "paris" not in stems[0] else "paris6k")
    return RetrievalBenchmark(name=name, root=root, paths=db, query_items=items, positives=positives, junk=junk,
                              query_db=query_db, groups=groups, kind="oxford-paris")


class _GroundTruthUnpickler(pickle.Unpickler):
    """The revisited ground truth is a pickle; load it without letting it run anything but
    containers and numpy arrays."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("builtins", "set"), ("builtins", "frozenset")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (not part of a ground-truth file)")


def load_revisited(root, name: str | None = None, full_query: bool = False) -> RetrievalBenchmark:
    """Revisited Oxford / Paris (Radenović et al. 2018): ``jpg/`` + ``gnd_roxford5k.pkl`` or
    ``gnd_rparis6k.pkl``. Main protocol Medium; ``protocols`` holds Easy, Medium and Hard."""
    root = Path(root)
    candidates = sorted(root.glob("gnd_r*.pkl"))
    if name:
        candidates = [p for p in candidates if p.stem == f"gnd_{name}"]
    if not candidates:
        raise DatasetError(f"{root}: no revisited ground truth (gnd_roxford5k.pkl or gnd_rparis6k.pkl)")
    gnd_file = candidates[0]
    try:
        with open(gnd_file, "rb") as f:
            cfg = _GroundTruthUnpickler(f, encoding="latin1").load()
        imlist, qimlist, gnd = list(cfg["imlist"]), list(cfg["qimlist"]), list(cfg["gnd"])
    except (pickle.UnpicklingError, KeyError, TypeError, EOFError, ValueError) as e:
        raise DatasetError(f"{gnd_file}: not a revisited ground-truth file ({e})") from None
    folder = _image_folder(root)
    found = {Path(f).stem: str(folder / f) for f in list_images(folder)}
    missing = [n for n in imlist + qimlist if n not in found]
    if missing:
        raise DatasetError(f"{gnd_file}: {len(missing)} image(s) not found in {folder}, e.g. {missing[0]}")
    db = [found[n] for n in imlist]
    db_index = {n: i for i, n in enumerate(imlist)}
    sets = {k: [{int(i) for i in g.get(k, [])} for g in gnd] for k in ("easy", "hard", "junk")}
    e, h, j = sets["easy"], sets["hard"], sets["junk"]
    protocols = {"E": (e, [jq | hq for jq, hq in zip(j, h)]),
                 "M": ([eq | hq for eq, hq in zip(e, h)], j),
                 "H": (h, [jq | eq for jq, eq in zip(j, e)])}
    items, query_db = [], []
    for qname, g in zip(qimlist, gnd):
        box = tuple(float(v) for v in g["bbx"]) if "bbx" in g and g["bbx"] is not None else None
        if full_query or box is None:
            items.append(found[qname])
            query_db.append(db_index.get(qname))
        else:
            items.append((found[qname], box))
            query_db.append(None)
    pos_m, junk_m = protocols["M"]
    return RetrievalBenchmark(name=gnd_file.stem[len("gnd_"):], root=root, paths=db, query_items=items,
                              positives=pos_m, junk=junk_m, query_db=query_db, groups=list(qimlist),
                              protocols=protocols, kind="revisited")


LOADERS = {
    "groups": load_groups,
    "holidays": load_holidays,
    "oxford-paris": load_oxford_paris,
    "revisited": load_revisited,
    "ukbench": load_ukbench,
}


def detect_kind(root) -> str:
    """Which loader reads ``root``, from the files it holds."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder")
    if (root / "groups.json").is_file():
        return "groups"
    if any(root.glob("gnd_r*.pkl")):
        return "revisited"
    if any(d.is_dir() and any(d.glob("*_query.txt")) for d in (root / "gt_files", root / "gt", root / "lab", root)):
        return "oxford-paris"
    if any(_UKBENCH_NAME.fullmatch(p.stem) for p in root.rglob("ukbench*")):
        return "ukbench"
    for d in (root / "jpg", root / "jpg_rotated", root):
        if d.is_dir() and any(_HOLIDAYS_NAME.fullmatch(p.stem) for p in d.iterdir()):
            return "holidays"
    raise DatasetError(f"{root}: layout not recognised (expected groups.json, gnd_r*.pkl, gt_files/, "
                       "ukbench*.jpg or Holidays' jpg/)")


def open_dataset(root, kind: str | None = None, **kw) -> RetrievalBenchmark:
    """Load the benchmark at ``root`` with the loader ``kind`` (detected when None)."""
    kind = kind or detect_kind(root)
    if kind not in LOADERS:
        raise DatasetError(f"unknown dataset kind {kind!r}; choose from: {', '.join(LOADERS)}")
    kw = {k: v for k, v in kw.items() if v is not None and (k != "full_query" or kind in ("oxford-paris", "revisited"))}
    return LOADERS[kind](root, **kw)


def training_paths(spec) -> tuple[list[str], str]:
    """Images to learn vocabularies and PCA from, and a label saying where they came from.

    ``spec``: a folder of images (its ``images/`` subfolder if it has one), or a benchmark folder
    (Oxford, Paris, Holidays, ...) whose database images are used, the convention for Oxford
    evaluated with parameters learned on Paris and vice versa.
    """
    root = Path(spec)
    try:
        kind = detect_kind(root)
    except DatasetError:
        kind = None
    if kind is not None and kind != "groups":
        bench = open_dataset(root, kind)
        return list(bench.paths), f"{bench.name} database ({root})"
    folder = root / "images" if (root / "images").is_dir() else root
    paths = [str(folder / p) for p in list_images(folder)]
    if not paths:
        raise DatasetError(f"{root}: no training images")
    return paths, str(folder)


# -- downloads -----------------------------------------------------------------------------------
_VGG = "https://www.robots.ox.ac.uk/~vgg/data"
_REVISITOP = "http://cmp.felk.cvut.cz/revisitop/data/datasets"
DOWNLOADS: dict[str, list[tuple[str, str]]] = {
    # (url, where its contents go, relative to --root/NAME)
    "holidays": [("ftp://ftp.inrialpes.fr/pub/lear/douze/data/jpg1.tar.gz", "."),
                 ("ftp://ftp.inrialpes.fr/pub/lear/douze/data/jpg2.tar.gz", ".")],
    "oxford5k": [(f"{_VGG}/oxbuildings/oxbuild_images-v1.tgz", "jpg"),
                 (f"{_VGG}/oxbuildings/gt_files_170407.tgz", "gt_files")],
    "paris6k": [(f"{_VGG}/parisbuildings/paris_1-v1.tgz", "jpg"),
                (f"{_VGG}/parisbuildings/paris_2-v1.tgz", "jpg"),
                (f"{_VGG}/parisbuildings/paris_120310.tgz", "gt_files")],
    "roxford5k": [(f"{_VGG}/oxbuildings/oxbuild_images-v1.tgz", "jpg"),
                  (f"{_REVISITOP}/roxford5k/gnd_roxford5k.pkl", ".")],
    "rparis6k": [(f"{_VGG}/parisbuildings/paris_1-v1.tgz", "jpg"),
                 (f"{_VGG}/parisbuildings/paris_2-v1.tgz", "jpg"),
                 (f"{_REVISITOP}/rparis6k/gnd_rparis6k.pkl", ".")],
    "ukbench": [("https://archive.org/download/ukbench/ukbench.zip", ".")],
}


def _fetch(url: str, dest: Path, progress: bool = True) -> None:
    """Download ``url`` to ``dest`` through a temporary file, so a broken transfer leaves nothing."""
    from .. import progress as P

    tmp = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0) or None
            with P.bar(total, dest.name, "B", enabled=progress, unit_scale=True) as bar:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        tmp.unlink(missing_ok=True)
        reason = getattr(e, "reason", e)
        raise DatasetError(f"{url}: download failed ({reason}); are you online?") from None
    tmp.replace(dest)


def _unpack(archive: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    if archive.suffix == ".pkl":
        shutil.copyfile(archive, target / archive.name)
    elif archive.suffix == ".zip":
        with zipfile.ZipFile(archive) as z:
            z.extractall(target)  # zipfile strips absolute paths and '..' itself
    else:
        with tarfile.open(archive) as t:
            t.extractall(target, filter="data")  # refuses links and paths leaving target
    # archives that wrap everything in sub-folders (paris/defense/*.jpg): images are found at any depth


def download(name: str, root, progress: bool = True) -> Path:
    """Fetch the official archives of ``name`` into ``root/name`` and unpack them in the layout
    the loaders read. Files already unpacked are not fetched again."""
    if name not in DOWNLOADS:
        raise DatasetError(f"unknown dataset {name!r}; choose from: {', '.join(DOWNLOADS)}")
    out = Path(root) / name
    out.mkdir(parents=True, exist_ok=True)
    for url, sub in DOWNLOADS[name]:
        done = out / f".{Path(url).name}.done"
        if done.exists():
            continue
        with tempfile.TemporaryDirectory(dir=out) as tmp:
            archive = Path(tmp) / Path(url).name
            _fetch(url, archive, progress)
            _unpack(archive, out / sub)
        done.touch()
    return out
