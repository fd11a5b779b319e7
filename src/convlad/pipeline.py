"""The whole method as one estimator: backbone → local features → VLAD per (layer, scale) →
concatenation → PCA-whitening. ``fit`` on training images, ``transform`` images into descriptors."""
from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch

from . import functional as Fn
from . import progress as P
from .backbones import DEFAULT_BACKBONE, get_backbone
from .encoding import PCAWhitening, VLAD
from .extract import Batch, FeatureExtractor, iter_batches
from .local_codec import LocalCodec, check as check_codec
from .runtime import Runtime, want_compile
from .storage import atomic_savez, load_npz
from .verify import COARSE_LOCAL, LOCAL_K, LocalCodes, Verifier, chance_level, select

WHITENING_IMAGES = 200  # training photos (of the chance level's) that a synthetic view is made of

FORMAT = "convlad-model"
FORMAT_VERSION = 1


@dataclass
class Config:
    backbone: str = DEFAULT_BACKBONE
    layers: list[str] | None = None  # VLAD-encoded layers; None: the backbone's default
    pooled: list[str] | None = None  # mean-pooled layers (global descriptors); None: the backbone's default
    gem: float = 1.0  # the pooled layers' power: 1 is the mean (sum-pooling), 3 GeM (Radenović et al. 2018)
    scales: list[float] = field(default_factory=lambda: [1.0, 2.0])
    resize: str = "warp"  # "warp": n×n as in the paper; "keep": aspect ratio kept, area n²
    k: int = 100
    power: float | None = 0.5  # signed square root of the residual sums, before intra-normalisation
    intra: bool = True
    residual_norm: bool = False
    dim: int | None = 128  # None: no PCA-whitening, the uncompressed VLAD
    whiten_power: float = 0.5
    shrinkage: float = 0.0
    weights: str | None = None  # a weights file for the backbone (VGG16, GoogLeNet, custom)
    seed: int = 0
    local_codec: str = "int8"  # how an index stores the local features (local_codec.py): int8, rqM, pqM
    local_whitening: bool = True  # learn a whitening of the local features the verifier matches (local_whitening.py)
    # the smaller scale's strongest features an index keeps a photo, beside the larger scale's: those
    # that a photo added later verifies against, so that it joins a nearer view given before it
    # (Verifier.inliers_from; docs/defaults.md, "Cross-scale mining"). 0: none kept
    coarse_local: int = COARSE_LOCAL


# Config fields added after models were first saved, with the value those models imply
_LATER_FIELDS = {"gem": 1.0, "local_codec": "int8", "local_whitening": False, "coarse_local": 0}


@dataclass
class Encoded:
    """What encoding a list of images gives: the positions of the readable ones (``indices``, in
    input order), their descriptors ``X`` (n, dim) float32, the ``errors`` (``ImageError`` each) and,
    when asked for, their local features (``local``, ``verify.LocalCodes``; else None). It unpacks
    as ``indices, X, errors``."""

    indices: list[int]
    X: np.ndarray
    errors: list
    local: LocalCodes | None = None

    def __iter__(self):
        return iter((self.indices, self.X, self.errors))

    def __len__(self) -> int:
        return len(self.indices)

    @staticmethod
    def concat(parts: list["Encoded"], dim: int, local: int = 0, local_dim: int = 0) -> "Encoded":
        """Batches joined and put in input order (sub-batches by shape may come out of it); ``dim``,
        ``local`` and ``local_dim`` shape the result when there is nothing to join."""
        ok = [i for p in parts for i in p.indices]
        order = np.argsort(ok, kind="stable")
        X = np.concatenate([p.X for p in parts]) if parts else np.zeros((0, dim), np.float32)
        codes = None
        if local:
            have = [p.local for p in parts if len(p)]
            codes = (LocalCodes.concat(have) if have else LocalCodes.empty(local, local_dim))[order]
        return Encoded([ok[i] for i in order], X[order], [e for p in parts for e in p.errors], codes)


