"""The embedded default model: a small ResNet trained on scikit-learn's digits.

``fxopt optimize`` with no model needs a *trained* network to show what the passes do to real
accuracy, and it must work offline: scikit-learn ships the 8x8 digits set (1,797 images, 10
classes) inside the package, so nothing is downloaded. Training takes a few seconds on a laptop
CPU; the weights are cached per user and retrained when the cache is missing or unreadable.

    >>> from fxopt.tools import digits
    >>> loaded = digits.load_or_train_default()        # trains once, then reads the cache
    >>> loaded.model, loaded.accuracy                   # eval-mode DigitsResNet, ~0.99
    >>> opt = fxopt.optimize(loaded.model, digits.example_batch())
    >>> digits.evaluate(opt, digits.test_loader())      # accuracy after optimization

The split is fixed (80/20 within each class, seed 0) and inputs are normalized with the training
split's mean and std, so accuracies are comparable across runs and machines.
"""
from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import importlib.util
import io
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

__all__ = [
    "DigitsData", "DigitsResNet", "DigitsCNN", "ARCHITECTURES", "LoadedModel", "TrainResult",
    "RECIPE_VERSION", "DEFAULT_EPOCHS", "CACHE_ENV", "load_digits_split", "train_loader",
    "test_loader", "calibration_batches", "example_batch", "evaluate", "random_shift",
    "train_digits_model", "load_or_train_default", "default_cache_dir", "cache_path",
]

# Bump when the architecture, data split or training recipe changes: cached weights made by
# another recipe are then ignored (a new file name) instead of being loaded into a mismatch.
RECIPE_VERSION = "digits-resnet-v1"
DEFAULT_EPOCHS = 10
DEFAULT_SEED = 0
CACHE_ENV = "FXOPT_CACHE_DIR"
NUM_CLASSES = 10


# -- data ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class DigitsData:
    """The fixed split as normalized float tensors ``[N, 1, 8, 8]`` and int64 labels ``[N]``."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    mean: float
    std: float


def _read_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 digits as ``[1797, 64]`` pixel values 0..16 and labels 0..9.

    Read straight from the ``digits.csv.gz`` that scikit-learn ships: importing scikit-learn
    costs 1-3 s of start-up (scipy and friends) on every ``fxopt optimize``, for one small file.
    When the file is not where it is expected, ``sklearn.datasets.load_digits`` reads it.
    """
    spec = importlib.util.find_spec("sklearn")
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    for root in roots:
        path = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            with gzip.open(path, mode="rt", encoding="utf-8") as f:
                data = np.loadtxt(f, delimiter=",")
            if data.shape == (1797, 65):
                return data[:, :-1], data[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return x, y.astype(np.int64)


def _stratified_split(y: np.ndarray, test_fraction: float,
                      seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and test indices (each sorted): ``test_fraction`` of every class, drawn by
    ``seed``."""
    rng = np.random.RandomState(seed)
    test: list[int] = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        test.extend(idx[:int(round(len(idx) * test_fraction))].tolist())
    is_test = np.zeros(len(y), dtype=bool)
    is_test[test] = True
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


@functools.lru_cache(maxsize=4)
def load_digits_split(test_fraction: float = 0.2, seed: int = DEFAULT_SEED) -> DigitsData:
    """Load scikit-learn's bundled digits and split them; the same arguments give the same split.

    Stratified so every class is in the test split in proportion (359 of 1,797 images at 20%).
    """
    x, y = _read_digits()
    train_idx, test_idx = _stratified_split(y, test_fraction, seed)
    x = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(y, dtype=torch.int64)
    x_tr, x_te = x[train_idx], x[test_idx]
    # Statistics of the training split only: the test split must not leak into the inputs.
    mean, std = float(x_tr.mean()), float(x_tr.std())
    return DigitsData((x_tr - mean) / std, y[train_idx], (x_te - mean) / std, y[test_idx], mean,
                      std)


def train_loader(batch_size: int = 64, seed: int = DEFAULT_SEED) -> DataLoader:
    """Shuffled training batches ``(x, y)``; the order is fixed by ``seed``."""
    d = load_digits_split()
    return DataLoader(TensorDataset(d.train_x, d.train_y), batch_size=batch_size, shuffle=True,
                      generator=torch.Generator().manual_seed(seed))


def test_loader(batch_size: int = 256) -> DataLoader:
    """The test split ``(x, y)`` in a fixed order."""
    d = load_digits_split()
    return DataLoader(TensorDataset(d.test_x, d.test_y), batch_size=batch_size, shuffle=False)


def calibration_batches(num_batches: int = 8, batch_size: int = 32) -> list[torch.Tensor]:
    """Input-only batches from the *training* split, for int8 calibration (``calibration_data=``).

    Calibrating on training data keeps the test split an honest measure of the quantized model.
    """
    x = load_digits_split().train_x
    end = min(len(x), num_batches * batch_size)
    return [x[i:i + batch_size] for i in range(0, end, batch_size)]


def example_batch(batch_size: int = 8) -> torch.Tensor:
    """The first ``batch_size`` test images: real inputs for capture and per-pass checks."""
    return load_digits_split().test_x[:batch_size].clone()


# -- model --------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    """ResNet basic block: conv-bn-relu-conv-bn plus a (1x1 conv-bn when reshaping) shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(out_ch))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + identity)


