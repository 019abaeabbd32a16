"""Small reference models for experiments and tests.

Every model here is an ordinary `torch.nn.Module` built only from module
classes defined at import time (no lambdas or closures), so instances can be
pickled, deep-copied and saved with ``torch.save``. Submodules carry stable,
readable names (``conv1``, ``layer1`` ... ``layer3``, ``fc`` for the ResNets;
``block1`` ... ``block3``, ``head`` for [`SmallCNN`][triqdef.models.SmallCNN]) so that callers can
tap them by name from ``model.named_modules()``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from triqdef.errors import ConfigError

__all__ = [
    "ZeroPadShortcut",
    "BasicBlock",
    "CifarResNet",
    "resnet20",
    "resnet56",
    "SmallCNN",
    "MLP",
]


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive int, got {value!r}")
    return value


class ZeroPadShortcut(nn.Module):
    """Parameter-free ResNet shortcut ("option A" of He et al., 2016).

    Subsamples the input spatially by ``stride`` (keeping every ``stride``-th
    pixel) and zero-pads the channel dimension from ``in_channels`` to
    ``out_channels``, splitting the padding evenly before and after the
    existing channels.

    Args:
        in_channels: Channels of the input.
        out_channels: Channels of the output; must be ``>= in_channels``.
        stride: Spatial subsampling factor.

    Shape:
        - Input: (B, in_channels, H, W)
        - Output: (B, out_channels, ceil(H / stride), ceil(W / stride))
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ConfigError(
                f"ZeroPadShortcut cannot reduce channels ({in_channels} -> {out_channels})"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        """Subsample and zero-pad ``x``.

        Args:
            x: Input feature map.

        Returns:
            The subsampled, channel-padded feature map.
        """
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        extra = self.out_channels - self.in_channels
        if extra:
            front = extra // 2
            x = F.pad(x, (0, 0, 0, 0, front, extra - front))
        return x

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection (CIFAR ResNet block).

    When the stride is not 1 or the channel count changes, the shortcut is a
    [`ZeroPadShortcut`][triqdef.models.ZeroPadShortcut]; otherwise it is the identity.

    Args:
        in_channels: Channels of the input.
        out_channels: Channels of the output.
        stride: Stride of the first convolution.

    Shape:
        - Input: (B, in_channels, H, W)
        - Output: (B, out_channels, ceil(H / stride), ceil(W / stride))
    """

    expansion = 1

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(
            in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False
        )
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(
            out_channels, out_channels, kernel_size=3, stride=1, padding=1, bias=False
        )
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module
        if stride != 1 or in_channels != out_channels:
            self.shortcut = ZeroPadShortcut(in_channels, out_channels, stride)
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block.

        Args:
            x: Input feature map.

        Returns:
            ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``.
        """
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR-style ResNet of He et al. (2016), "Deep Residual Learning", Sec. 4.2.

    A 3x3 stem convolution with 16 channels, then three stages of ``n``
    [`BasicBlock`][triqdef.models.BasicBlock]s with 16, 32 and 64 channels (the first block of
    stages 2 and 3 has stride 2 and a parameter-free zero-padding shortcut),
    global average pooling and a linear classifier. The depth is ``6n + 2``:
    20 gives ResNet-20 (~0.27M parameters), 56 gives ResNet-56 (~0.85M).

    Submodules: ``conv1``, ``bn1``, ``relu``, ``layer1``, ``layer2``,
    ``layer3``, ``avgpool``, ``fc``.

    Args:
        depth: Network depth; must satisfy ``depth = 6n + 2`` with ``n >= 1``
            (8, 14, 20, 32, 44, 56, 110, ...).
        num_classes: Number of output logits.
        in_channels: Channels of the input images.

    Raises:
        ConfigError: If ``depth`` is not of the form ``6n + 2`` or another
            argument is not a positive int.

    Shape:
        - Input: (B, in_channels, H, W), e.g. (B, 3, 32, 32).
        - Output: (B, num_classes)
    """

    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise ConfigError(
                f"CifarResNet depth must be 6n + 2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, ...),"
                f" got {depth!r}"
            )
        _check_positive_int("num_classes", num_classes)
        _check_positive_int("in_channels", in_channels)
        n = (depth - 2) // 6
        self.depth = depth
        self.num_classes = num_classes
        self.in_channels = in_channels

        self.conv1 = nn.Conv2d(in_channels, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_stage(16, 16, n, stride=1)
        self.layer2 = self._make_stage(16, 32, n, stride=2)
        self.layer3 = self._make_stage(32, 64, n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        _kaiming_init(self)

    @staticmethod
    def _make_stage(in_channels: int, out_channels: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_channels, out_channels, stride)]
        layers += [BasicBlock(out_channels, out_channels, 1) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Classify a batch of images.

        Args:
            x: Images of shape (B, in_channels, H, W), e.g. (B, 3, 32, 32).

        Returns:
            Logits of shape (B, num_classes).
        """
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def resnet20(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-20 for 32x32 images (n = 3 blocks per stage, ~0.27M parameters).

    Args:
        num_classes: Number of output logits.
        in_channels: Channels of the input images.

    Returns:
        A freshly initialised [`CifarResNet`][triqdef.models.CifarResNet] of depth 20.

    Shape:
        - Input: (B, in_channels, H, W), e.g. (B, 3, 32, 32).
        - Output: (B, num_classes)
    """
    return CifarResNet(20, num_classes=num_classes, in_channels=in_channels)


def resnet56(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-56 for 32x32 images (n = 9 blocks per stage, ~0.85M parameters).

    Args:
        num_classes: Number of output logits.
        in_channels: Channels of the input images.

    Returns:
        A freshly initialised [`CifarResNet`][triqdef.models.CifarResNet] of depth 56.

    Shape:
        - Input: (B, in_channels, H, W), e.g. (B, 3, 32, 32).
        - Output: (B, num_classes)
    """
    return CifarResNet(56, num_classes=num_classes, in_channels=in_channels)


def _conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


class SmallCNN(nn.Module):
    """Small convolutional classifier for 28x28 grayscale images (~59k parameters).

    Three conv-BN-ReLU blocks (``width``, ``2 * width``, ``2 * width``
    channels; the first two end with 2x2 max pooling), adaptive average
    pooling to 2x2 (which keeps a little spatial layout, worth a few points of
    accuracy over global pooling on Fashion-MNIST) and a linear head. With
    Adam (lr 1e-3, batch 128) one epoch of Fashion-MNIST reaches about 85%
    test accuracy. Submodules: ``block1``, ``block2``, ``block3``
    (each an ``nn.Sequential``), ``pool``, ``head``.

    Args:
        in_channels: Channels of the input images.
        num_classes: Number of output logits.
        width: Channels of the first block; later blocks use ``2 * width``.

    Raises:
        ConfigError: If an argument is not a positive int.

    Shape:
        - Input: (B, in_channels, H, W) with H, W >= 8, e.g. (B, 1, 28, 28).
        - Output: (B, num_classes)
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        _check_positive_int("in_channels", in_channels)
        _check_positive_int("num_classes", num_classes)
        _check_positive_int("width", width)
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.width = width
        self.block1 = nn.Sequential(*_conv_bn_relu(in_channels, width), nn.MaxPool2d(2))
        self.block2 = nn.Sequential(*_conv_bn_relu(width, 2 * width), nn.MaxPool2d(2))
        self.block3 = nn.Sequential(*_conv_bn_relu(2 * width, 2 * width))
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.head = nn.Linear(2 * width * 2 * 2, num_classes)
        _kaiming_init(self)

    def forward(self, x: Tensor) -> Tensor:
        """Classify a batch of images.

        Args:
            x: Images of shape (B, in_channels, H, W), e.g. (B, 1, 28, 28).

        Returns:
            Logits of shape (B, num_classes).
        """
        x = self.block3(self.block2(self.block1(x)))
        return self.head(torch.flatten(self.pool(x), 1))


class MLP(nn.Module):
    """Multi-layer perceptron: flatten, then Linear/ReLU layers, then a linear head.

    Submodules: ``flatten``, ``features`` (an ``nn.Sequential`` of
    Linear/ReLU pairs, empty when ``hidden`` is empty), ``fc``.

    Args:
        in_features: Number of input features after flattening, e.g. 784 for
            (B, 1, 28, 28) images.
        hidden: Widths of the hidden layers.
        num_classes: Number of output logits.

    Raises:
        ConfigError: If a width is not a positive int.

    Shape:
        - Input: (B, *) with ``in_features`` elements per sample, e.g. (B, 1, 28, 28).
        - Output: (B, num_classes)
    """

    def __init__(
        self, in_features: int, hidden: Sequence[int] = (256, 128), num_classes: int = 10
    ) -> None:
        super().__init__()
        _check_positive_int("in_features", in_features)
        _check_positive_int("num_classes", num_classes)
        widths = [_check_positive_int("hidden width", h) for h in hidden]
        self.in_features = in_features
        self.num_classes = num_classes
        self.flatten = nn.Flatten()
        layers: list[nn.Module] = []
        prev = in_features
        for h in widths:
            layers += [nn.Linear(prev, h), nn.ReLU(inplace=True)]
            prev = h
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(prev, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Classify a batch of inputs.

        Args:
            x: Inputs of shape (B, *) with ``in_features`` elements per sample.

        Returns:
            Logits of shape (B, num_classes).
        """
        return self.fc(self.features(self.flatten(x)))


def _kaiming_init(model: nn.Module) -> None:
    """Kaiming-normal weights (fan-out for convs, fan-in for linears), unit BN, zero bias."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
