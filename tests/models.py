"""A zoo of small, named model builders shared by the test suite.

Why a zoo: every pass test needs the same handful of structural situations -- a
residual add, fan-out, concat, depthwise conv, a shared module, conv with and without
bias, something untraceable, nothing to do. Building them once, with a drawing each,
keeps the pass tests short and makes "which shape of graph broke?" answerable by name
(graphsurgeon's ``toposort_diamond_graph`` style).

Conventions every builder follows:

* It returns the model in **eval mode**, because effopt optimizes trained models for
  inference and BatchNorm folding is only valid with frozen statistics.
* Weights are drawn from a fixed seed inside ``torch.random.fork_rng``, so two calls
  give identical parameters and the caller's global RNG state is left untouched.
* Every BatchNorm gets random running statistics, weight and bias through
  :func:`randomize_bn`. A freshly built BN is the identity (mean 0, var 1, weight 1,
  bias 0), so a folding pass that silently did nothing would still match numerically;
  randomizing makes such a bug visible (Sony MCT's BN-folding test does the same).
* Each builder has a module-level ``*_INPUT`` shape constant and an entry in
  :data:`ZOO`; :func:`make_input` draws a deterministic input of that shape.

Example::

    builder, shape = ZOO["resnet_style"]
    model = builder()                      # eval mode, randomized BN
    y = model(make_input(shape))           # shape [2, 10]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "ZOO",
    "randomize_bn",
    "make_input",
    "seeded",
    "MNIST_CLASSIC_LAYER_FLOPS",
    "MNIST_CLASSIC_TOTAL_FLOPS",
    "resnet_style",
    "vgg_style",
    "mobilenet_style",
    "conv1d_net",
    "mnist_classic_cnn",
    "mlp",
    "tiny_transformer",
    "shared_module_net",
    "fanout_net",
    "concat_net",
    "untraceable_net",
    "dropout_identity_net",
    "bn_without_running_stats",
    "Gate",
]

# ---------------------------------------------------------------------------
# Input shapes (batch first). Small on purpose: the whole zoo runs in well under a
# second on a CPU.
# ---------------------------------------------------------------------------
RESNET_STYLE_INPUT: tuple[int, ...] = (2, 3, 16, 16)
VGG_STYLE_INPUT: tuple[int, ...] = (2, 3, 16, 16)
MOBILENET_STYLE_INPUT: tuple[int, ...] = (2, 3, 16, 16)
CONV1D_NET_INPUT: tuple[int, ...] = (2, 4, 32)
MNIST_CLASSIC_CNN_INPUT: tuple[int, ...] = (1, 1, 28, 28)
MLP_INPUT: tuple[int, ...] = (2, 64)
TINY_TRANSFORMER_INPUT: tuple[int, ...] = (2, 16, 32)
SHARED_MODULE_NET_INPUT: tuple[int, ...] = (2, 3, 16, 16)
FANOUT_NET_INPUT: tuple[int, ...] = (2, 3, 16, 16)
CONCAT_NET_INPUT: tuple[int, ...] = (2, 3, 16, 16)
UNTRACEABLE_NET_INPUT: tuple[int, ...] = (2, 3, 16, 16)
DROPOUT_IDENTITY_NET_INPUT: tuple[int, ...] = (2, 3, 16, 16)
BN_WITHOUT_RUNNING_STATS_INPUT: tuple[int, ...] = (2, 3, 16, 16)

#: Hand count of FLOPs for :func:`mnist_classic_cnn` on one ``[1, 1, 28, 28]`` image,
#: per conv/linear layer in graph order, with 1 MAC = 2 FLOPs and bias adds not counted:
#:
#: ====================  ==========================  =========  =========
#: layer                 MACs = outputs x MACs/out    MACs       FLOPs
#: ====================  ==========================  =========  =========
#: conv1 1->5, 3x3       (5*26*26) x (1*3*3)          30,420     60,840
#: conv2 5->5, 3x3       (5*24*24) x (5*3*3)          129,600    259,200
#: fc1 2880->128         128 x 2880                   368,640    737,280
#: fc2 128->10           10 x 128                     1,280      2,560
#: ====================  ==========================  =========  =========
MNIST_CLASSIC_LAYER_FLOPS: tuple[int, ...] = (60840, 259200, 737280, 2560)
#: 60,840 + 259,200 + 737,280 + 2,560 = 1,059,880 FLOPs (529,940 MACs).
MNIST_CLASSIC_TOTAL_FLOPS: int = 1_059_880


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------
@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed the global RNG for module construction, then restore the caller's state.

    Why: ``nn.Module`` initialisers take no generator, so the only way to make a
    builder deterministic is the global seed; forking keeps that from leaking into
    the test that called the builder.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def randomize_bn(model: nn.Module, seed: int) -> nn.Module:
    """Give every BatchNorm in ``model`` non-trivial statistics and affine parameters.

    Returns ``model`` (edited in place) so builders can chain it. Draws, per BN of
    ``C`` channels, from one ``torch.Generator(seed)`` in ``named_modules`` order:

    * ``running_mean`` ~ N(0, 0.5^2)
    * ``running_var``  ~ U(0.5, 2.0)       (strictly positive, as a real BN's is)
    * ``weight``       ~ +-U(0.5, 1.5)     (random sign: a negative gamma must fold too)
    * ``bias``         ~ N(0, 0.5^2)

    BNs without running stats (``track_running_stats=False``) or without affine
    parameters get only what they have. Example: after ``randomize_bn(m, 0)`` a
    ``BatchNorm2d(8)`` no longer computes the identity in eval mode.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, module in model.named_modules():
            if not isinstance(module, _BatchNorm):
                continue
            channels = module.num_features
            if module.running_mean is not None and module.running_var is not None:
                module.running_mean.copy_(0.5 * torch.randn(channels, generator=generator))
                module.running_var.copy_(0.5 + 1.5 * torch.rand(channels, generator=generator))
            if module.weight is not None and module.bias is not None:
                magnitude = 0.5 + torch.rand(channels, generator=generator)
                sign = torch.where(torch.rand(channels, generator=generator) < 0.5, -1.0, 1.0)
                module.weight.copy_(magnitude * sign)
                module.bias.copy_(0.5 * torch.randn(channels, generator=generator))
    return model


def make_input(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """A deterministic standard-normal float32 input of ``shape``.

    Example: ``make_input((2, 64)).shape == (2, 64)``; same seed, same tensor.
    """
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _finish(model: nn.Module, seed: int) -> nn.Module:
    """Randomize BN statistics and switch to eval: the common tail of every builder."""
    return randomize_bn(model, seed).eval()


# ---------------------------------------------------------------------------
# resnet_style
# ---------------------------------------------------------------------------
class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock: two 3x3 conv-bn, a residual add, then ReLU.

    Like torchvision, one stateless ``relu`` module is called twice.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNetStyle(nn.Module):
    """See :func:`resnet_style`."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.layer1 = BasicBlock(8, 8, stride=1)
        self.layer2 = BasicBlock(8, 16, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet_style(seed: int = 0) -> nn.Module:
    """A two-block ResNet: identity residual and a strided 1x1-conv shortcut.

    Input ``[2, 3, 16, 16]`` -> output ``[2, 10]``. Convs have no bias (as in
    torchvision), so folding must create one. Shapes per image::

        x [3,16,16]
        conv1 3x3 3->8 ─ bn1 ─ relu                         [8,16,16]
           │
           ├──────────────────────────────┐  layer1 (identity shortcut)
        conv1 3x3 ─ bn1 ─ relu ─ conv2 ─ bn2 │
           └────────── add ◄──────────────┘ ─ relu          [8,16,16]
           │
           ├──────────────────────────────────────┐  layer2 (stride 2)
        conv1 3x3 s2 8->16 ─ bn1 ─ relu ─ conv2 ─ bn2  downsample: conv 1x1 s2 ─ bn
           └────────── add ◄──────────────────────┘ ─ relu  [16,8,8]
        avgpool ─ flatten ─ fc 16->10                       [10]
    """
    with seeded(seed):
        model = ResNetStyle()
    return _finish(model, seed)


# ---------------------------------------------------------------------------
# vgg_style
# ---------------------------------------------------------------------------
def vgg_style(seed: int = 0) -> nn.Module:
    """A VGG-like stack: biased convs before BN, and a Linear-BN1d-Dropout classifier.

    Input ``[2, 3, 16, 16]`` -> output ``[2, 10]``. Every conv has a bias, so folding
    must merge the conv bias with the BN shift. Per image::

        features.0  conv 3x3 3->8 (bias)  ─ features.1 bn ─ relu   [8,16,16]
        features.3  conv 3x3 8->8 (bias)  ─ features.4 bn ─ relu   [8,16,16]
        features.6  maxpool 2                                      [8,8,8]
        features.7  conv 3x3 8->16 (bias) ─ features.8 bn ─ relu   [16,8,8]
        features.10 conv 3x3 16->16(bias) ─ features.11 bn ─ relu  [16,8,8]
        features.13 maxpool 2                                      [16,4,4]
        flatten                                                    [256]
        classifier.0 linear 256->32 ─ classifier.1 bn1d ─ relu ─ dropout(0.5)
        classifier.4 linear 32->10                                 [10]
    """
    with seeded(seed):
        model = nn.Sequential()
        model.add_module(
            "features",
            nn.Sequential(
                nn.Conv2d(3, 8, 3, padding=1, bias=True),
                nn.BatchNorm2d(8),
                nn.ReLU(),
                nn.Conv2d(8, 8, 3, padding=1, bias=True),
                nn.BatchNorm2d(8),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Conv2d(8, 16, 3, padding=1, bias=True),
                nn.BatchNorm2d(16),
                nn.ReLU(),
                nn.Conv2d(16, 16, 3, padding=1, bias=True),
                nn.BatchNorm2d(16),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ),
        )
        model.add_module("flatten", nn.Flatten(1))
        model.add_module(
            "classifier",
            nn.Sequential(
                nn.Linear(16 * 4 * 4, 32),
                nn.BatchNorm1d(32),
                nn.ReLU(),
                nn.Dropout(0.5),
                nn.Linear(32, 10),
            ),
        )
    return _finish(model, seed)


# ---------------------------------------------------------------------------
# mobilenet_style
# ---------------------------------------------------------------------------
class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand, 3x3 depthwise, 1x1 linear projection.

    The expand stage is omitted when ``expand_ratio == 1`` (as in MobileNetV2's first
    block); the residual add exists only for stride 1 with equal channels.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = in_channels * expand_ratio
        self.use_residual = stride == 1 and in_channels == out_channels
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers += [
                nn.Conv2d(in_channels, hidden, 1, bias=False),
                nn.BatchNorm2d(hidden),
                nn.ReLU6(),
            ]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_residual:
            return x + self.conv(x)
        return self.conv(x)


def mobilenet_style(seed: int = 0) -> nn.Module:
    """A MobileNetV2-like net: depthwise convs (groups == channels) and linear bottlenecks.

    Input ``[2, 3, 16, 16]`` -> output ``[2, 10]``. Per image::

        stem  conv 3x3 s2 3->16 ─ bn ─ relu6                           [16,8,8]
        blocks.0 (t=1, residual):  ┌──────────────────────────────┐
                 dw 3x3 g=16 ─ bn ─ relu6 ─ pw 16->16 ─ bn ─ add ◄┘   [16,8,8]
        blocks.1 (t=4, s2, no residual):
                 pw 16->64 ─ bn ─ relu6 ─ dw 3x3 s2 g=64 ─ bn ─ relu6
                 ─ pw 64->24 ─ bn                                      [24,4,4]
        blocks.2 (t=4, residual):  ┌──────────────────────────────────────────┐
                 pw 24->96 ─ bn ─ relu6 ─ dw 3x3 g=96 ─ bn ─ relu6 ─ pw 96->24 ─ bn ─ add
        head  conv 1x1 24->64 ─ bn ─ relu6                             [64,4,4]
        pool  adaptive avgpool 1 ─ flatten ─ dropout(0.2) ─ linear 64->10
    """
    with seeded(seed):
        model = nn.Sequential()
        model.add_module(
            "stem",
            nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6()),
        )
        model.add_module(
            "blocks",
            nn.Sequential(
                InvertedResidual(16, 16, stride=1, expand_ratio=1),
                InvertedResidual(16, 24, stride=2, expand_ratio=4),
                InvertedResidual(24, 24, stride=1, expand_ratio=4),
            ),
        )
        model.add_module(
            "head",
            nn.Sequential(nn.Conv2d(24, 64, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU6()),
        )
        model.add_module("pool", nn.AdaptiveAvgPool2d(1))
        model.add_module("flatten", nn.Flatten(1))
        model.add_module("dropout", nn.Dropout(0.2))
        model.add_module("classifier", nn.Linear(64, 10))
    return _finish(model, seed)


# ---------------------------------------------------------------------------
# conv1d_net
# ---------------------------------------------------------------------------
def conv1d_net(seed: int = 0) -> nn.Module:
    """A 1-D conv net: folding must handle ``Conv1d`` + ``BatchNorm1d`` (3-D tensors).

    Input ``[2, 4, 32]`` -> output ``[2, 5]``. Per sequence::

        0 conv1d k3 4->8  ─ 1 bn1d ─ 2 relu     [8,32]
        3 conv1d k3 8->16 ─ 4 bn1d ─ 5 relu     [16,32]
        6 adaptive avgpool1d 1 ─ 7 flatten      [16]
        8 linear 16->5                          [5]
    """
    with seeded(seed):
        model = nn.Sequential(
            nn.Conv1d(4, 8, 3, padding=1),
            nn.BatchNorm1d(8),
            nn.ReLU(),
            nn.Conv1d(8, 16, 3, padding=1, bias=False),
            nn.BatchNorm1d(16),
            nn.ReLU(),
            nn.AdaptiveAvgPool1d(1),
            nn.Flatten(1),
            nn.Linear(16, 5),
        )
    return _finish(model, seed)


# ---------------------------------------------------------------------------
# mnist_classic_cnn
# ---------------------------------------------------------------------------
def mnist_classic_cnn(seed: int = 0) -> nn.Module:
    """The classic small MNIST CNN whose FLOPs are counted by hand.

    Input ``[1, 1, 28, 28]`` -> output ``[1, 10]``. No padding, no BN; the expected
    per-layer FLOPs are :data:`MNIST_CLASSIC_LAYER_FLOPS`. Per image::

        0 conv 3x3 1->5 ─ 1 relu     [5,26,26]    60,840 FLOPs
        2 conv 3x3 5->5 ─ 3 relu     [5,24,24]   259,200 FLOPs
        4 flatten                    [2880]
        5 linear 2880->128 ─ 6 relu  [128]       737,280 FLOPs
        7 linear 128->10             [10]          2,560 FLOPs
    """
    with seeded(seed):
        model = nn.Sequential(
            nn.Conv2d(1, 5, 3),
            nn.ReLU(),
            nn.Conv2d(5, 5, 3),
            nn.ReLU(),
            nn.Flatten(1),
            nn.Linear(5 * 24 * 24, 128),
            nn.ReLU(),
            nn.Linear(128, 10),
        )
    return _finish(model, seed)


# ---------------------------------------------------------------------------
# mlp
# ---------------------------------------------------------------------------
def mlp(seed: int = 0) -> nn.Module:
    """A plain MLP with nothing to fold: the "nothing to do" case for BN/dropout passes.

    Input ``[2, 64]`` -> output ``[2, 10]``::

        0 linear 64->32 ─ 1 relu ─ 2 linear 32->32 ─ 3 relu ─ 4 linear 32->10
    """
    with seeded(seed):
        model = nn.Sequential(
            nn.Linear(64, 32),
            nn.ReLU(),
            nn.Linear(32, 32),
            nn.ReLU(),
            nn.Linear(32, 10),
        )
    return _finish(model, seed)


# ---------------------------------------------------------------------------
# tiny_transformer
# ---------------------------------------------------------------------------
class SelfAttention(nn.Module):
    """Multi-head self-attention from Linear, reshape, transpose, matmul and softmax.

    Written by hand because ``nn.MultiheadAttention`` calls a fused functional that
    ``torch.fx`` does not trace into, which would hide the two matmuls a cost model
    must count: ``q @ k^T`` and ``attn @ v`` are each ``B*heads*T*T*head_dim`` MACs.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"SelfAttention: dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, dim = x.size(0), x.size(1), x.size(2)
        q = self.q(x).reshape(batch, seq, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(x).reshape(batch, seq, self.heads, self.head_dim).transpose(1, 2)
        v = self.v(x).reshape(batch, seq, self.heads, self.head_dim).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-2, -1)) * self.scale  # [B, H, T, T]
        attn = torch.softmax(scores, dim=-1)
        out = torch.matmul(attn, v)  # [B, H, T, head_dim]
        out = out.transpose(1, 2).reshape(batch, seq, dim)
        return self.proj(out)


class EncoderLayer(nn.Module):
    """Pre-norm transformer encoder layer: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(self.act(self.fc1(self.ln2(x))))


class TinyTransformer(nn.Module):
    """See :func:`tiny_transformer`."""

    def __init__(
        self, dim: int = 32, heads: int = 2, seq: int = 16, layers: int = 2, num_classes: int = 10
    ) -> None:
        super().__init__()
        self.pos = nn.Parameter(0.02 * torch.randn(1, seq, dim))
        self.layers = nn.ModuleList(EncoderLayer(dim, heads, 2 * dim) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x).mean(dim=1))


def tiny_transformer(seed: int = 0) -> nn.Module:
    """A 2-layer, 2-head pre-norm transformer encoder (dim 32, seq 16) built by hand.

    Input ``[2, 16, 32]`` float embeddings -> output ``[2, 10]``. Exercises matmul
    counting, reshape/transpose, softmax, LayerNorm, GELU and a ``get_attr``
    (positional embedding). Per sequence, for each of ``layers.0`` and ``layers.1``::

        x [16,32] + pos
           ├──────────────────────────────────────────────────────┐
        ln1 ─ q,k,v linear 32->32 ─ reshape [16,2,16] ─ transpose [2,16,16]
            ─ matmul(q, k^T) [2,16,16] ─ *scale ─ softmax ─ matmul(·, v)
            ─ transpose ─ reshape [16,32] ─ proj 32->32 ─ add ◄────┘
           ├──────────────────────────────────────┐
        ln2 ─ fc1 32->64 ─ gelu ─ fc2 64->32 ─ add ◄┘
        norm ─ mean over seq ─ head 32->10       [10]
    """
    with seeded(seed):
        model = TinyTransformer()
    return _finish(model, seed)


# ---------------------------------------------------------------------------
# shared_module_net
# ---------------------------------------------------------------------------
class SharedModuleNet(nn.Module):
    """See :func:`shared_module_net`."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(8)
        self.bn_b = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        a = F.relu(self.bn_a(self.shared(x)))
        b = F.relu(self.bn_b(self.shared(a)))
        return self.fc(torch.flatten(self.pool(b), 1))


def shared_module_net(seed: int = 0) -> nn.Module:
    """One ``nn.Conv2d`` instance called twice, each call followed by a different BN.

    Input ``[2, 3, 16, 16]`` -> output ``[2, 10]``. Folding either BN into ``shared``
    would corrupt the other call, so a BN-folding pass must decline both (or clone the
    conv first). Per image::

        stem conv 3->8 ─ relu
           ─ shared conv 8->8 ─ bn_a ─ relu
           ─ shared conv 8->8 ─ bn_b ─ relu      (same weights as above)
           ─ pool ─ flatten ─ fc 8->10
    """
    with seeded(seed):
        model = SharedModuleNet()
    return _finish(model, seed)


# ---------------------------------------------------------------------------
# fanout_net
# ---------------------------------------------------------------------------
class FanoutNet(nn.Module):
    """See :func:`fanout_net`."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv(x)
        y = self.bn(c)
        return F.relu(y + c)


def fanout_net(seed: int = 0) -> nn.Module:
    """A conv whose output feeds both its BN and a residual add: folding must decline.

    Input ``[2, 3, 16, 16]`` -> output ``[2, 8, 16, 16]``. Folding ``bn`` into
    ``conv`` would also change the un-normalized ``c`` used by the add::

        x ─ conv 3->8 ─ c ─ bn ─ y ─ add ─ relu
                        └──────────────┘
    """
    with seeded(seed):
        model = FanoutNet()
    return _finish(model, seed)


# ---------------------------------------------------------------------------
# concat_net
# ---------------------------------------------------------------------------
class ConcatNet(nn.Module):
    """See :func:`concat_net`."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(8)
        self.conv_b = nn.Conv2d(3, 8, 1)
        self.bn_b = nn.BatchNorm2d(8)
        self.fuse = nn.Conv2d(16, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.bn_a(self.conv_a(x))
        b = self.bn_b(self.conv_b(x))
        return self.fuse(torch.cat([a, b], dim=1))


def concat_net(seed: int = 0) -> nn.Module:
    """Two conv-BN branches joined by ``torch.cat`` along channels, then a 1x1 conv.

    Input ``[2, 3, 16, 16]`` -> output ``[2, 8, 16, 16]``. Both BNs fold; channel
    pruning must map ``fuse``'s input channels 0..7 to branch a and 8..15 to branch b::

           ┌─ conv_a 3x3 3->8 (no bias) ─ bn_a ─┐
        x ─┤                                    cat [16] ─ fuse conv 1x1 16->8
           └─ conv_b 1x1 3->8 (bias)    ─ bn_b ─┘
    """
    with seeded(seed):
        model = ConcatNet()
    return _finish(model, seed)


# ---------------------------------------------------------------------------
# untraceable_net
# ---------------------------------------------------------------------------
class Gate(nn.Module):
    """Data-dependent Python control flow: ``torch.fx.symbolic_trace`` cannot trace this.

    Tracing fails with "symbolically traced variables cannot be used as inputs to
    control flow"; marking ``Gate`` as a leaf module makes the enclosing model traceable.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x * 2
        return x


class UntraceableNet(nn.Module):
    """See :func:`untraceable_net`."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.gate = Gate()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.gate(self.relu(self.conv(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def untraceable_net(seed: int = 0) -> nn.Module:
    """A plain conv net except for ``gate``, whose forward branches on ``x.sum()``.

    Input ``[2, 3, 16, 16]`` -> output ``[2, 10]``. ``symbolic_trace`` fails inside
    module ``gate``; tracing with ``Gate`` as a leaf succeeds::

        x ─ conv 3->8 ─ relu ─ gate (if x.sum() > 0: x*2) ─ pool ─ flatten ─ fc 8->10
    """
    with seeded(seed):
        model = UntraceableNet()
    return _finish(model, seed)


# ---------------------------------------------------------------------------
# dropout_identity_net
# ---------------------------------------------------------------------------
class DropoutIdentityNet(nn.Module):
    """See :func:`dropout_identity_net`."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.dropout = nn.Dropout(0.5)
        self.identity = nn.Identity()
        self.relu = nn.ReLU()
        self.fc = nn.Linear(8 * 16 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        unused = x * 3  # noqa: F841 -- dead code on purpose: the DCE target
        x = self.relu(self.identity(self.dropout(self.conv(x))))
        x = torch.flatten(x, 1)
        x = F.dropout(x, p=0.5, training=self.training)
        return self.fc(x)


def dropout_identity_net(seed: int = 0) -> nn.Module:
    """Inference no-ops to remove: ``nn.Dropout``, ``nn.Identity``, ``F.dropout``, dead code.

    Input ``[2, 3, 16, 16]`` -> output ``[2, 10]``. ``unused = x * 3`` is traced but
    never used, so dead-code elimination must drop it::

        x ─ conv 3->8 ─ dropout ─ identity ─ relu ─ flatten ─ F.dropout ─ fc 2048->10
        └─ mul(3) ─ (unused)
    """
    with seeded(seed):
        model = DropoutIdentityNet()
    return _finish(model, seed)


# ---------------------------------------------------------------------------
# bn_without_running_stats
# ---------------------------------------------------------------------------
class BnWithoutRunningStats(nn.Module):
    """See :func:`bn_without_running_stats`."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8, track_running_stats=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


def bn_without_running_stats(seed: int = 0) -> nn.Module:
    """A BN that normalizes with batch statistics even in eval mode: folding must decline.

    Input ``[2, 3, 16, 16]`` -> output ``[2, 8, 16, 16]``. With
    ``track_running_stats=False`` there are no frozen statistics to fold, and the
    output depends on the whole batch::

        x ─ conv 3->8 ─ bn (track_running_stats=False)
    """
    with seeded(seed):
        model = BnWithoutRunningStats()
    return _finish(model, seed)


# ---------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------
#: Every builder by name, with the input shape it expects. Insertion order is the order
#: the tests parametrize in, so test ids are stable.
ZOO: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "resnet_style": (resnet_style, RESNET_STYLE_INPUT),
    "vgg_style": (vgg_style, VGG_STYLE_INPUT),
    "mobilenet_style": (mobilenet_style, MOBILENET_STYLE_INPUT),
    "conv1d_net": (conv1d_net, CONV1D_NET_INPUT),
    "mnist_classic_cnn": (mnist_classic_cnn, MNIST_CLASSIC_CNN_INPUT),
    "mlp": (mlp, MLP_INPUT),
    "tiny_transformer": (tiny_transformer, TINY_TRANSFORMER_INPUT),
    "shared_module_net": (shared_module_net, SHARED_MODULE_NET_INPUT),
    "fanout_net": (fanout_net, FANOUT_NET_INPUT),
    "concat_net": (concat_net, CONCAT_NET_INPUT),
    "untraceable_net": (untraceable_net, UNTRACEABLE_NET_INPUT),
    "dropout_identity_net": (dropout_identity_net, DROPOUT_IDENTITY_NET_INPUT),
    "bn_without_running_stats": (bn_without_running_stats, BN_WITHOUT_RUNNING_STATS_INPUT),
}
