"""SmallCNN and AlexNet: shapes, stems, loss at init, init and config switches, overfitting."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

from sparkloom.models.cnn import AlexNet, AlexNetConfig, CNNConfig, SmallCNN


def small_cnn(**overrides):
    return SmallCNN(CNNConfig(**overrides))


def alexnet(**overrides):
    kw = dict(in_channels=1, height=28, width=28, num_classes=10, width_mult=0.25)
    return AlexNet(AlexNetConfig(**{**kw, **overrides}))


BUILDERS = {"smallcnn": small_cnn, "alexnet": alexnet}


@pytest.fixture(params=list(BUILDERS), ids=list(BUILDERS))
def build(request):
    torch.manual_seed(0)
    return BUILDERS[request.param]


def random_batch(model: nn.Module, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, cfg.in_channels, cfg.height, cfg.width, generator=g)
    return images, torch.randint(0, cfg.num_classes, (n,), generator=g)


@pytest.mark.parametrize(
    ("builder", "overrides"),
    [
        (small_cnn, dict(height=8, width=8)),
        (small_cnn, dict(height=28, width=28)),
        (alexnet, dict(height=28, width=28)),
        (alexnet, dict(in_channels=3, height=32, width=32)),
        (alexnet, dict(in_channels=3, height=224, width=224, num_classes=1000)),
    ],
    ids=["smallcnn-8x8x1", "smallcnn-28x28x1", "alexnet-28x28x1", "alexnet-32x32x3", "alexnet-224"],
)
def test_output_shapes(builder, overrides):
    model = builder(**overrides)
    images, labels = random_batch(model, 2)
    out = model(images)
    assert out.logits.shape == (2, model.cfg.num_classes)
    assert out.loss is None
    assert model(images, labels).loss.ndim == 0


@pytest.mark.parametrize(("size", "kernel", "stride"), [(28, 3, 1), (63, 3, 1), (64, 11, 4)])
def test_auto_stem_is_small_below_64_pixels(size, kernel, stride):
    conv1 = alexnet(height=size, width=size).features.conv1[0]
    assert conv1.kernel_size == (kernel, kernel)
    assert conv1.stride == (stride, stride)


@pytest.mark.parametrize("batch_norm", [False, True])
@pytest.mark.parametrize("init", ["he", "default"])
def test_initial_loss_is_near_log_num_classes(build, init, batch_norm):
    model = build(init=init, batch_norm=batch_norm).eval()
    images, labels = random_batch(model, 64, seed=1)
    with torch.no_grad():
        loss = model(images, labels).loss.item()
    assert abs(loss - math.log(10)) < 0.1


def test_batch_norm_switch(build):
    def count(model):
        return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())

    assert count(build(batch_norm=False)) == 0
    assert count(build(batch_norm=True)) > 0


def test_dropout_zero_leaves_no_active_dropout(build):
    dropouts = [m for m in build(dropout=0.0).modules() if isinstance(m, nn.Dropout)]
    assert all(m.p == 0 for m in dropouts)
    assert any(m.p == 0.5 for m in build(dropout=0.5).modules() if isinstance(m, nn.Dropout))


def test_he_init_matches_fan_out(build):
    convs = [m for m in build(init="he").modules() if isinstance(m, nn.Conv2d)]
    assert convs
    for conv in convs:
        fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
        assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.15)


def test_last_layer_starts_small_whatever_the_init(build):
    for init in ("he", "default"):
        head = build(init=init).head.classifier
        assert head.weight.std().item() == pytest.approx(0.01, rel=0.15)
        assert torch.count_nonzero(head.bias) == 0


def test_wrong_input_shape_names_the_expected_shape(build):
    model = build()
    with pytest.raises(ValueError, match=re.escape("(B, 1, 28, 28)")):
        model(torch.zeros(2, 3, 28, 28))
    with pytest.raises(ValueError, match=re.escape("(B, 1, 28, 28)")):
        model(torch.zeros(1, 28, 28))


def test_loss_drops_on_a_fixed_batch(build):
    model = build()
    images, labels = random_batch(model, 32, seed=2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.eval()
    with torch.no_grad():
        start = model(images, labels).loss.item()
    model.train()
    for _ in range(50):
        opt.zero_grad()
        model(images, labels).loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        end = model(images, labels).loss.item()
    assert end < start / 2


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        # Paper widths, one tower (no grouped convs), weights + biases:
        # conv1  3*96*11*11 + 96      =     34,944
        # conv2  96*256*5*5 + 256     =    614,656
        # conv3  256*384*3*3 + 384    =    885,120
        # conv4  384*384*3*3 + 384    =  1,327,488
        # conv5  384*256*3*3 + 256    =    884,992
        # fc6    256*6*6*4096 + 4096  = 37,752,832
        # fc7    4096*4096 + 4096     = 16,781,312
        # fc8    4096*1000 + 1000     =  4,097,000
        # total                       = 62,378,344 (~62M)
        (dict(), 62_378_344),
        # Small stem at 28x28x1, 10 classes: conv1 1*96*3*3 + 96 = 960, conv2-5 as above,
        # fc6 256*3*3*4096 + 4096 = 9,441,280, fc7 as above, fc8 4096*10 + 10 = 40,970.
        (dict(in_channels=1, height=28, width=28, num_classes=10), 29_976_778),
    ],
    ids=["imagenet-224", "small-28"],
)
def test_alexnet_parameter_count(overrides, expected):
    # Meta tensors: only shapes matter here, so skip allocating and initialising 62M weights.
    with torch.device("meta"):
        model = AlexNet(AlexNetConfig(batch_norm=False, **overrides))
    assert model.num_parameters() == expected


@pytest.mark.parametrize(
    ("config_cls", "overrides", "message"),
    [
        (CNNConfig, {"init": "xavier"}, "init must be one of"),
        (CNNConfig, {"height": 3}, "at least 4x4 images, got 3x28"),
        (CNNConfig, {"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        (CNNConfig, {"kernel_size": 0}, "kernel_size must be >= 1"),
        (AlexNetConfig, {"stem": "tiny"}, "stem must be one of"),
        (AlexNetConfig, {"init": "xavier"}, "init must be one of"),
        (AlexNetConfig, {"height": 32, "width": 32, "stem": "imagenet"}, "at least 63x63.*small"),
        (AlexNetConfig, {"height": 7, "width": 7}, "small stem needs images of at least 8x8"),
        (AlexNetConfig, {"width_mult": 0}, "width_mult must be > 0"),
        (AlexNetConfig, {"num_classes": 0}, "num_classes must be >= 1"),
    ],
)
def test_config_rejects_bad_values(config_cls, overrides, message):
    with pytest.raises(ValueError, match=message):
        config_cls(**overrides)
