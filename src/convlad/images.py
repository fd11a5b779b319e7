"""Decoding photos: EXIF orientation, JPEGs decoded at reduced size (libjpeg-turbo), the paper's n×n warp."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import simplejpeg
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}

# Large photos are common in collections; a bad file must fail with a clear reason, never a bomb.
Image.MAX_IMAGE_PIXELS = 250_000_000


class ImageError(ValueError):
    """An image that cannot be used; ``str(err)`` is a one-line ``path: reason`` for the user."""

    def __init__(self, path, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason}")


def scan_images(root: str | os.PathLike, sub: str = "", recurse: bool = True,
                walked_elsewhere: dict | None = None) -> tuple[list[tuple], list[str]]:
    """Walk ``root/sub``: ``([(path relative to root, (dev, inode), (size, mtime_ns)), ...] in walk
    order, [skip notes])``. Links are followed, each folder walked once (link loops, second links);
    hidden files and folders, dangling links and unreadable entries are left out, with a note.
    ``walked_elsewhere``: {(dev, inode): path} of folders another walk covers (a walk split over a
    cluster: the root, the other top-level folders), never entered here."""
    root = Path(root)
    found, notes, seen_dirs = [], [], dict(walked_elsewhere or {})

    def unreadable(err: OSError):
        notes.append(f"{err.filename}: unreadable folder ({err.strerror})")

    for dirpath, dirnames, filenames in os.walk(root / sub, followlinks=True, onerror=unreadable):
        try:
            st = os.stat(dirpath)
        except OSError as e:
            notes.append(f"{dirpath}: unreadable folder ({e.strerror})")
            dirnames[:] = []
            continue
        key = (st.st_dev, st.st_ino)
        if key in seen_dirs:  # reached again through a link: a loop, or the same folder twice
            notes.append(f"{dirpath}: same folder as {seen_dirs[key]} (a link), walked once")
            dirnames[:] = []
            continue
        seen_dirs[key] = dirpath
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")) if recurse else []
        rel = Path(dirpath).relative_to(root)
        for f in sorted(filenames):
            if f.startswith(".") or Path(f).suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            full = os.path.join(dirpath, f)
            try:
                fst = os.stat(full)
            except FileNotFoundError:
                notes.append(f"{full}: broken link (its target {os.path.realpath(full)} does not exist)")
                continue
            except OSError as e:
                notes.append(f"{full}: unreadable ({e.strerror})")
                continue
            found.append(((rel / f).as_posix(), (fst.st_dev, fst.st_ino), (fst.st_size, fst.st_mtime_ns)))
    return found, notes


def merge_scans(scans) -> tuple[dict[str, tuple[int, int]], list[str]]:
    """Scans in walk order → ({path: (size, mtime_ns)} with each file once, by device and inode;
    notes). The first name reached keeps the file."""
    files, notes, seen = {}, [], {}
    for found, scan_notes in scans:
        notes += scan_notes
        for rel, key, stamp in found:
            if key in seen:
                notes.append(f"{rel}: same file as {seen[key]}, indexed once")
                continue
            seen[key] = rel
            files[rel] = stamp
    return files, notes


def list_images(root: str | os.PathLike, skipped: list[str] | None = None) -> list[str]:
    """Image files below ``root``, as sorted paths relative to it (hidden files and folders skipped).

    Links are followed, but every file and folder is reached once: a folder already walked (a link
    loop, a second link to it) and a file already listed (under another name) are passed over.
    Dangling links and unreadable entries are left out; with ``skipped``, a ``path: reason`` line
    for each is appended to it.
    """
    if not Path(root).is_dir():
        raise FileNotFoundError(f"{root}: not a folder")
    files, notes = merge_scans([scan_images(root)])
    if skipped is not None:
        skipped += notes
    return sorted(files)


Box = tuple[float, float, float, float]  # x1, y1, x2, y2 in the stored image's pixels


def load_image(path: str | os.PathLike, min_size: int | None = None, box: Box | None = None) -> Image.Image:
    """Open ``path`` as RGB with EXIF orientation applied.

    ``min_size``: the decoder may shrink a JPEG by 1/2, 1/4 or 1/8 during decoding (``Image.draft``)
    as long as both sides (of ``box``, when given) stay ≥ ``min_size``; decoding an 8-megapixel
    photo at 1/8 is an order of magnitude faster than at full size, and the result is resized to
    n×n anyway.

    ``box``: crop to it first. Coordinates are those of the stored pixels, before EXIF rotation, as
    in the Oxford/Paris ground truth (whose annotation tools ignored the orientation tag).
    """
    try:
        if os.path.getsize(path) == 0:
            raise ImageError(path, "empty file (0 bytes)")
        with Image.open(path) as im:
            w0, h0 = im.size
            if box is not None:
                x1, y1, x2, y2 = (float(v) for v in box)
                x1, y1, x2, y2 = max(0.0, x1), max(0.0, y1), min(float(w0), x2), min(float(h0), y2)
                if x2 - x1 < 1 or y2 - y1 < 1:
                    raise ImageError(path, f"query box {tuple(box)} is empty or outside the {w0}x{h0} image")
            if min_size and im.format == "JPEG":
                bw, bh = (x2 - x1, y2 - y1) if box is not None else (w0, h0)
                scale = max(1, int(min(bw, bh) // min_size))
                # draft picks the largest reduction keeping the size ≥ the one asked for
                im.draft("RGB", (max(1, w0 // scale), max(1, h0 // scale)))
            if im.format == "JPEG":
                decoded = _turbo_decode(path, im)
                im = decoded if decoded is not None else im
            if box is not None:
                rx, ry = im.size[0] / w0, im.size[1] / h0
                im = im.crop((round(x1 * rx), round(y1 * ry), round(x2 * rx), round(y2 * ry)))
            im = ImageOps.exif_transpose(im)
            im = im.convert("RGB")
            im.load()
            return im
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(path, "file not found") from None
    except UnidentifiedImageError:
        raise ImageError(path, "not an image Pillow can read (corrupt, or another file type)") from None
    except Image.DecompressionBombError as e:
        raise ImageError(path, f"image too large ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data
        raise ImageError(path, f"cannot decode image ({e})") from None


def _turbo_decode(path, im: Image.Image) -> Image.Image | None:
    """Decode the JPEG ``im`` (opened, drafted, not loaded) with libjpeg-turbo through simplejpeg.

    Same library and decoder settings as Pillow's, so the same pixels, in one call on the whole
    file: 34 against 39 ms per 8-megapixel photo at 1/8 scale on one core, and decoding is most of
    such a photo's cost. None where Pillow must do it: CMYK, or data libjpeg warns about (Pillow
    then decodes leniently or explains the error).
    """
    if im.mode not in ("RGB", "L"):
        return None
    w, h = im.size  # after draft: the reduced size Pillow chose
    try:
        arr = simplejpeg.decode_jpeg(Path(path).read_bytes(), colorspace="RGB", min_width=w, min_height=h,
                                     fastdct=False, fastupsample=False)
    except ValueError:
        return None
    if arr.shape[:2] != (h, w):  # another M/8 scale than draft's 1/2^k: keep Pillow's pixels
        return None
    decoded = Image.fromarray(arr)
    decoded.info.update(im.info)  # EXIF orientation and the rest of the file's metadata
    return decoded


def warp(im: Image.Image, size: int) -> np.ndarray:
    """Resize to size×size ignoring aspect ratio (the paper's warp); uint8 array (size, size, 3)."""
    if im.size != (size, size):
        im = im.resize((size, size), Image.BILINEAR, reducing_gap=3.0)
    return np.asarray(im, dtype=np.uint8)


def keep_aspect_size(w: int, h: int, size: int, multiple: int = 16) -> tuple[int, int]:
    """(width, height) with the aspect ratio of w×h, area ≈ size², sides multiples of ``multiple``.

    Same pixel budget as the n×n warp, without distorting the scene: a portrait and a landscape
    photo of one place then show it with the same proportions. Rounding to a multiple of the
    network's stride keeps feature-map sizes to a handful, so images still batch together.
    """
    r = (w / h) ** 0.5
    return (max(multiple, int(round(size * r / multiple)) * multiple),
            max(multiple, int(round(size / r / multiple)) * multiple))


def resize(im: Image.Image, size: int, mode: str = "warp") -> np.ndarray:
    """``warp``: size×size as in the paper; ``keep``: aspect ratio kept, area ≈ size²."""
    if mode == "warp":
        return warp(im, size)
    if mode != "keep":
        raise ValueError(f"resize mode must be 'warp' or 'keep', not {mode!r}")
    target = keep_aspect_size(*im.size, size)
    if im.size != target:
        im = im.resize(target, Image.BILINEAR, reducing_gap=3.0)
    return np.asarray(im, dtype=np.uint8)


def load_warped(path, sizes: list[int], mode: str = "warp", box: Box | None = None) -> list[np.ndarray]:
    """Decode once (cropped to ``box`` if given), resize to each of ``sizes``: one uint8 (h, w, 3)
    array per size."""
    im = load_image(path, min_size=max(sizes) if mode == "warp" else int(max(sizes) * 0.75), box=box)
    return [resize(im, s, mode) for s in sizes]
