"""Extraction: one forward pass per image and scale yields the local descriptors of every layer asked for."""
from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import fx, nn

from .backbones.base import Backbone
from .functional import local_descriptors
from .images import ImageError, load_warped
from .runtime import (BASE_SIZE, CPU_BATCH_PIXELS, GPU_BATCH_PIXELS, PRECISIONS, default_device, keep_freed_memory,
                      lower_thread_priority, resolve_precision)


def scale_size(scale: float) -> int:
    return int(round(BASE_SIZE * scale))


class _Stop(Exception):
    """Raised by the deepest hook: nothing after the last tapped layer needs computing."""


def tap_graph(module: nn.Module, targets: Sequence[str]) -> fx.GraphModule | None:
    """``module`` traced by torch.fx into a graph that returns the outputs of the submodules
    ``targets`` (a tuple, in that order) and computes nothing after the deepest of them.

    Tapped submodules and convolutions are kept as calls (so TF-style SAME padding, which reads the
    input's shape, and scripted stages trace). None when the module cannot be traced (data-dependent
    control flow) or a target is called more than once: the caller falls back to forward hooks.
    """
    wanted = set(targets)

    class Tracer(fx.Tracer):
        def is_leaf_module(self, m, qualname):
            return (qualname in wanted or isinstance(m, (nn.Conv2d, torch.jit.ScriptModule))
                    or super().is_leaf_module(m, qualname))

    try:
        graph = Tracer().trace(module)
    except Exception:  # noqa: BLE001 - any tracing failure means: use hooks
        return None
    calls: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_module" and node.target in wanted:
            calls.setdefault(node.target, []).append(node)
    if set(calls) != wanted or any(len(v) > 1 for v in calls.values()):
        return None
    (output,) = [n for n in graph.nodes if n.op == "output"]
    output.args = (tuple(calls[t][0] for t in targets),)
    gm = fx.GraphModule(module, graph)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def network_input(backbone: Backbone, x: torch.Tensor) -> torch.Tensor:
    """uint8 (B, n, n, 3) → the backbone's normalised float input (B, 3, n, n), in channels-last
    memory: the permute of an NHWC tensor already is channels-last, so nothing is copied but the
    float conversion."""
    return backbone.normalize(x.permute(0, 3, 1, 2).float().div_(255.0))


class _Tapped(nn.Module):
    """Input normalisation + the traced graph: one module, so torch.compile fuses the input pass too."""

    def __init__(self, backbone: Backbone, graph: fx.GraphModule):
        super().__init__()
        self.backbone, self.graph = backbone, graph

    def forward(self, x):
        return self.graph(network_input(self.backbone, x))


