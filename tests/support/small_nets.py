"""Small networks that more than one test module builds: a residual conv net, the int8
epilogue block (hardswish, SiLU, GELU), a small CNN with every between-op the int8 CPU lowering
writes (residual, cat, pools, SE gate), and a user leaf module with its parent."""
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Net", "MobileBlock", "Scale", "SmallCNN", "WithScale"]


class Net(nn.Module):
    """conv-bn-relu, a residual block, a max pool, global pooling and a classifier."""

    def __init__(self, c=8):
        super().__init__()
        self.c1, self.bn1 = nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c)
        self.c2, self.bn2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(c, 10)
        for bn in (self.bn1, self.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        y = F.relu(self.bn1(self.c1(x)))
        y = self.pool(torch.relu(self.bn2(self.c2(y)) + y))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


class MobileBlock(nn.Module):
    """MobileNetV3 / EfficientNet / transformer epilogues PyTorch's quantized kernels lack:
    conv + hardswish, a depthwise conv + SiLU, linear + GELU (only oneDNN's int8 kernels fuse
    them)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1, stride=2)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 10)

    def forward(self, x):
        y = F.silu(self.dw(F.hardswish(self.c1(x))))
        return self.fc2(F.gelu(self.fc1(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))))


class Scale(nn.Module):
    """A user leaf module (importable: defined in this support module)."""

    def __init__(self, c):
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, c).view(1, c, 1, 1))
        self.power = 2

    def forward(self, x):
        return x * self.gain ** self.power


class WithScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.scale = nn.Conv2d(3, 4, 3), Scale(4)

    def forward(self, x):
        return self.scale(F.relu(self.conv(x)))


class SmallCNN(nn.Module):
    """stem, a residual block, cat of two branches, max pool, an SE gate, global pool, fc."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.c1, self.c2 = nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.b1, self.b2 = nn.Conv2d(16, 8, 1), nn.Conv2d(16, 8, 3, padding=1)
        self.fc1, self.fc2 = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        y = torch.relu(self.stem(x))
        y = torch.relu(self.c2(torch.relu(self.c1(y))) + y)
        y = torch.cat([F.relu(self.b1(y)), F.relu6(self.b2(y))], 1)
        y = F.max_pool2d(y, 2)
        g = torch.sigmoid(self.fc2(torch.relu(self.fc1(F.adaptive_avg_pool2d(y, 1)))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y * g, 1), 1))