class DigitsResNet(nn.Module):
    """A small ResNet for 8x8 digits (151k parameters).

    stem conv3x3(1->32)-bn-relu, block(32->32), block(32->64, stride 2: 8x8 -> 4x4),
    block(64->64), adaptive avgpool, flatten, dropout, linear(64->10). Every pattern the
    passes care about is here: conv-bn, conv-bn-relu, residual adds, a strided shortcut,
    pooling, flatten and a classifier.
    """

    def __init__(self, width: int = 32, num_classes: int = NUM_CLASSES, dropout: float = 0.2):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        self.layer1 = BasicBlock(width, width)
        self.layer2 = BasicBlock(width, 2 * width, stride=2)
        self.layer3 = BasicBlock(2 * width, 2 * width)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.dropout(self.flatten(self.pool(x))))


class DigitsCNN(nn.Module):
    """A small plain CNN for 8x8 digits (no residuals; 24k parameters): conv-bn-relu x2,
    max pooling (8x8 -> 4x4), conv-bn-relu, flatten, linear-relu, linear."""

    def __init__(self, width: int = 16, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width),
            nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width),
            nn.ReLU())
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * 16, 32), nn.ReLU(),
                                        nn.Linear(32, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


ARCHITECTURES = {"resnet": DigitsResNet, "cnn": DigitsCNN}


# -- training and evaluation --------------------------------------------------------------
@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader | None = None,
             device: str | torch.device | None = None) -> float:
    """Top-1 accuracy of ``model`` over ``loader`` (default: the test split), in ``[0, 1]``.

    The model is called as it is: put it in eval mode first (an ``OptimizedModule`` always is).
    ``device``: where to move each batch (default: where the model's first tensor lives).
    """
    loader = loader if loader is not None else test_loader()
    if device is None:
        first = next(iter(model.parameters()), None)
        if first is None:
            first = next(iter(model.buffers()), None)
        device = first.device if first is not None else "cpu"
    correct = total = 0
    for x, y in loader:
        logits = model(x.to(device))
        correct += int((logits.argmax(dim=1).cpu() == y).sum())
        total += len(y)
    if total == 0:
        raise ValueError("evaluate() got an empty loader")
    return correct / total


class TrainResult(NamedTuple):
    model: DigitsResNet  # in eval mode
    accuracy: float  # on the test split
    seconds: float


def random_shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random translation by up to one pixel (pad with the background value, crop back).

    Cheap augmentation for a training split of only 1,438 images: a digit drawn one pixel off
    is still the same digit.
    """
    n = x.shape[0]
    background = float(x.min())
    padded = F.pad(x, (1, 1, 1, 1), value=background)
    dx = torch.randint(0, 3, (n,), generator=gen)
    dy = torch.randint(0, 3, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(8)[None, :])  # [n, 8]
    cols = (dx[:, None] + torch.arange(8)[None, :])
    idx_n = torch.arange(n)[:, None, None]
    return padded[:, 0][idx_n, rows[:, :, None], cols[:, None, :]].unsqueeze(1)



def train_digits_model(epochs: int = DEFAULT_EPOCHS, seed: int = DEFAULT_SEED,
                       progress: bool = True, console=None, arch: str = "resnet") -> TrainResult:
    """Train a ``DigitsResNet`` (``arch="cnn"``: a ``DigitsCNN``) from scratch; the same seed
    and epochs give the same model.

    AdamW with a one-cycle schedule; a rich progress bar (on ``console``, default stderr) when
    ``progress``. Returns the model in eval mode, its test accuracy and the training time.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown digits architecture {arch!r}; known: "
                         f"{', '.join(ARCHITECTURES)}")
    with _one_thread():
        return _train(epochs, seed, progress, console, arch)


