"""The models and weights the dynamic int8 tests share (``tests/passes/quant/test_dynamic.py``,
``test_dynamic_per_token.py``): a pre-LN transformer MLP block, int8 weight codes with their
per-channel scales, and a deep torchvision ViT."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    """Pre-LN transformer MLP block: x + fc2(gelu(fc1(ln(x)))), then a head."""

    def __init__(self, d=32, h=64, out=10):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, h)
        self.fc2 = nn.Linear(h, d)
        self.head = nn.Linear(d, out)

    def forward(self, x):
        y = x + self.fc2(F.gelu(self.fc1(self.ln(x))))
        return self.head(y)


def int8_weights(n, k, seed=0):
    """Symmetric int8 codes of an ``n`` x ``k`` random weight and its per-row scales."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / math.sqrt(k)
    scale = w.abs().amax(1) / 127
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale



def deep_vit():
    """torchvision's ViT, 12 blocks of width 192 at 64x64 (65 tokens): deep enough that a tie
    rounded the other way in one block's run-time grid spreads to the logits."""
    from torchvision.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    m = VisionTransformer(image_size=64, patch_size=8, num_layers=12, num_heads=3,
                          hidden_dim=192, mlp_dim=768, num_classes=100).eval()
    nn.init.normal_(m.heads.head.weight, std=0.02)  # torchvision zero-initializes the head
    return m
