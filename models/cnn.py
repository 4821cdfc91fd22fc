"""Image classifiers: the TensorFlow "Deep MNIST" network and AlexNet (Krizhevsky et al., 2012).

Both take float images (B, C, H, W), already scaled and standardised (see models.augment), and
return a ClassifierOutput (logits, loss) like the text classifiers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sparkloom.models.heads import ClassificationHead
from sparkloom.models.hparams import AlexNetParams, CNNParams, at_least_one
from sparkloom.models.outputs import ClassifierOutput

# AlexNet geometry per stem: conv1 (kernel, stride, padding) and the three max pools (kernel,
# stride). conv2-conv5 keep the spatial size in both stems, so these alone fix the output size.
STEM_CONV1 = {"imagenet": (11, 4, 2), "small": (3, 1, 1)}
STEM_POOL = {"imagenet": (3, 2), "small": (2, 2)}
ALEXNET_CHANNELS = (96, 256, 384, 384, 256)  # conv1..conv5 in the paper
ALEXNET_FC = 4096  # fc6 and fc7
SMALL_STEM_BELOW = 64  # "auto" picks the small stem when min(height, width) is below this


@dataclass(kw_only=True)
class ImageShape:
    """What the data decides about an image model: its input and its classes."""

    in_channels: int
    height: int
    width: int
    num_classes: int

    def __post_init__(self) -> None:
        at_least_one(self, "in_channels", "height", "width", "num_classes")


@dataclass(kw_only=True)
class CNNConfig(ImageShape, CNNParams):
    in_channels: int = 1
    height: int = 28
    width: int = 28
    num_classes: int = 10

    def __post_init__(self) -> None:
        CNNParams.__post_init__(self)
        ImageShape.__post_init__(self)
        if min(self.height, self.width) < 4:
            raise ValueError(
                f"SmallCNN halves the image twice, so it needs at least 4x4 images, got "
                f"{self.height}x{self.width}; resize (upsample) the images"
            )


@dataclass(kw_only=True)
class AlexNetConfig(ImageShape, AlexNetParams):
    in_channels: int = 3
    height: int = 224
    width: int = 224
    num_classes: int = 1000

    def __post_init__(self) -> None:
        AlexNetParams.__post_init__(self)
        ImageShape.__post_init__(self)
        stem = self.resolved_stem
        smallest = next(n for n in range(1, 1024) if alexnet_feature_size(n, stem) >= 1)
        if min(self.height, self.width) < smallest:
            fix = "use stem='small' (or 'auto') or resize" if stem == "imagenet" else "resize"
            raise ValueError(
                f"AlexNet's {stem} stem needs images of at least {smallest}x{smallest}, got "
                f"{self.height}x{self.width}; {fix} the images"
            )

    @property
    def resolved_stem(self) -> str:
        if self.stem != "auto":
            return self.stem
        return "small" if min(self.height, self.width) < SMALL_STEM_BELOW else "imagenet"

    @property
    def channels(self) -> tuple[int, ...]:
        return tuple(_scaled(c, self.width_mult) for c in ALEXNET_CHANNELS)

    @property
    def fc_dim(self) -> int:
        return _scaled(ALEXNET_FC, self.width_mult)


def _scaled(channels: int, width_mult: float) -> int:
    return max(8, round(channels * width_mult))


def alexnet_feature_size(n: int, stem: str) -> int:
    """Side of AlexNet's last feature map for an n-pixel input side (0: too small)."""
    k, s, p = STEM_CONV1[stem]
    pool_k, pool_s = STEM_POOL[stem]
    n = (n + 2 * p - k) // s + 1 if n + 2 * p >= k else 0
    for _ in range(3):
        n = (n - pool_k) // pool_s + 1 if n >= pool_k else 0
    return n


def conv_block(
    in_channels: int, out_channels: int, kernel_size: int, batch_norm: bool, **conv_kw
) -> nn.Sequential:
    """Conv -> (BatchNorm) -> ReLU."""
    # BatchNorm's shift makes a conv bias redundant.
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, bias=not batch_norm, **conv_kw)
    norm = [nn.BatchNorm2d(out_channels)] if batch_norm else []
    return nn.Sequential(conv, *norm, nn.ReLU(inplace=True))


