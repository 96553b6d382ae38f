"""Tiny models, one per channel coupling kind, shared by the channel-analysis and pruning tests.

Loaded by path (``load_zoo()``) because the tests import in importlib mode. Every model takes
``x`` of shape ``[2, 3, 8, 8]`` unless its ``INPUT`` says otherwise, and has random BatchNorm
statistics so that a pruned channel changes the output (a check that cannot fail proves nothing).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BatchNorm/LayerNorm/GroupNorm statistics and affine parameters; eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)) and \
                    getattr(m, "weight", None) is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model.eval()


def cbr(cin, cout, k=3, stride=1, groups=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU())


class Sequential(nn.Module):
    """conv -> BN -> relu -> conv -> BN -> relu -> pool -> flatten -> linear (the classifier)."""

    def __init__(self):
        super().__init__()
        self.a = cbr(3, 8)
        self.b = cbr(8, 16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.b(self.a(x)), 1), 1))


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 8)
        self.b1 = cbr(8, 8)
        self.b2 = nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8))
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        s = self.stem(x)
        return self.head(F.relu(s + self.b2(self.b1(s))))


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = cbr(3, 4)
        self.b = cbr(3, 6)
        self.bn = nn.BatchNorm2d(10)
        self.head = nn.Conv2d(10, 5, 1)

    def forward(self, x):
        return self.head(self.bn(torch.cat([self.a(x), self.b(x)], dim=1)))


class Depthwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.expand = cbr(3, 8, 1)
        self.dw = cbr(8, 8, 3, groups=8)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.dw(self.expand(x)))


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.expand = cbr(3, 16, 1)
        self.gconv = cbr(16, 16, 3, groups=4)  # 4 groups of 4 channels
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.head(self.gconv(self.expand(x)))


class FlattenLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = cbr(3, 8, stride=2)  # 8 x 4 x 4
        self.fc1 = nn.Linear(8 * 4 * 4, 12)
        self.fc2 = nn.Linear(12, 10)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(self.a(x).view(x.size(0), -1))))


class SplitChunk(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = cbr(3, 8)
        self.left = cbr(4, 4)
        self.right = cbr(4, 6)
        self.head = nn.Conv2d(10, 4, 1)

    def forward(self, x):
        p, q = self.a(x).chunk(2, dim=1)
        r, s = torch.split(self.right(q), [2, 4], dim=1)
        return self.head(torch.cat([self.left(p), r, s], dim=1))


def channel_shuffle(x, groups: int):
    b, c, h, w = x.size()
    x = x.view(b, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(b, -1, h, w)


class Shuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = cbr(3, 8)
        self.b = cbr(3, 8)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.head(channel_shuffle(torch.cat([self.a(x), self.b(x)], 1), 2))


class SqueezeExcite(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = cbr(3, 8)
        self.fc1 = nn.Conv2d(8, 4, 1)
        self.fc2 = nn.Conv2d(4, 8, 1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.a(x)
        s = torch.sigmoid(self.fc2(F.silu(self.fc1(F.adaptive_avg_pool2d(y, 1)))))
        return self.head(y * s)


class LayerNormBlock(nn.Module):
    """ConvNeXt-like: depthwise conv, channels-last LayerNorm, MLP, layer scale, residual."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.dw = nn.Conv2d(8, 8, 3, 1, 1, groups=8)
        self.norm = nn.LayerNorm(8)
        self.up = nn.Linear(8, 16)
        self.down = nn.Linear(16, 8)
        self.gamma = nn.Parameter(torch.rand(8, 1, 1) + 0.5)
        self.norm2_w = nn.Parameter(torch.rand(8) + 0.5)
        self.norm2_b = nn.Parameter(torch.randn(8) * 0.1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        s = self.stem(x)
        y = self.dw(s).permute(0, 2, 3, 1)
        y = self.down(F.gelu(self.up(self.norm(y)))).permute(0, 3, 1, 2)
        s = s + self.gamma * y
        z = F.layer_norm(s.permute(0, 2, 3, 1), (8,), self.norm2_w, self.norm2_b, 1e-6)
        return self.head(z.mean(dim=(1, 2)))


class GroupNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, 1, 1)
        self.gn = nn.GroupNorm(4, 8)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(F.relu(self.gn(self.a(x))))


