"""Weights that are not shipped in a wheel: a user file, else the official checkpoint in the torch hub
cache, downloaded (and hash-checked) when online."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .base import WeightsError


def hub_checkpoint_path(url: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def load_official_state_dict(name: str, url: str, weights: str | None = None) -> dict:
    """State dict from ``weights`` if given, else from the hub cache, else downloaded from ``url``.

    torchvision's file names end in the first 8 hex digits of the file's SHA-256; ``check_hash``
    verifies them, so a truncated or tampered download is refused, not loaded.
    """
    if weights:
        path = Path(weights)
        if not path.is_file():
            raise WeightsError(f"{path}: weights file for {name} not found")
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line answer
            raise WeightsError(f"{path}: cannot load {name} weights ({type(e).__name__}: {e})") from None
    cached = hub_checkpoint_path(url)
    if not cached.is_file():
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(cached), hash_prefix=_hash_prefix(url), progress=True)
        except Exception as e:  # noqa: BLE001 - offline, DNS, HTTP or hash errors
            raise WeightsError(
                f"{name}: weights {cached.name} are not in the torch hub cache and could not be downloaded "
                f"({type(e).__name__}); download {url} and put it at {cached}, or pass --weights FILE"
            ) from None
    return torch.load(cached, map_location="cpu", weights_only=True)


def _hash_prefix(url: str) -> str | None:
    stem = Path(url).name.split(".")[0]
    tail = stem.rsplit("-", 1)[-1]
    return tail if len(tail) >= 8 and all(c in "0123456789abcdef" for c in tail) else None