def he_init_(module: nn.Module) -> None:
    """He et al. (2015) normal init for ReLU networks; BatchNorm starts as the identity."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            mode = "fan_out" if isinstance(m, nn.Conv2d) else "fan_in"
            nn.init.kaiming_normal_(m.weight, mode=mode, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def check_images(images: torch.Tensor, cfg: CNNConfig | AlexNetConfig) -> None:
    expected = (cfg.in_channels, cfg.height, cfg.width)
    if images.ndim != 4 or tuple(images.shape[1:]) != expected:
        raise ValueError(
            f"expected images of shape (B, C, H, W) = (B, {', '.join(map(str, expected))}) "
            f"as configured, got {tuple(images.shape)}"
        )
    if not images.is_floating_point():
        raise TypeError(
            f"expected float images, got {images.dtype}; scale uint8 pixels with "
            f"sparkloom.models.augment.ImageBatchTransform first"
        )


class SmallCNN(nn.Module):
    """Two conv + max-pool stages, a ReLU dense layer, dropout, readout ("Deep MNIST")."""

    def __init__(self, cfg: CNNConfig):
        super().__init__()
        self.cfg = cfg
        c1, c2, k = cfg.conv1_channels, cfg.conv2_channels, cfg.kernel_size
        self.conv1 = conv_block(cfg.in_channels, c1, k, cfg.batch_norm, padding="same")
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = conv_block(c1, c2, k, cfg.batch_norm, padding="same")
        self.pool2 = nn.MaxPool2d(2)
        flat = c2 * (cfg.height // 4) * (cfg.width // 4)
        self.fc1 = nn.Linear(flat, cfg.hidden_dim)
        if cfg.init == "he":
            he_init_(self)
        # Built after he_init_ so it keeps its own small init.
        self.head = ClassificationHead(cfg.hidden_dim, cfg.num_classes, cfg.dropout)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> ClassifierOutput:
        check_images(images, self.cfg)
        x = self.conv1(images)  # (B, 32, H, W)
        x = self.pool1(x)  # (B, 32, H/2, W/2)
        x = self.conv2(x)  # (B, 64, H/2, W/2)
        x = self.pool2(x)  # (B, 64, H/4, W/4)
        x = x.flatten(1)  # (B, 64 * H/4 * W/4)
        x = F.relu(self.fc1(x))  # (B, 128)
        return self.head(x, labels)  # dropout -> readout: (B, num_classes)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


class AlexNetFeatures(nn.Module):
    """conv1..conv5 with overlapping max pooling after conv1, conv2 and conv5.

    Shapes below are for the imagenet stem at 224x224, width 1; the small stem keeps the size
    through every conv and halves it at each pool (28 -> 14 -> 7 -> 3).
    """

    def __init__(self, cfg: AlexNetConfig):
        super().__init__()
        stem, bn = cfg.resolved_stem, cfg.batch_norm
        c1, c2, c3, c4, c5 = cfg.channels
        k, s, p = STEM_CONV1[stem]
        self.conv1 = conv_block(cfg.in_channels, c1, k, bn, stride=s, padding=p)
        self.pool1 = nn.MaxPool2d(*STEM_POOL[stem])
        self.conv2 = conv_block(c1, c2, 5, bn, padding=2)
        self.pool2 = nn.MaxPool2d(*STEM_POOL[stem])
        self.conv3 = conv_block(c2, c3, 3, bn, padding=1)
        self.conv4 = conv_block(c3, c4, 3, bn, padding=1)
        self.conv5 = conv_block(c4, c5, 3, bn, padding=1)
        self.pool5 = nn.MaxPool2d(*STEM_POOL[stem])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.conv1(x))  # (B, 96, 55, 55) -> (B, 96, 27, 27)
        x = self.pool2(self.conv2(x))  # (B, 256, 27, 27) -> (B, 256, 13, 13)
        x = self.conv3(x)  # (B, 384, 13, 13)
        x = self.conv4(x)  # (B, 384, 13, 13)
        return self.pool5(self.conv5(x))  # (B, 256, 13, 13) -> (B, 256, 6, 6)


class AlexNetFC(nn.Module):
    """fc6 and fc7, each behind dropout as in the paper; fc8 is the classification head."""

    def __init__(self, in_features: int, cfg: AlexNetConfig):
        super().__init__()
        self.dropout6 = nn.Dropout(cfg.dropout)
        self.fc6 = nn.Linear(in_features, cfg.fc_dim)
        self.dropout7 = nn.Dropout(cfg.dropout)
        self.fc7 = nn.Linear(cfg.fc_dim, cfg.fc_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc6(self.dropout6(x)))  # (B, 4096)
        return F.relu(self.fc7(self.dropout7(x)))  # (B, 4096)


class AlexNet(nn.Module):
    """AlexNet: 5 conv + 3 fully connected layers (single-GPU, ungrouped variant)."""

    def __init__(self, cfg: AlexNetConfig):
        super().__init__()
        self.cfg = cfg
        self.features = AlexNetFeatures(cfg)
        # torchvision's fixed 6x6 grid lets the imagenet stem take any size >= its minimum;
        # the small stem's maps are already tiny, so they are flattened as they are.
        imagenet = cfg.resolved_stem == "imagenet"
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6)) if imagenet else nn.Identity()
        self.fc = AlexNetFC(self._flat_features(), cfg)
        if cfg.init == "he":
            he_init_(self)
        # fc8, built after he_init_ so it keeps its own small init. Dropout sits before fc6
        # and fc7 only, as in the paper.
        self.head = ClassificationHead(cfg.fc_dim, cfg.num_classes, dropout=0.0)

    @torch.no_grad()
    def _flat_features(self) -> int:
        cfg = self.cfg
        # Eval mode: a train-mode pass would fold the dummy batch into BatchNorm's running stats.
        mode = self.features.training
        self.features.eval()
        x = torch.zeros(1, cfg.in_channels, cfg.height, cfg.width)
        flat = self.avgpool(self.features(x)).flatten(1).shape[1]
        self.features.train(mode)
        return flat

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> ClassifierOutput:
        check_images(images, self.cfg)
        x = self.features(images)  # (B, 256, 6, 6)
        x = self.avgpool(x)  # (B, 256, 6, 6)
        x = x.flatten(1)  # (B, 9216)
        x = self.fc(x)  # (B, 4096)
        return self.head(x, labels)  # fc8: (B, num_classes)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