class Slicing(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = cbr(3, 8)
        self.head = nn.Conv2d(5, 4, 1)

    def forward(self, x):
        return self.head(self.a(x)[:, 3:])


class Functional(nn.Module):
    """Weights as parameters of the model, used through F.conv2d / F.linear."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.3)
        self.b1 = nn.Parameter(torch.randn(8) * 0.1)
        self.w2 = nn.Parameter(torch.randn(8, 2, 3, 3) * 0.3)  # groups=4
        self.fw = nn.Parameter(torch.randn(6, 8) * 0.3)

    def forward(self, x):
        y = F.relu(F.conv2d(x, self.w1, self.b1, padding=1))
        y = F.relu(F.conv2d(y, self.w2, None, 1, 1, 1, 4))
        return F.linear(y.mean(dim=(2, 3)), self.fw)


class Shared(nn.Module):
    """One conv applied twice (weights shared between the calls)."""

    def __init__(self):
        super().__init__()
        self.a = cbr(3, 8)
        self.shared = nn.Conv2d(8, 8, 3, 1, 1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.a(x)
        return self.head(F.relu(self.shared(F.relu(self.shared(y)))))


class Unknown(nn.Module):
    """An op the analysis does not know (a flip that reorders the channels)."""

    def __init__(self):
        super().__init__()
        self.a = cbr(3, 8)
        self.b = cbr(8, 8)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(torch.flip(self.b(self.a(x)), dims=(1,)))


def soft_gate(x):
    """A user's elementwise op, traced as one call (``torch.fx.wrap``): no built-in rule."""
    return x * torch.sigmoid(1.5 * x)


torch.fx.wrap("soft_gate")


class ChannelScale(nn.Module):
    """A user's leaf module (traced as one call): one learned scale per channel."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(channels) + 0.5)

    def forward(self, x):
        return x * self.weight.view(1, -1, 1, 1)


class CustomOps(nn.Module):
    """Ops the analysis has no rule for until a user registers one (capture with
    ``leaf_modules=[ChannelScale]``)."""

    def __init__(self):
        super().__init__()
        self.a = cbr(3, 8)
        self.scale = ChannelScale(8)
        self.b = cbr(8, 8)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(soft_gate(self.b(self.scale(self.a(x)))))


class MeanOverChannels(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = cbr(3, 8)
        self.b = cbr(8, 8)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.b(self.a(x))
        return self.head(y - y.mean(dim=1, keepdim=True))


class MaxOverChannels(MeanOverChannels):
    """A max over the channels: a removed channel (a zero in the reference) could be the max."""

    def forward(self, x):
        y = self.b(self.a(x))
        return self.head(y - y.amax(dim=1, keepdim=True))


class InputResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = cbr(3, 3)
        self.b = cbr(3, 8)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.b(x + self.a(x)))


class LinearOnly(nn.Module):
    """Nothing to prune: the only layer is the classifier."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 4)

    def forward(self, x):
        return self.fc(x)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(12, 32)
        self.bn = nn.BatchNorm1d(32)
        self.fc2 = nn.Linear(32, 16)
        self.fc3 = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(F.relu(self.bn(self.fc1(x))))))


# -- attention and the other ops of transformers (fxopt/prune/rules_attention.py) -------------
class Attention(nn.Module):
    """timm's ViT attention: one qkv Linear, reshape to heads, unbind, q @ k^T, softmax, @ v."""

    def __init__(self, dim=16, heads=2, sdpa=False, einsum=False):
        super().__init__()
        self.heads, self.sdpa, self.einsum = heads, sdpa, einsum
        self.scale = (dim // heads) ** -0.5  # a constant, as in timm (not from x.shape)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads) \
            .permute(2, 0, 3, 1, 4).unbind(0)
        if self.sdpa:
            o = F.scaled_dot_product_attention(q, k, v)
        elif self.einsum:
            a = torch.einsum("bhid,bhjd->bhij", q, k) * self.scale
            o = torch.einsum("bhij,bhjd->bhid", a.softmax(-1), v)
        else:
            o = ((q @ k.transpose(-2, -1)) * self.scale).softmax(-1) @ v
        return self.proj(o.transpose(1, 2).reshape(B, N, C))


class ViTBlock(nn.Module):
    """Tokens from a conv stem, a class token (expand + cat), a position embedding, one
    pre-norm block (attention + MLP, residuals), the class token to the head."""

    def __init__(self, attn_factory=Attention, dim=16):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 4, 4)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 5, dim))
        self.ln1, self.ln2, self.ln = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = attn_factory()
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, 4)

    def forward(self, x):
        t = self.stem(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], dim=1) + self.pos
        t = t + self.attn(self.ln1(t))
        t = t + self.fc2(F.gelu(self.fc1(self.ln2(t))))
        return self.head(self.ln(t)[:, 0])


