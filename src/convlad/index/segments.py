"""The files of an index store: immutable segments, an atomically replaced manifest, a writer lock.

The one module that names the files inside an index folder:

    INDEX/MANIFEST        generation, segments, tombstones, IVF-PQ, model fingerprint (JSON, replaced by rename)
    INDEX/LOCK            flock of the single writer, naming it
    INDEX/model.npz       the model that made the descriptors (so searching needs nothing else)
    INDEX/seg-*/          X.npy (n, d) float32 · ids.npy · stamps.npy · offsets.npy + paths.bin ·
                          x-NAME.npy per-row extras (x-local-codes, x-local-cells, x-local-count,
                          or with a compact local codec x-local-quantised, x-local-cellmap,
                          x-local-grid, x-local-count: local_codec.py;
                          x-partners: the ids each photo verified with when it was added, -1 padded;
                          x-candidates, x-candidate-inliers: the nearest it was verified against then,
                          -1 padded, and their inliers, -1 where not verified: the groups' evidence;
                          x-looks, x-look-inliers: where the store looks again, the nearest a photo
                          added without a sure pair was looked at against with ASIFT, and the inliers)
    INDEX/ivf-*/          trained.faiss (an empty trained IVF-PQ) and SEGMENT.npy, its codes per segment
    INDEX/dead-*.npy      ids deleted since their segment was written (tombstones)
    INDEX/tmp-*           a write under way (``storage.write_durable``, ``write_segment``): garbage once
                          its writer is gone
    INDEX/uploads/        photos added through ``convlad serve``, under server-chosen names

Durability follows the usual recipe: every file is written under a temporary name, fsynced, renamed
into place, and the directory fsynced, so after a crash a name either holds a whole file or does not
exist. Nothing here knows about images or models; ``store.py`` builds the index on top.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import signal
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..storage import FileFormatError, check_header, create_file, fsync_dir, write_durable
from ..verify import pad_join

MANIFEST = "MANIFEST"
LOCK = "LOCK"
MODEL = "model.npz"
UPLOADS = "uploads"
TRAINED = "trained.faiss"
PARTNERS = "partners"  # the per-row extra of a store that augments (x-partners.npy)
CANDIDATES, CANDIDATE_INLIERS = "candidates", "candidate-inliers"  # ... and all it verified (since 2026-12)
LOOKS, LOOK_INLIERS = "looks", "look-inliers"  # ... and a second look's, where the store looks again (since 2026-12)
FILL = {PARTNERS: -1, CANDIDATES: -1, CANDIDATE_INLIERS: -1, LOOKS: -1, LOOK_INLIERS: -1}  # a merged segment's rows without an extra, where not 0
FORMAT = "convlad-store"
FORMAT_VERSION = 1
# names the writer may delete when no manifest refers to them (never anything else in the folder)
GARBAGE_PREFIXES = ("seg-", "ivf-", "dead-", "tmp-")


class StoreLocked(FileFormatError):
    """Another process holds the writer lock."""


# -- fault injection ----------------------------------------------------------------------------
# CONVLAD_CRASH_AT=NAME[:N] kills the process with SIGKILL the N-th time (default 1st) it reaches
# the crash point NAME: the fault-injection tests use it to stop a writer at exact moments (inside a
# segment write, between a manifest's write and its rename, inside a compaction).
_crash_spec = os.environ.get("CONVLAD_CRASH_AT", "")
_crash_hits: dict[str, int] = {}


def crash_point(name: str) -> None:
    if not _crash_spec:
        return
    want, _, nth = _crash_spec.partition(":")
    if want == name:
        _crash_hits[name] = _crash_hits.get(name, 0) + 1
        if _crash_hits[name] == int(nth or 1):
            os.kill(os.getpid(), signal.SIGKILL)


# -- durable files ------------------------------------------------------------------------------
def save_npy(f, a: np.ndarray) -> None:
    np.lib.format.write_array(f, np.ascontiguousarray(a), allow_pickle=False)


# -- segments -----------------------------------------------------------------------------------
@dataclass
class Segment:
    """One immutable segment, memory-mapped: descriptors, store ids, file stamps and paths."""

    name: str
    X: np.ndarray  # (n, d) float32
    ids: np.ndarray  # (n,) int64, increasing
    stamps: np.ndarray  # (n, 2) int64: size, mtime_ns (0, 0 when not a file of the indexed folder)
    offsets: np.ndarray  # (n + 1,) int64 into blob
    blob: np.ndarray  # uint8, the UTF-8 paths end to end
    fd: int = -1  # X.npy opened for pread, when memory-mapped from disk
    # further per-row arrays (n, ...) by name, from files x-NAME.npy (the store keeps each image's
    # local features for re-ranking there); a segment without them has none
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    def __del__(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def rows(self, idx: np.ndarray) -> np.ndarray:
        """The descriptors of rows ``idx`` (sorted). A few rows, as a search's shortlist needs, are
        read with pread: through the memory map, the kernel's read-around would map ~128 kB around
        each row into this process, and at 10M images a reader's resident memory grew by hundreds
        of MB of descriptors it never used."""
        if self.fd < 0 or len(idx) > 4096:
            return np.asarray(self.X[idx], dtype=np.float32)
        d = self.X.shape[1]
        out = np.empty((len(idx), d), np.float32)
        buf = out.view(np.uint8).reshape(len(idx), 4 * d)
        base = self.X.offset
        for j, r in enumerate(idx.tolist()):
            os.preadv(self.fd, [buf[j]], base + r * 4 * d)
        return out

    def path(self, row: int) -> str:
        return bytes(self.blob[self.offsets[row]:self.offsets[row + 1]]).decode("utf-8", "surrogateescape")

    def paths(self) -> list[str]:
        raw = bytes(self.blob)
        o = self.offsets.tolist()
        return [raw[o[i]:o[i + 1]].decode("utf-8", "surrogateescape") for i in range(len(self))]


def _load(path: Path) -> np.ndarray:
    return np.load(path, mmap_mode="r", allow_pickle=False)


def read_segment(folder: Path, name: str) -> Segment:
    d = folder / name
    try:
        blob = d / "paths.bin"
        # np.memmap refuses an empty file; small ones are simply read
        paths = np.fromfile(blob, np.uint8) if blob.stat().st_size < 1 << 20 else np.memmap(blob, np.uint8, "r")
        X = _load(d / "X.npy")
        seg = Segment(name, X, _load(d / "ids.npy"), _load(d / "stamps.npy"), _load(d / "offsets.npy"), paths,
                      os.open(d / "X.npy", os.O_RDONLY) if isinstance(X, np.memmap) and X.dtype == np.float32
                      and X.flags.c_contiguous else -1)
    except FileNotFoundError:
        raise
    except (ValueError, OSError) as e:
        raise FileFormatError(f"{d}: damaged segment ({e})") from None
    try:
        seg.extra = {f.name[2:-4]: _load(f) for f in sorted(d.glob("x-*.npy"))}
    except (ValueError, OSError) as e:
        raise FileFormatError(f"{d}: damaged segment ({e})") from None
    n = len(seg.ids)
    if seg.X.shape[0] != n or seg.stamps.shape != (n, 2) or len(seg.offsets) != n + 1 or seg.offsets[-1] != len(seg.blob) \
            or any(len(a) != n for a in seg.extra.values()):
        raise FileFormatError(f"{d}: damaged segment (arrays of different lengths)")
    return seg


def write_segment(folder: Path, X: np.ndarray, ids: np.ndarray, stamps: np.ndarray, paths: list[str],
                  extra: dict[str, np.ndarray] | None = None) -> str:
    """Write a new segment and return its name. It is complete on disk, or absent, whatever happens.
    ``extra``: further per-row arrays by name (see ``Segment.extra``)."""
    name = f"seg-{uuid.uuid4().hex[:16]}"
    tmp = folder / f"tmp-{name}"
    tmp.mkdir()
    encoded = [p.encode("utf-8", "surrogateescape") for p in paths]
    offsets = np.zeros(len(encoded) + 1, np.int64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    files = {"X.npy": lambda f: save_npy(f, X.astype(np.float32, copy=False)),
             "ids.npy": lambda f: save_npy(f, ids.astype(np.int64, copy=False)),
             "stamps.npy": lambda f: save_npy(f, stamps.astype(np.int64, copy=False).reshape(-1, 2)),
             "offsets.npy": lambda f: save_npy(f, offsets),
             "paths.bin": lambda f: f.write(b"".join(encoded))}
    for key, a in (extra or {}).items():
        if len(a) != len(X):
            raise ValueError(f"extra array {key!r} has {len(a)} rows for {len(X)} descriptors")
        files[f"x-{key}.npy"] = lambda f, a=a: save_npy(f, a)
    for i, (fname, write) in enumerate(files.items()):
        with create_file(tmp / fname) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if i == 1:
            crash_point("segment-write")
    fsync_dir(tmp)
    os.rename(tmp, folder / name)
    fsync_dir(folder)
    crash_point("segment-renamed")
    return name


def merged_extras(segs: list, rows: list[np.ndarray], order: np.ndarray) -> dict[str, np.ndarray] | None:
    """The per-row extra arrays of merged segments, in the merged order; rows of a segment without
    an array that others have get zeros (for local features: a count of 0, nothing to verify), or
    their ``FILL`` (for partners: -1, none)."""
    like = {}
    for seg in segs:
        for key, a in seg.extra.items():
            like.setdefault(key, a)
    if not like:
        return None
    out = {}
    for key, a in like.items():
        parts = [np.asarray(seg.extra[key][r]) if key in seg.extra else np.full((len(r), *a.shape[1:]), FILL.get(key, 0),
                                                                                  a.dtype) for seg, r in zip(segs, rows)]
        # a compact layout's cell map may be narrower in one segment than in another: padded with
        # FILL (zero bits, no cell), as is any per-row array whose rows differ in width
        out[key] = pad_join(parts, FILL.get(key, 0))[order]
    return out


# -- manifest -----------------------------------------------------------------------------------
def is_index(folder: Path) -> bool:
    """Whether ``folder`` is an index (it has a manifest)."""
    return (Path(folder) / MANIFEST).exists()


def has_model(folder: Path) -> bool:
    """Whether ``folder`` is an index that keeps the model it encodes with."""
    return (Path(folder) / MODEL).is_file()


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    try:
        m = json.loads(path.read_text())
    except FileNotFoundError:
        if (folder / LOCK).exists():
            raise FileFormatError(f"{folder}: an index whose creation was interrupted (no {MANIFEST} yet); "
                                  f"run `convlad index` again") from None
        raise FileFormatError(f"{folder}: not an index (no {MANIFEST}; create it with `convlad index`)") from None
    except (OSError, ValueError) as e:
        raise FileFormatError(f"{path}: unreadable manifest ({e})") from None
    check_header(path, m, FORMAT, FORMAT_VERSION, "manifest")
    return m


def write_manifest(folder: Path, m: dict) -> None:
    """The commit point: the new manifest replaces the old in one rename."""
    data = json.dumps(m, indent=1).encode()
    write_durable(folder / MANIFEST, lambda f: f.write(data), before_rename=lambda: crash_point("manifest-write"),
                  after_rename=lambda: crash_point("manifest-renamed"))


def referenced(m: dict) -> set[str]:
    names = {s["name"] for s in m["segments"]}
    if m.get("tombstones"):
        names.add(m["tombstones"])
    if m.get("ivf"):
        names.add(m["ivf"]["dir"])
    return names


def collect_garbage(folder: Path, m: dict) -> int:
    """Delete what no manifest refers to: unfinished writes, segments merged away, old IVF codes.
    Only the writer calls it; a reader that still maps a deleted file keeps reading it (POSIX)."""
    import shutil

    keep, removed = referenced(m), 0
    for entry in folder.iterdir():
        if entry.name.startswith(GARBAGE_PREFIXES) and entry.name not in keep:
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink(missing_ok=True)
            removed += 1
    if m.get("ivf"):
        live = {f"{s['name']}.npy" for s in m["segments"]} | {TRAINED}
        for entry in (folder / m["ivf"]["dir"]).iterdir():
            if entry.name not in live:
                entry.unlink(missing_ok=True)
                removed += 1
    return removed


# -- names --------------------------------------------------------------------------------------
def new_tombstones_name() -> str:
    return f"dead-{os.urandom(8).hex()}.npy"


def new_ivf_dir() -> str:
    return f"ivf-{os.urandom(8).hex()}"


def codes_file(folder: Path, ivf_dir: str, segment: str) -> Path:
    """The IVF-PQ codes of one segment."""
    return folder / ivf_dir / f"{segment}.npy"


def trained_file(folder: Path, ivf_dir: str) -> Path:
    return folder / ivf_dir / TRAINED


def new_upload_name(ext: str) -> str:
    """A server-chosen name for an uploaded photo (never the client's)."""
    return f"{uuid.uuid4().hex[:16]}{ext}"


def is_upload_file(name: str) -> bool:
    """An upload's name, or the temporary name of one being written (``storage.write_durable``)."""
    return re.fullmatch(r"(tmp-[0-9a-f]{12}-)?[0-9a-f]{16}\.\w+", name) is not None


# -- the writer lock ----------------------------------------------------------------------------
class WriterLock:
    """flock on ``LOCK``: one writer at a time, released by the kernel when the process dies."""

    def __init__(self, folder: Path, wait: bool = False):
        self.path = folder / LOCK
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError as e:
            holder = ""
            try:
                holder = self.path.read_text().strip()
            except OSError:
                pass
            os.close(self.fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise StoreLocked(f"{folder}: another writer holds the index ({holder or 'unknown process'}); "
                                  f"try again when it ends, or pass --wait") from None
            raise
        os.ftruncate(self.fd, 0)
        cmd = " ".join(Path(a).name if i == 0 else a for i, a in enumerate(sys.argv))[:200]
        os.write(self.fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                          f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {cmd}\n".encode())

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None
