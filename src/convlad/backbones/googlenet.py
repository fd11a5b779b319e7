"""GoogLeNet (Inception v1) in plain torch with torchvision's key layout, so that the official
``googlenet-1378be20.pth`` (auxiliary classifiers included) loads unchanged.

torchvision's port keeps two quirks of its TF origin that the weights depend on: batch-norm after
every convolution (eps 1e-3) and a 3×3 (not 5×5) convolution in the "5×5" branch. Its
``transform_input`` maps ImageNet-normalised input to (x − 0.5)/0.5; here that is simply the
backbone's normalisation.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import Backbone
from .hub import load_official_state_dict

URL = "https://download.pytorch.org/models/googlenet-1378be20.pth"


class BasicConv2d(nn.Module):
    def __init__(self, cin, cout, **kw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class Inception(nn.Module):
    def __init__(self, cin, ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj):
        super().__init__()
        self.branch1 = BasicConv2d(cin, ch1x1, kernel_size=1)
        self.branch2 = nn.Sequential(BasicConv2d(cin, ch3x3red, kernel_size=1),
                                     BasicConv2d(ch3x3red, ch3x3, kernel_size=3, padding=1))
        self.branch3 = nn.Sequential(BasicConv2d(cin, ch5x5red, kernel_size=1),
                                     BasicConv2d(ch5x5red, ch5x5, kernel_size=3, padding=1))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1, ceil_mode=True),
                                     BasicConv2d(cin, pool_proj, kernel_size=1))

    def forward(self, x):
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class InceptionAux(nn.Module):
    """Only here so that the official checkpoint's aux keys load; never run at inference."""

    def __init__(self, cin, num_classes=1000):
        super().__init__()
        self.conv = BasicConv2d(cin, 128, kernel_size=1)
        self.fc1 = nn.Linear(2048, 1024)
        self.fc2 = nn.Linear(1024, num_classes)


class GoogLeNet(nn.Module):
    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.conv1 = BasicConv2d(3, 64, kernel_size=7, stride=2, padding=3)
        self.maxpool1 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.conv2 = BasicConv2d(64, 64, kernel_size=1)
        self.conv3 = BasicConv2d(64, 192, kernel_size=3, padding=1)
        self.maxpool2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.inception3a = Inception(192, 64, 96, 128, 16, 32, 32)
        self.inception3b = Inception(256, 128, 128, 192, 32, 96, 64)
        self.maxpool3 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.inception4a = Inception(480, 192, 96, 208, 16, 48, 64)
        self.inception4b = Inception(512, 160, 112, 224, 24, 64, 64)
        self.inception4c = Inception(512, 128, 128, 256, 24, 64, 64)
        self.inception4d = Inception(512, 112, 144, 288, 32, 64, 64)
        self.inception4e = Inception(528, 256, 160, 320, 32, 128, 128)
        self.maxpool4 = nn.MaxPool2d(2, stride=2, ceil_mode=True)
        self.inception5a = Inception(832, 256, 160, 320, 32, 128, 128)
        self.inception5b = Inception(832, 384, 192, 384, 48, 128, 128)
        self.aux1 = InceptionAux(512, num_classes)
        self.aux2 = InceptionAux(528, num_classes)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(1024, num_classes)

    def forward(self, x):
        x = self.maxpool1(self.conv1(x))
        x = self.maxpool2(self.conv3(self.conv2(x)))
        x = self.maxpool3(self.inception3b(self.inception3a(x)))
        for name in ("4a", "4b", "4c", "4d", "4e"):
            x = getattr(self, f"inception{name}")(x)
        x = self.inception5b(self.inception5a(self.maxpool4(x)))
        return self.fc(self.dropout(self.avgpool(x).flatten(1)))


# The paper's layer names (its Caffe GoogLeNet) → torchvision modules. Caffe's conv2/3x3 + norm2 is
# torchvision's conv3 (there is no LRN in the port).
TAPS = {
    "pool1": "maxpool1", "conv2": "conv3", "pool2": "maxpool2",
    "inception3a": "inception3a", "inception3b": "inception3b", "pool3": "maxpool3",
    "inception4a": "inception4a", "inception4b": "inception4b", "inception4c": "inception4c",
    "inception4d": "inception4d", "inception4e": "inception4e", "pool4": "maxpool4",
    "inception5a": "inception5a", "inception5b": "inception5b",
}


def googlenet(weights: str | None = None, pretrained: bool = True) -> Backbone:
    model = GoogLeNet()
    if pretrained:
        model.load_state_dict(load_official_state_dict("googlenet", URL, weights), strict=True)
    return Backbone(name="googlenet", module=model, taps=dict(TAPS), mean=(0.5,) * 3, std=(0.5,) * 3,
                    default_layer="inception4e", meta={"weights": weights or URL})