class MHA(nn.Module):
    """torchvision's ViT attention: an nn.MultiheadAttention leaf, (x, x, x)."""

    def __init__(self, dim=16, heads=4, batch_first=True):
        super().__init__()
        self.batch_first = batch_first
        self.mha = nn.MultiheadAttention(dim, heads, batch_first=batch_first)

    def forward(self, x):
        if not self.batch_first:
            x = x.transpose(0, 1)
        y, _ = self.mha(x, x, x, need_weights=False)
        return y if self.batch_first else y.transpose(0, 1)


class SelectiveKernel(nn.Module):
    """SKNet: two branches stacked, summed, a softmax over the branches gates each."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 8)
        self.b1, self.b2 = cbr(8, 8), cbr(8, 8, k=1)
        self.fc = nn.Conv2d(8, 16, 1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        s = self.stem(x)
        y = torch.stack([self.b1(s), self.b2(s)], dim=1)  # [N, 2, C, H, W]
        a = self.fc(y.sum(1).mean((2, 3), keepdim=True)).view(x.shape[0], 2, 8, 1, 1)
        return self.head((y * a.softmax(1)).sum(1))


class ExpandAsGate(nn.Module):
    """A squeeze-excite gate broadcast with ``expand_as`` (timm's ECA/SE variants)."""

    def __init__(self):
        super().__init__()
        self.a = cbr(3, 8)
        self.se = nn.Conv2d(8, 8, 1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.a(x)
        g = torch.sigmoid(self.se(y.mean((2, 3), keepdim=True)))
        return self.head(y * g.expand_as(y))


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-V2's GRN, channels-last: a norm over space, a mean over the channels, and
    weights reshaped with ``view``."""

    def __init__(self):
        super().__init__()
        self.a = cbr(3, 8)
        self.weight = nn.Parameter(torch.rand(8) + 0.5)
        self.bias = nn.Parameter(torch.randn(8) * 0.1)
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        y = self.a(x).permute(0, 2, 3, 1)
        g = y.norm(p=2, dim=(1, 2), keepdim=True)
        n = g / (g.mean(dim=-1, keepdim=True) + 1e-6)
        y = y + torch.addcmul(self.bias.view(1, 1, 1, -1), self.weight.view(1, 1, 1, -1), y * n)
        return self.head(self.fc(y).mean((1, 2)))


X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
X_FLAT = torch.randn(4, 12, generator=torch.Generator().manual_seed(2))

# name -> (factory, input, coupling kind the analysis must report)
ZOO = {
    "sequential": (Sequential, X, None),
    "residual": (Residual, X, "residual"),
    "concat": (Concat, X, "concat"),
    "depthwise": (Depthwise, X, "depthwise"),
    "grouped": (Grouped, X, "grouped"),
    "flatten": (FlattenLinear, X, "flatten"),
    "split": (SplitChunk, X, "split"),
    "shuffle": (Shuffle, X, "shuffle"),
    "channel_mul": (SqueezeExcite, X, "channel-mul"),
    "layer_norm": (LayerNormBlock, X, "norm"),
    "group_norm": (GroupNormNet, X, "norm"),
    "slice": (Slicing, X, "slice"),
    "functional": (Functional, X, "grouped"),
    "shared": (Shared, X, "shared"),
    "mlp": (MLP, X_FLAT, None),
    "mean_over_channels": (MeanOverChannels, X, "reduce"),
    "attention_matmul": (ViTBlock, X, "norm"),
    "attention_sdpa": (lambda: ViTBlock(lambda: Attention(sdpa=True)), X, "norm"),
    "attention_einsum": (lambda: ViTBlock(lambda: Attention(einsum=True)), X, "norm"),
    "attention_mha": (lambda: ViTBlock(MHA), X, "norm"),
    "attention_mha_seq_first": (lambda: ViTBlock(lambda: MHA(batch_first=False)), X, "norm"),
    "stack": (SelectiveKernel, X, "elementwise"),
    "expand_as": (ExpandAsGate, X, "channel-mul"),
    "grn": (GlobalResponseNorm, X, "constant"),
}


def make(name: str) -> tuple[nn.Module, torch.Tensor]:
    factory, x, _ = ZOO[name]
    torch.manual_seed(0)
    return randomize(factory()), x
