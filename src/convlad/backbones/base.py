"""What every backbone declares: its network, its tap-able layers, its input normalisation."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


class WeightsError(RuntimeError):
    """Weights could not be found or loaded; the message is a single line meant for the user."""


@dataclass
class Backbone:
    """A CNN ready for local-feature extraction.

    ``taps`` maps a public layer name (the paper's where it names one) to the qualified name of the
    submodule whose *output* is that layer's feature map, in forward order. Extraction hooks those
    submodules, so any ``nn.Module`` works.

    Input convention: RGB float tensors in [0, 1], shape (B, 3, H, W); ``mean``/``std`` are applied
    by the extractor, so callers never normalise by hand.
    """

    name: str
    module: nn.Module
    taps: dict[str, str]
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    default_layer: str | None = None
    default_pooled: list[str] = field(default_factory=list)  # mean-pooled beside the VLAD by default
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.module.eval()
        names = dict(self.module.named_modules())
        missing = [path for path in self.taps.values() if path not in names]
        if missing:
            raise ValueError(f"{self.name}: tap points not found in the module: {missing}")

    @property
    def layers(self) -> list[str]:
        return list(self.taps)

    def resolve_layers(self, layers: str | list[str] | None, default: list[str] | None = None) -> list[str]:
        """``None`` → ``default`` (the default layer if not given), ``"all"`` → every tap, else
        names checked against the taps, where ``a..b`` stands for every tap from a to b (either end
        may be left out); returned in forward order."""
        if layers is None:
            layers = default if default is not None else [self.default_layer or self.layers[-1]]
        elif isinstance(layers, str):
            layers = self.layers if layers == "all" else [s.strip() for s in layers.split(",") if s.strip()]
        expanded = []
        for layer in layers:
            if ".." in layer:
                first, last = layer.split("..", 1)
                for end in (first, last):
                    if end and end not in self.taps:
                        raise ValueError(f"backbone {self.name!r} has no layer {end!r}; choose from: "
                                         f"{', '.join(self.layers)}")
                names = self.layers
                expanded += names[names.index(first) if first else 0: names.index(last) + 1 if last else None]
            else:
                expanded.append(layer)
        layers = expanded
        unknown = [layer for layer in layers if layer not in self.taps]
        if unknown:
            raise ValueError(
                f"backbone {self.name!r} has no layer {unknown[0]!r}; choose from: {', '.join(self.layers)}"
            )
        order = {n: i for i, n in enumerate(self.taps)}
        return sorted(dict.fromkeys(layers), key=order.__getitem__)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def to(self, device) -> "Backbone":
        self.module.to(device)
        return self


def fold_batchnorm(module: nn.Module, pairs=()) -> nn.Module:
    """Fold inference-mode BatchNorm2d layers into the convolution before them (in place): the
    convolution gets the affine map as weight scale and bias, the BN becomes an identity. Same
    outputs up to float rounding, one memory pass less per layer: 1.5× faster for Lite0 on CPU.

    Folded: every Conv2d directly followed by a BatchNorm2d inside an ``nn.Sequential``, and the
    ``pairs`` given as (parent module, conv attribute, bn attribute).
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    def fold(parent, conv_name, bn_name):
        conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
        setattr(parent, conv_name, fuse_conv_bn_eval(conv.eval(), bn.eval()))
        setattr(parent, bn_name, nn.Identity())

    for parent, conv_name, bn_name in pairs:
        fold(parent, conv_name, bn_name)
    for seq in [m for m in module.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for a, b in zip(names, names[1:]):
            if isinstance(seq._modules[a], nn.Conv2d) and isinstance(seq._modules[b], nn.BatchNorm2d):
                fold(seq, a, b)
    return module


def from_module(module: nn.Module, layers: list[str] | dict[str, str], name: str = "custom", **kw) -> Backbone:
    """Wrap any user ``nn.Module``: ``layers`` are qualified submodule names (or a dict alias→name)."""
    taps = dict(layers) if isinstance(layers, dict) else {layer: layer for layer in layers}
    return Backbone(name=name, module=module, taps=taps, **kw)
