"""VGG16 ("OxfordNet", the paper's main network) in plain torch, with torchvision's key layout
(``features.N``, ``classifier.N``) so that the official ``vgg16-397923af.pth`` loads unchanged."""
from __future__ import annotations

from torch import nn

from .base import Backbone
from .hub import load_official_state_dict

URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class VGG16(nn.Module):
    def __init__(self, num_classes: int = 1000):
        super().__init__()
        layers, c = [], 3
        for v in CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096), nn.ReLU(True), nn.Dropout(),
            nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.avgpool(self.features(x)).flatten(1))


def vgg16_taps() -> dict[str, str]:
    """conv{b}_{i} → its ReLU (the paper's Caffe layers are rectified in place), pool{b} → max-pool."""
    taps, idx, block, conv = {}, 0, 1, 0
    for v in CFG:
        if v == "M":
            taps[f"pool{block}"] = f"features.{idx}"
            idx, block, conv = idx + 1, block + 1, 0
        else:
            conv += 1
            taps[f"conv{block}_{conv}"] = f"features.{idx + 1}"
            idx += 2
    return taps


def vgg16(weights: str | None = None, pretrained: bool = True) -> Backbone:
    model = VGG16()
    if pretrained:
        model.load_state_dict(load_official_state_dict("vgg16", URL, weights), strict=True)
    return Backbone(name="vgg16", module=model, taps=vgg16_taps(), default_layer="conv5_1",
                    meta={"weights": weights or URL})
