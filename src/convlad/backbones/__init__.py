"""Backbone registry: a plain dict from name to a factory ``f(weights: str | None) -> Backbone``."""
from __future__ import annotations

from .base import Backbone, WeightsError, from_module
from .efficientnet_lite import efficientnet_lite0, efficientnet_lite1, efficientnet_lite2
from .googlenet import googlenet
from .vgg import vgg16
from .zoo import inception_v3, mobilenet_v2

BACKBONES = {
    "efficientnet-lite0": efficientnet_lite0,
    "efficientnet-lite1": efficientnet_lite1,
    "efficientnet-lite2": efficientnet_lite2,
    "vgg16": vgg16,
    "googlenet": googlenet,
    "inception-v3": inception_v3,
    "mobilenet-v2": mobilenet_v2,
}

DEFAULT_BACKBONE = "efficientnet-lite0"


def get_backbone(name: str = DEFAULT_BACKBONE, weights: str | None = None) -> Backbone:
    try:
        factory = BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; choose from: {', '.join(BACKBONES)}") from None
    return factory(weights)


__all__ = ["BACKBONES", "DEFAULT_BACKBONE", "Backbone", "WeightsError", "from_module", "get_backbone"]