def _key(layer: str, scale: float) -> str:
    return f"{layer}@{scale:g}"


def _pool(f: torch.Tensor, p: float = 1.0) -> torch.Tensor:
    """(B, N, d) L2-normalised local descriptors → (B, d) L2-normalised mean, or generalised mean of
    power ``p`` (GeM, which like cirtorch's clamps at 1e-6: it is meant for maps after a ReLU)."""
    f = f.float()
    if p == 1:
        return Fn.l2n(f.mean(1))
    return Fn.l2n(f.clamp(min=1e-6).pow(p).mean(1).pow(1.0 / p))


class ConvVLAD:
    """The retrieval descriptor of the paper and beyond.

    For each scale, the VLAD of every layer in ``layers`` and the mean of the local descriptors of
    every layer in ``pooled`` (sum-pooling, Babenko & Lempitsky 2015: a global summary from a deep
    layer, which compresses far better than a VLAD) are L2-normalised, concatenated with equal
    weight, then PCA-whitened to ``dim``. ``pooled=[]`` gives the paper's pure VLAD.

    >>> model = ConvVLAD(layers=["block6"], pooled=["block15"], scales=[1, 2], dim=128).fit(train_paths)
    >>> ok, X, errors = model.transform(paths)   # X: (len(ok), 128) float32, rows L2-normalised
    """

    def __init__(self, config: Config | None = None, runtime: Runtime | None = None, **kw):
        if config is not None and kw:
            raise TypeError("give either a Config or keyword arguments, not both")
        self.config = config or Config(**kw)
        check_codec(self.config.local_codec)
        if not isinstance(self.config.coarse_local, int) or self.config.coarse_local < 0:
            raise ValueError(f"coarse_local {self.config.coarse_local!r}: a number of features, 0 or more")
        self._backbone = None
        self._extractor = None
        # where and how the network runs (device, batch size, workers, compile, precision): passed
        # in, never set on a fitted model (``with_runtime`` gives the same model run otherwise)
        self.runtime = runtime or Runtime()

    # the runtime's options, read where the model runs
    batch_size = property(lambda self: self.runtime.batch_size)
    workers = property(lambda self: self.runtime.workers)
    device = property(lambda self: self.runtime.device)
    compile = property(lambda self: self.runtime.compile)
    precision = property(lambda self: self.runtime.precision)

    def with_runtime(self, runtime: Runtime | None = None, **changes) -> "ConvVLAD":
        """This fitted model run under another ``Runtime`` (``runtime``, or this one's with
        ``changes``): a new object sharing the fitted state and the network's weights; this one is
        left as it is."""
        rt = replace(runtime or self.runtime, **changes)
        out = copy.copy(self)
        out.runtime = rt
        if rt.device != self.runtime.device:
            out._extractor = None  # a network on another device: its own
        return out

    # -- plumbing --------------------------------------------------------------------------------
    @property
    def backbone(self):
        if self._backbone is None:
            bb = get_backbone(self.config.backbone, self.config.weights)
            self.config.layers = bb.resolve_layers(self.config.layers)
            self.config.pooled = bb.resolve_layers(self.config.pooled, default=bb.default_pooled)
            self._backbone = bb
        return self._backbone

    @property
    def extractor(self) -> FeatureExtractor:
        if self._extractor is None:
            layers = list(dict.fromkeys(self.config.layers + self.config.pooled))
            self._extractor = FeatureExtractor(self.backbone, layers, device=self.device)
        return self._extractor

    @property
    def keys(self) -> list[tuple[str, float]]:
        """(layer, scale) of every VLAD, in concatenation order."""
        _ = self.backbone  # resolves the default layers
        return [(layer, float(s)) for s in self.config.scales for layer in self.config.layers]

    @property
    def pooled_keys(self) -> list[tuple[str, float]]:
        """(layer, scale) of every mean-pooled part, concatenated after the VLADs."""
        _ = self.backbone
        return [(layer, float(s)) for s in self.config.scales for layer in self.config.pooled]

    @property
    def local_key(self) -> tuple[str, float]:
        """(layer, scale) whose local features spatial verification keeps: the first VLAD layer
        (else the first mean-pooled one) at the largest scale."""
        _ = self.backbone
        return (self.config.layers or self.config.pooled)[0], float(max(self.config.scales))

    @property
    def coarse_key(self) -> tuple[tuple[str, float], int] | None:
        """((layer, scale), step): the verification layer at the smallest scale, whose features a
        photo being mined is verified from as well (``LocalCodes.coarse``), its cells ``step`` times
        apart on the largest scale's grid; None with one scale, or where the largest is not a
        whole multiple of the smallest."""
        layer, top = self.local_key
        low = float(min(self.config.scales))
        step = top / low
        if low == top or step != int(step):
            return None
        return (layer, low), int(step)

    def _coarse(self, batch: Batch, rows, k: int) -> LocalCodes | None:
        ck = self.coarse_key
        if ck is None:
            return None
        (key, step), grid = ck, batch.grids[ck[0]]
        if max(grid) * step > 256:
            return None
        return select(batch.features[key][rows], batch.norms[key][rows], grid, k, step)

    @property
    def _norm_keys(self) -> list[tuple[str, float]]:
        """The keys whose local features are selected: the verification layer's, at both scales."""
        ck = self.coarse_key
        return [self.local_key] + ([ck[0]] if ck is not None else [])

    def _batches(self, paths, desc: str | None, progress: bool, norms=(), batch_size: int | None = None):
        ex = self.extractor
        ex.precision = self.precision
        if self.compile is False:
            ex.compile = False
        elif not ex.compile and want_compile(self.compile, ex, self.runtime.workload or len(paths), self.config.scales,
                                             self.config.resize):
            ex.compile = True  # kept on: later small jobs run eager chunk by chunk anyway
            if progress and ex.compile:
                P.write("torch.compile: compiling the network for this machine (7–30 s per input size) ...")
        bar = P.bar(len(paths), desc, "img", enabled=progress)
        try:
            yield from iter_batches(self.extractor, paths, self.config.scales, batch_size or self.batch_size,
                                    self.workers, progress=bar, resize=self.config.resize, norms=norms)
        finally:
            bar.close()

    # -- fitting ---------------------------------------------------------------------------------
    def fit(self, paths: Sequence[str], progress: bool = True, max_descriptors: int = 200_000,
            memory_budget: float = 4e9, chance_images: int = 400) -> "ConvVLAD":
        """Learn one vocabulary per (layer, scale) and the PCA-whitening from training images.

        One extraction pass keeps a random sample of descriptors for k-means and, while they fit in
        ``memory_budget`` bytes, every image's descriptors for the VLADs that PCA learns from;
        beyond it a second pass recomputes them (same result, twice the extraction time). The same
        pass keeps the local features of up to ``chance_images`` photos, on which the spatial
        verifier's chance level is measured (``chance_``), and a compact local codec
        (``config.local_codec``) learns its codebook (``local_codec_``): the level is then measured
        against the features as that codec stores them.
        """
        cfg = self.config
        rng = np.random.default_rng(cfg.seed)
        # its own stream, so the vocabularies and the PCA do not depend on it
        calib_rng = np.random.default_rng([cfg.seed, 1])
        calib = set(calib_rng.permutation(len(paths))[:chance_images].tolist())
        local_key, local, local_paths = self.local_key, [], []
        per_image = max(1, -(-max_descriptors // max(1, len(paths))))
        samples = {key: [] for key in self.keys}
        stored = {key: [] for key in self.keys}  # local descriptors, per batch
        pooled = {key: [] for key in self.pooled_keys}  # mean-pooled vectors, per batch
        kept, used, keep_all, n_batches = [], 0, True, 0
        self.errors_ = []
        for batch in self._batches(paths, "features (train)", progress, norms=self._norm_keys):
            self.errors_ += [e for _, e in batch.errors]
            if not batch.indices:
                continue
            kept += batch.indices
            n_batches += 1
            mine = [r for r, i in enumerate(batch.indices) if i in calib]
            if mine:
                codes = select(batch.features[local_key][mine], batch.norms[local_key][mine],
                               batch.grids[local_key], LOCAL_K)
                codes.coarse = self._coarse(batch, mine, LOCAL_K)
                local.append(codes)
                local_paths += [paths[batch.indices[r]] for r in mine]
            for key in self.pooled_keys:
                pooled[key].append(_pool(batch.features[key], cfg.gem).cpu())
            for key in self.keys:
                f = batch.features[key]
                n = f.shape[1]
                for img in f:
                    pick = rng.choice(n, size=min(n, per_image), replace=False)
                    samples[key].append(img[torch.as_tensor(pick, device=img.device)].cpu().numpy())
                if keep_all:
                    used += f.numel() * 4
                    keep_all = used <= memory_budget
                    stored[key].append(f.cpu())
        if not kept:
            raise ValueError("no readable training image")
        self.vlads_ = {}
        with P.bar(len(self.keys), f"vocabularies (k-means, k={cfg.k})", "vocabulary", enabled=progress) as bar:
            for key in self.keys:
                X = np.concatenate(samples[key])
                self.vlads_[_key(*key)] = VLAD(cfg.k, power=cfg.power, intra=cfg.intra,
                                               residual_norm=cfg.residual_norm, seed=cfg.seed).fit(X)
                bar.update(1)
        self.pooled_dims_ = {_key(*key): int(pooled[key][0].shape[1]) for key in self.pooled_keys}
        self.pca_ = None
        if cfg.dim:
            if keep_all:
                V = torch.cat([self._concat({key: stored[key][i] for key in stored},
                                            {key: pooled[key][i] for key in pooled})
                               for i in range(n_batches)]).numpy()
            else:
                del stored
                V = self.transform_vlad([paths[i] for i in kept], progress=progress).X
            with P.step(f"PCA-whitening ({V.shape[1]} → {cfg.dim})", enabled=progress):
                self.pca_ = PCAWhitening(cfg.dim, cfg.whiten_power, cfg.shrinkage).fit(V)
        self.chance_ = self.pair_chance_ = Verifier.chance
        self.local_codec_ = LocalCodec(cfg.local_codec, cfg.coarse_local)
        self.local_whitening_ = None
        if local:
            codes = LocalCodes.concat(local)
            if self.local_codec_.compact:
                with P.step(f"local codec {cfg.local_codec} (training on {len(codes)} photos' local features)",
                            enabled=progress):
                    self.local_codec_.fit(codes, seed=cfg.seed)
            stored = self.local_codec_.stored(codes)
            with P.bar(len(codes), "chance level (random pairs)", "img", enabled=progress) as bar:
                # the search's: a shortlist is verified against its photos' larger scale alone
                self.chance_ = chance_level(codes, seed=cfg.seed, progress=bar, stored=replace(stored, coarse=None))
            if cfg.local_whitening:
                self.local_whitening_ = self._fit_local_whitening(local_paths[:WHITENING_IMAGES],
                                                                  codes[np.arange(min(len(codes), WHITENING_IMAGES))],
                                                                  progress)
            self.pair_chance_ = self.chance_
            if self.local_whitening_ is not None or stored.coarse is not None:  # as pairs are matched
                with P.bar(len(codes), "chance level (pairs)", "img", enabled=progress) as bar:
                    self.pair_chance_ = chance_level(codes, seed=cfg.seed, progress=bar, stored=stored,
                                                     verifier=self.pair_verifier())
        elif self.local_codec_.compact:
            raise ValueError(f"local codec {cfg.local_codec}: no training photo gave local features to learn it from")
        self.n_train_ = len(kept)
        return self

    def _fit_local_whitening(self, paths: list[str], codes: LocalCodes, progress: bool) -> np.ndarray | None:
        """The local whitening's map (``local_whitening.py``), learned from a synthetic view of each
        of ``paths`` (whose local features are ``codes``) matched against it; None where too few
        features match (a handful of training photos)."""
        import tempfile

        from PIL import Image

        from .images import ImageError, load_image
        from .local_whitening import LocalWhitening, inlier_differences
        from .views import view

        key, rng = self.local_key, np.random.default_rng([self.config.seed, 2])
        with tempfile.TemporaryDirectory(prefix="convlad-views-") as tmp:
            made, rows = [], []
            for r, p in enumerate(paths):
                try:
                    img = np.asarray(load_image(p).convert("RGB"))
                except (ImageError, OSError):
                    continue
                made.append(f"{tmp}/{r}.jpg")
                Image.fromarray(view(img, rng)).save(made[-1], quality=90)
                rows.append(r)
            parts, at = [], []
            bar = P.bar(len(made), "local whitening (synthetic views)", "img", enabled=progress)
            try:
                for batch in iter_batches(self.extractor, made, [key[1]], self.batch_size, self.workers, progress=bar,
                                          resize=self.config.resize, norms=[key]):
                    if batch.indices:
                        parts.append(select(batch.features[key], batch.norms[key], batch.grids[key], LOCAL_K))
                        at += [rows[i] for i in batch.indices]
            finally:
                bar.close()
        if not parts:
            return None
        verifier = self.verifier()
        diffs = inlier_differences(verifier, codes[np.asarray(at)], LocalCodes.concat(parts), verifier.sure)
        valid = codes.descriptors()[np.arange(codes.codes.shape[1])[None, :] < codes.count[:, None].astype(np.int64)]
        try:
            return LocalWhitening().fit(diffs, valid).P_
        except ValueError:
            return None

    def verifier(self, **kw) -> Verifier:
        """The spatial verifier that re-ranks a search's shortlist, for this model's local features
        (its measured chance level)."""
        return Verifier(**{"chance": self.chance_, **kw})

    def pair_verifier(self, **kw) -> Verifier:
        """The spatial verifier that decides which photos are pairs (``pairs.py``: mining, and the
        groups, augmentation and links built on it): the search's, matching through the local
        whitening where the model learned one, at the chance level measured that way. The
        whitening finds more true pairs and no more false ones, out of fold on mvbench-dev with
        Lite0 and Lite2 and on the synthetic views, but re-ranked a search's shortlist no better
        on mvbench-dev (docs/defaults.md, "Local whitening")."""
        return Verifier(**{"chance": getattr(self, "pair_chance_", self.chance_),
                           "metric": getattr(self, "local_whitening_", None), **kw})

    # -- encoding --------------------------------------------------------------------------------
    def _concat(self, features: dict, pooled: dict | None = None) -> torch.Tensor:
        """Concatenate the L2-normalised parts of a batch. ``features``: (B, N, d) local descriptors
        per (layer, scale); ``pooled``: the mean-pooled parts when already computed (training)."""
        parts = [self.vlads_[_key(*key)].encode(features[key]) for key in self.keys]
        parts += [pooled[key] if pooled is not None else _pool(features[key], self.config.gem) for key in self.pooled_keys]
        v = torch.cat(parts, dim=1)
        return Fn.l2n(v) if len(parts) > 1 else v

    def _batch_output(self, batch: Batch, local: int, pca: bool = True):
        """One batch's descriptors (B, dim) float32 numpy (the VLADs before PCA with ``pca`` False)
        and, with ``local`` = k > 0, its ``LocalCodes``: the one encoder behind paths and pixels."""
        if not batch.indices:
            return None, None
        v = self._concat(batch.features)
        if pca and self.pca_ is not None:
            v = self.pca_.encode(v)
        codes = None
        if local:
            key = self.local_key
            codes = select(batch.features[key], batch.norms[key], batch.grids[key], local)
            codes.coarse = self._coarse(batch, slice(None), local)
        return v.float().cpu().numpy(), codes

    def iter_transform(self, items, progress=True, desc="descriptors", local: int = 0, pca: bool = True,
                       batch_size: int | None = None) -> Iterator[Encoded]:
        """One ``Encoded`` per batch. ``items``: image paths, ``(path, box)`` crops, or images
        already decoded and resized (``images.load_warped`` at each of the model's scale sizes);
        ``local`` = k > 0: each image's k strongest local features of ``local_key`` too (and of
        ``coarse_key``, as their ``LocalCodes.coarse``, which mining verifies from as well)."""
        if not hasattr(self, "vlads_"):
            raise RuntimeError("model is not fitted: call fit() or ConvVLAD.load()")
        norms = self._norm_keys if local else ()
        for batch in self._batches(items, desc, progress, norms=norms, batch_size=batch_size):
            X, codes = self._batch_output(batch, local, pca)
            if X is None:
                X = np.zeros((0, self.dim if pca else self.vlad_dim), np.float32)
                codes = LocalCodes.empty(local, self.local_dim) if local else None
            yield Encoded(list(batch.indices), X, [e for _, e in batch.errors], codes)

    def transform(self, items, progress=True, local: int = 0) -> Encoded:
        """Descriptors of ``items`` (paths, crops or decoded images, see ``iter_transform``):
        ``Encoded`` — ``ok, X, errors = model.transform(paths)`` unpacks the readable items'
        indices, their (n, dim) float32 descriptors and the errors; ``.local`` holds their
        ``verify.LocalCodes`` when ``local`` = k > 0 (k features each, for re-ranking)."""
        return Encoded.concat(list(self.iter_transform(items, progress, local=local)), self.dim, local, self.local_dim)

    def transform_decoded(self, decoded: Sequence[Sequence[np.ndarray]], local: int = 0) -> Encoded:
        """``transform`` of images already decoded, in one forward pass per shape: what a service
        batching queries from many clients calls. Every item is encoded (rows in input order)."""
        parts = list(self.iter_transform(decoded, False, local=local, batch_size=max(1, len(decoded))))
        return Encoded.concat(parts, self.dim, local, self.local_dim)

    @property
    def local_dim(self) -> int:
        layer, scale = self.local_key
        key = _key(layer, scale)
        if key in getattr(self, "vlads_", {}):
            return int(self.vlads_[key].centroids_.shape[1])
        return int(self.pooled_dims_[key])

    @property
    def vlad_dim(self) -> int:
        return sum(v.dim for v in self.vlads_.values()) + sum(self.pooled_dims_.values())

    def transform_vlad(self, paths, progress=True) -> Encoded:
        """Uncompressed (concatenated, L2-normalised) VLADs, before PCA-whitening."""
        return Encoded.concat(list(self.iter_transform(paths, progress, desc="VLAD", pca=False)), self.vlad_dim)

    @property
    def dim(self) -> int:
        if getattr(self, "pca_", None) is not None:
            return self.pca_.n_components_
        return self.vlad_dim

    # -- persistence -----------------------------------------------------------------------------
    def state(self) -> tuple[dict, dict[str, np.ndarray]]:
        """(JSON-able header, named arrays): everything needed to rebuild the fitted model."""
        if not hasattr(self, "vlads_"):
            raise RuntimeError("model is not fitted: nothing to save")
        arrays, encoders = {}, {}
        for name, v in self.vlads_.items():
            st = v.get_state()
            encoders[name] = st["params"]
            arrays[f"vlad/{name}/centroids"] = st["arrays"]["centroids"]
        pca = None
        if self.pca_ is not None:
            st = self.pca_.get_state()
            pca = st["params"]
            arrays.update({f"pca/{k}": a for k, a in st["arrays"].items()})
        config = asdict(self.config)
        for key, default in _LATER_FIELDS.items():  # models saved before a field existed keep their fingerprint
            if config[key] == default:
                del config[key]
        codec_name, codec_arrays = self.local_codec_.state()
        arrays.update(codec_arrays)
        if getattr(self, "local_whitening_", None) is not None:
            arrays["local-whitening"] = self.local_whitening_
        meta = {"format": FORMAT, "version": FORMAT_VERSION, "config": config,
                "vlad": encoders, "pooled_dims": self.pooled_dims_, "pca": pca, "n_train": self.n_train_,
                "chance": self.chance_}
        if getattr(self, "local_whitening_", None) is not None or self.config.coarse_local:
            meta["pair_chance"] = self.pair_chance_
        return meta, arrays

    @classmethod
    def from_state(cls, meta: dict, arrays: dict[str, np.ndarray], runtime: Runtime | None = None) -> "ConvVLAD":
        return cls(Config(**{**_LATER_FIELDS, **meta["config"]}), runtime).set_state(meta, arrays)

    def set_state(self, meta: dict, arrays: dict[str, np.ndarray]) -> "ConvVLAD":
        """The fitted state of ``state()`` put into this model, which keeps its network and its
        runtime settings (device, arithmetic, batch size); the configurations must agree."""
        mine = json.loads(json.dumps(asdict(self.config)))
        if any(mine.get(k) != v for k, v in json.loads(json.dumps({**_LATER_FIELDS, **meta["config"]})).items()):
            raise ValueError("set_state: the state was fitted with another configuration")
        self.vlads_ = {
            name: VLAD.from_state({"params": params, "arrays": {"centroids": arrays[f"vlad/{name}/centroids"]}})
            for name, params in meta["vlad"].items()
        }
        self.pooled_dims_ = meta.get("pooled_dims", {})
        self.pca_ = None
        if meta["pca"] is not None:
            self.pca_ = PCAWhitening.from_state({"params": meta["pca"], "arrays": {
                k: arrays[f"pca/{k}"] for k in ("mean", "components", "explained_variance")}})
        self.n_train_ = meta["n_train"]
        self.chance_ = int(meta.get("chance", Verifier.chance))  # fitted before it was measured: Lite0's
        self.local_codec_ = LocalCodec.from_state(self.config.local_codec, arrays, self.config.coarse_local)
        self.local_whitening_ = arrays.get("local-whitening")  # fitted before it existed, or on too few photos: None
        if self.local_whitening_ is not None:
            self.local_whitening_ = np.asarray(self.local_whitening_, np.float32)
        self.pair_chance_ = int(meta.get("pair_chance", self.chance_))
        return self

    def fingerprint(self) -> str:
        """Identity of the fitted state: equal fingerprints give equal descriptors."""
        meta, arrays = self.state()
        h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
        for k in sorted(arrays):
            h.update(k.encode())
            h.update(np.ascontiguousarray(arrays[k]).tobytes())
        return h.hexdigest()[:16]

    def save(self, path) -> None:
        atomic_savez(path, *self.state())

    @classmethod
    def load(cls, path, runtime: Runtime | None = None) -> "ConvVLAD":
        return cls.from_state(*load_npz(path, FORMAT, FORMAT_VERSION), runtime=runtime)

    def describe(self) -> str:
        c = self.config
        pooled = f" pooled={','.join(c.pooled)}" if c.pooled else ""
        pooled += f" gem={c.gem:g}" if c.pooled and c.gem != 1 else ""
        return (f"{c.backbone} layers={','.join(c.layers or [])}{pooled} "
                f"scales={','.join(f'{s:g}' for s in c.scales)} k={c.k} dim={self.dim}")

    def __repr__(self):
        return f"ConvVLAD({json.dumps(asdict(self.config))})"