@contextlib.contextmanager
def _one_thread():
    """Train on one thread, then restore the caller's setting.

    8x8 images are far too small to gain from intra-op threads, and on a loaded machine the
    threads' spin-waits made training 5-10x slower (measured: 10 s on one thread against 60-120 s
    on two, 2 busy cores). One thread also makes the weights independent of the core count.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _train(epochs: int, seed: int, progress: bool, console, arch: str = "resnet") -> TrainResult:
    torch.manual_seed(seed)
    model = ARCHITECTURES[arch]()
    loader = train_loader(seed=seed)
    aug_gen = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, epochs=epochs,
                                                steps_per_epoch=len(loader))
    t0 = time.perf_counter()
    steps = epochs * len(loader)
    with _progress_bar(progress, console, "training digits model", steps) as advance:
        for epoch in range(epochs):
            model.train()
            for x, y in loader:
                loss = F.cross_entropy(model(random_shift(x, aug_gen)), y,
                                       label_smoothing=0.05)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                advance(f"training digits model (epoch {epoch + 1}/{epochs}, "
                        f"loss {loss.item():.3f})")
    model.eval()
    return TrainResult(model, evaluate(model), time.perf_counter() - t0)


@contextlib.contextmanager
def _progress_bar(enabled: bool, console, description: str, total: int) -> Iterator:
    """Yield ``advance(description)``; a rich bar when enabled, a no-op otherwise.

    Rich draws live only on a terminal; into a file or a CI log it writes the final state once.
    """
    if not enabled:
        yield lambda _desc=None: None
        return
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn)

    console = console if console is not None else Console(stderr=True)
    with Progress(TextColumn("{task.description}", markup=False), BarColumn(),
                  MofNCompleteColumn(), TimeElapsedColumn(), console=console,
                  transient=console.is_terminal) as bar:
        task = bar.add_task(description, total=total)

        def advance(desc=None):
            bar.update(task, advance=1, **({"description": desc} if desc else {}))

        yield advance


# -- the cached default model ---------------------------------------------------------------
class LoadedModel(NamedTuple):
    model: DigitsResNet  # in eval mode
    accuracy: float  # test accuracy measured when it was trained
    trained: bool  # True: trained by this call; False: read from the cache
    path: Path  # the cache file
    seconds: float  # training time (0 when read from the cache)


def default_cache_dir() -> Path:
    """``$FXOPT_CACHE_DIR``, else ``$XDG_CACHE_HOME/fxopt``, else ``~/.cache/fxopt``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "fxopt"


def cache_path(cache_dir: str | Path | None = None, epochs: int = DEFAULT_EPOCHS,
               seed: int = DEFAULT_SEED) -> Path:
    """The cache file for one recipe: the version, epochs and seed are in its name."""
    key = f"{RECIPE_VERSION}-e{epochs}-s{seed}"
    # A short hash keeps names unique if the key ever grows characters unsafe in file names.
    digest = hashlib.sha256(key.encode()).hexdigest()[:8]
    return Path(cache_dir or default_cache_dir()) / f"{key}-{digest}.pt"


def _read_cache(path: Path) -> tuple[DigitsResNet, float] | None:
    """The cached model, or None when the file is missing, corrupt or from another recipe."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(payload, dict) or payload.get("version") != RECIPE_VERSION:
            return None
        model = DigitsResNet()
        model.load_state_dict(payload["state_dict"])
        return model.eval(), float(payload["accuracy"])
    except Exception:  # noqa: BLE001 - any unreadable cache means "train again", never a crash
        return None


def _write_cache(path: Path, model: nn.Module, accuracy: float) -> None:
    """Write atomically: a crash mid-write leaves the old file or none, never a torn one."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # per process: concurrent runs
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        torch.save({"version": RECIPE_VERSION, "state_dict": model.state_dict(),
                    "accuracy": accuracy}, buf)
        tmp.write_bytes(buf.getvalue())
        os.replace(tmp, path)
    except OSError:
        # A read-only or full cache folder costs a retrain next time, not this run.
        with contextlib.suppress(OSError):
            tmp.unlink()


def load_or_train_default(cache_dir: str | Path | None = None, progress: bool = True,
                          epochs: int = DEFAULT_EPOCHS, seed: int = DEFAULT_SEED,
                          console=None) -> LoadedModel:
    """The trained default model: from the cache when it is there and readable, else trained.

    The cache key holds ``RECIPE_VERSION``, ``epochs`` and ``seed``, so a changed recipe never
    loads stale weights and a quick test run (few epochs) never replaces the real model.
    """
    path = cache_path(cache_dir, epochs, seed)
    cached = _read_cache(path) if path.exists() else None
    if cached is not None:
        return LoadedModel(cached[0], cached[1], False, path, 0.0)
    result = train_digits_model(epochs=epochs, seed=seed, progress=progress, console=console)
    _write_cache(path, result.model, result.accuracy)
    return LoadedModel(result.model, result.accuracy, True, path, result.seconds)