class FeatureExtractor:
    """Taps ``layers`` of ``backbone``.

    ``__call__(x)`` takes a uint8 batch (B, n, n, 3) and returns ``{layer: (B, h·w, d)}`` float32
    L2-normalised local descriptors. Nothing after the deepest tapped layer is computed: the network
    is traced (torch.fx) into a graph that ends there, or, for modules that cannot be traced, run
    with forward hooks and stopped by an exception.

    A batch runs in chunks of at most ``max_batch_pixels`` input pixels (default: 4 images at
    scale 1 on CPU, see ``CPU_BATCH_PIXELS``).

    ``compile=True`` runs full chunks through ``torch.compile`` (inductor, weights frozen, ReLU6 and
    residual adds fused into oneDNN convolutions): on 2 CPU cores about 1.2× the eager forward
    pass of Lite0, after a one-off compilation of 7–30 s per input size (inductor caches on disk).
    Compiled shapes are static, so a short last chunk is padded to a full one; chunks of less than
    half (single queries) run eager. If compilation fails (no C++ compiler, an unsupported module)
    the extractor warns once and stays eager.
    """

    def __init__(self, backbone: Backbone, layers: Sequence[str] | str | None = None, device=None,
                 compile: bool = False, max_batch_pixels: int | None = None, precision: str = "auto"):
        self.backbone = backbone
        self.layers = backbone.resolve_layers(layers if layers is None or isinstance(layers, str) else list(layers))
        self.device = torch.device(device) if device is not None else default_device()
        if max_batch_pixels is None:
            max_batch_pixels = CPU_BATCH_PIXELS if self.device.type == "cpu" else GPU_BATCH_PIXELS
        self.max_batch_pixels = max_batch_pixels
        self.precision = precision
        if self.device.type == "cpu":
            keep_freed_memory()
        backbone.to(self.device)
        # channels-last: 1.5× faster for Lite0's depthwise and 1×1 convolutions on 2 CPU cores
        backbone.module.to(memory_format=torch.channels_last)
        graph = tap_graph(backbone.module, [backbone.taps[layer] for layer in self.layers])
        self._net = _Tapped(backbone, graph) if graph is not None else None
        self._handles = []
        if graph is None:
            modules = dict(backbone.module.named_modules())
            last = self.layers[-1]
            self._handles = [
                modules[backbone.taps[layer]].register_forward_hook(self._hook(layer, stop=layer == last))
                for layer in self.layers
            ]
        self._maps: dict[str, torch.Tensor] = {}
        self._compiled = None
        self.compile = compile

    @property
    def traced(self) -> bool:
        """Whether the network runs as a traced graph (else through forward hooks)."""
        return self._net is not None

    @property
    def precision(self) -> str:
        """The arithmetic the network runs in (the setting resolved for this device)."""
        return self._precision

    @precision.setter
    def precision(self, value: str) -> None:
        self.precision_setting = value
        self._precision = resolve_precision(value, self.device)

    @property
    def can_compile(self) -> bool:
        """A traced graph without TorchScript stages (dynamo cannot see inside those)."""
        return self._net is not None and not any(isinstance(m, torch.jit.ScriptModule)
                                                 for m in self.backbone.module.modules())

    @property
    def compile(self) -> bool:
        return self._compiled is not None

    @compile.setter
    def compile(self, on: bool) -> None:
        if not on:
            self._compiled = None
        elif self._compiled is None:
            if not self.can_compile:
                warnings.warn(f"{self.backbone.name}: cannot be compiled (not traceable by torch.fx, or "
                              "TorchScript stages); running eager", stacklevel=2)
                return
            self._compiled = torch.compile(self._net, dynamic=False)

    def _hook(self, layer: str, stop: bool):
        def hook(_module, _inputs, output):
            self._maps[layer] = output
            if stop:
                raise _Stop

        return hook

    def close(self):
        for h in self._handles:
            h.remove()
        self._handles = []

    def _run_hooks(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self._maps = {}
        try:
            self.backbone.module(network_input(self.backbone, x))
        except _Stop:
            pass
        maps, self._maps = self._maps, {}
        return tuple(maps[layer] for layer in self.layers)

    def _run(self, x: torch.Tensor, step: int) -> tuple[torch.Tensor, ...]:
        dtype = PRECISIONS[self.precision]
        with torch.autocast(self.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            return self._run_chunk(x, step)

    def _run_chunk(self, x: torch.Tensor, step: int) -> tuple[torch.Tensor, ...]:
        b = x.shape[0]
        if self._compiled is not None and 2 * b >= step:
            pad = step - b
            if pad:
                x = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))])
            try:
                # freezing (weights as constants) lets inductor pre-pack them for oneDNN and fuse
                # ReLU6 and residual adds into the convolutions; it must be set while compiling,
                # which happens inside the call (compile(options=...) did not reach those passes)
                from torch._inductor import config as inductor_config

                with inductor_config.patch(freezing=True):
                    out = self._compiled(x)
                return tuple(o[:b] for o in out) if pad else out
            except Exception as e:  # noqa: BLE001 - compilation problems must not stop extraction
                warnings.warn(f"torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                              "running eager", stacklevel=3)
                self._compiled = None
                x = x[:b]
        return self._net(x) if self._net is not None else self._run_hooks(x)

    @torch.inference_mode()
    def feature_maps(self, batch: np.ndarray | torch.Tensor) -> dict[str, torch.Tensor]:
        x = torch.as_tensor(batch).to(self.device, non_blocking=True)
        step = max(1, self.max_batch_pixels // (x.shape[1] * x.shape[2]))
        chunks = [self._run(x[s:s + step], step) for s in range(0, x.shape[0], step)]
        outs = chunks[0] if len(chunks) == 1 else [torch.cat(parts) for parts in zip(*chunks)]
        return dict(zip(self.layers, outs))

    def __call__(self, batch) -> dict[str, torch.Tensor]:
        return {layer: local_descriptors(m) for layer, m in self.feature_maps(batch).items()}


@dataclass
class Batch:
    """Local descriptors of a batch of images: ``features[(layer, scale)]`` is (B, N, d)."""

    indices: list[int]
    features: dict[tuple[str, float], torch.Tensor]
    errors: list[tuple[int, ImageError]] = field(default_factory=list)
    # for the keys asked for with ``norms=``: each position's norm before L2-normalisation (B, N)
    # and the map's (h, w), what spatial verification selects and locates features by
    norms: dict[tuple[str, float], torch.Tensor] = field(default_factory=dict)
    grids: dict[tuple[str, float], tuple[int, int]] = field(default_factory=dict)

    def add_maps(self, maps: dict[str, torch.Tensor], scale: float, norms=()) -> None:
        """Take one scale's feature maps (B, d, h, w): their local descriptors, and the norms and
        grid of the (layer, scale) keys in ``norms``."""
        for layer, m in maps.items():
            key = (layer, float(scale))
            self.features[key] = local_descriptors(m)
            if key in norms:
                self.norms[key] = m.flatten(2).float().norm(dim=1)
                self.grids[key] = tuple(m.shape[-2:])


def _decode(item, sizes, mode):
    if isinstance(item, (list, tuple)) and item and isinstance(item[0], np.ndarray):
        return item  # decoded already, one array per size (a service's queries)
    path, box = (item, None) if isinstance(item, (str, os.PathLike)) else item
    try:
        return load_warped(path, sizes, mode, box)
    except ImageError as e:
        return e


def iter_batches(
    extractor: FeatureExtractor,
    paths: Sequence[str],
    scales: Sequence[float] = (1,),
    batch_size: int = 16,
    workers: int = 2,
    progress=None,
    resize: str = "warp",
    norms: Sequence[tuple[str, float]] = (),
) -> Iterator[Batch]:
    """Decode in a thread pool (the decoders release the GIL) at a lower priority, while the network
    runs on the previous batch.

    ``paths`` items are file paths, ``(path, box)`` pairs to crop to a box (x1, y1, x2, y2) first,
    as for Oxford/Paris queries, or images decoded already (``load_warped``'s arrays, one per scale). Unreadable images do not stop the run: they come back in
    ``Batch.errors`` with their index.
    With ``resize="keep"`` images of different shapes are split into one sub-batch per shape, so a
    Batch's ``indices`` are not always consecutive. ``progress`` (tqdm-like) advances per image.
    """
    sizes = [scale_size(s) for s in scales]
    with ThreadPoolExecutor(max_workers=max(1, workers), initializer=lower_thread_priority) as pool:
        chunks = [list(range(i, min(i + batch_size, len(paths)))) for i in range(0, len(paths), batch_size)]
        # keep up to two chunks of decoding in flight ahead of the forward pass
        pending = [[pool.submit(_decode, paths[i], sizes, resize) for i in c] for c in chunks[:2]]
        for ci, chunk in enumerate(chunks):
            futures = pending.pop(0)
            if ci + 2 < len(chunks):
                pending.append([pool.submit(_decode, paths[i], sizes, resize) for i in chunks[ci + 2]])
            decoded = [f.result() for f in futures]
            errors = [(i, d) for i, d in zip(chunk, decoded) if isinstance(d, ImageError)]
            by_shape: dict[tuple, list] = {}
            for i, d in zip(chunk, decoded):
                if not isinstance(d, ImageError):
                    by_shape.setdefault(tuple(a.shape for a in d), []).append((i, d))
            if progress is not None:
                progress.update(len(chunk))
            if not by_shape:
                yield Batch(indices=[], features={}, errors=errors)
            for gi, group in enumerate(by_shape.values()):
                batch = Batch(indices=[i for i, _ in group], features={}, errors=errors if gi == 0 else [])
                for si, scale in enumerate(scales):
                    batch.add_maps(extractor.feature_maps(np.stack([d[si] for _, d in group])), scale, norms)
                yield batch
