"""What ``--model`` names, loaded: the digits ResNet, a torchvision model, or a factory in a file.

    >>> spec = load_model_spec("torchvision:resnet18", "1,3,64,64")
    >>> spec.model, spec.example.shape        # eval-mode model, a random input of that shape
"""
from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from fxopt.errors import InputError, ModelTypeError

__all__ = ["LoadedSpec", "load_model_spec", "parse_input_shape", "DEFAULT_TORCHVISION_SHAPE"]

DEFAULT_TORCHVISION_SHAPE = (1, 3, 224, 224)


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@dataclass
class LoadedSpec:
    """A model ready to optimize, with what the command line knows about it."""

    name: str
    model: nn.Module  # in eval mode
    example: torch.Tensor
    description: str = ""
    test_loader: Any = None  # digits only: accuracy is measured on it
    calibration: Any = None  # batches for quantize=


def parse_input_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` (or ``1x3x224x224``) -> ``(1, 3, 224, 224)``."""
    parts = [p for p in text.replace("x", ",").replace(" ", "").split(",") if p]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if not shape or any(d < 1 for d in shape):
        raise InputError(f"--input-shape must be positive integers separated by commas, got "
                         f"{text!r}", hint="for example --input-shape 1,3,224,224")
    return shape


def load_model_spec(spec: str, input_shape: str | None = None, *, epochs: int | None = None,
                    progress: bool = True, console=None) -> LoadedSpec:
    """Resolve ``--model`` (``digits``, ``torchvision:NAME`` or ``file.py:factory``)."""
    shape = parse_input_shape(input_shape) if input_shape else None
    if spec == "digits":
        return _load_digits(shape, epochs, progress, console)
    if epochs is not None:
        raise InputError("--epochs applies only to the built-in digits model",
                         hint="drop --epochs, or use --model digits")
    kind, sep, name = spec.rpartition(":")  # rpartition: a path may hold ':' (C:\...)
    if not sep or not kind or not name:
        raise InputError(f"--model must be 'digits', 'torchvision:NAME' or "
                         f"'path/to/file.py:factory', got {spec!r}",
                         hint="for example --model torchvision:resnet18")
    if kind == "torchvision":
        return _load_torchvision(name, shape or DEFAULT_TORCHVISION_SHAPE)
    return _load_from_file(Path(kind), name, shape)


def _load_digits(shape, epochs, progress, console) -> LoadedSpec:
    from fxopt.tools import digits

    batch = 8  # small: the per-pass checks and the latency runs use it
    if shape is not None:
        if tuple(shape[1:]) != (1, 8, 8):
            raise InputError(f"the digits model takes inputs of shape N,1,8,8, got --input-shape "
                             f"{','.join(map(str, shape))}",
                             hint="pass --input-shape 8,1,8,8 or none")
        batch = shape[0]
    loaded = digits.load_or_train_default(progress=progress, console=console,
                                          epochs=epochs or digits.DEFAULT_EPOCHS)
    how = (f"trained in {loaded.seconds:.1f} s, cached at {loaded.path}" if loaded.trained
           else f"weights from the cache {loaded.path}")
    return LoadedSpec("digits", loaded.model, digits.example_batch(batch),
                      f"DigitsResNet on scikit-learn digits ({how})", digits.test_loader(),
                      digits.calibration_batches())


def _load_torchvision(name: str, shape) -> LoadedSpec:
    try:
        import torchvision
    except ImportError:
        raise InputError("--model torchvision:NAME needs torchvision, which is not installed",
                         hint="pip install torchvision") from None
    try:
        model = torchvision.models.get_model(name, weights=None)
    except (ValueError, KeyError) as e:
        known = torchvision.models.list_models()
        some = ", ".join(n for n in ("resnet18", "resnet50", "mobilenet_v3_small",
                                     "efficientnet_b0", "vit_b_16") if n in known)
        raise InputError(f"torchvision has no model named {name!r} ({_one_line(e)})",
                         hint=f"choose from torchvision.models.list_models(), e.g. {some}"
                         ) from None
    return LoadedSpec(f"torchvision:{name}", model.eval(), _random_input(shape),
                      f"torchvision {name}, random weights",
                      calibration=[_random_input(shape, seed=s) for s in range(1, 5)])


def _load_from_file(path: Path, factory: str, shape) -> LoadedSpec:
    if not path.is_file():
        raise InputError(f"no such model file: {path}",
                         hint="--model takes path/to/file.py:factory, the path relative to here")
    # A unique module name per path, so two files called model.py do not collide.
    mod_name = f"_fxopt_user_model_{abs(hash(str(path.resolve())))}"
    try:
        spec = importlib.util.spec_from_file_location(mod_name, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"not a Python file: {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module  # dataclasses and pickling look the module up here
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - the user's code: say where it failed
        sys.modules.pop(mod_name, None)
        raise InputError(f"importing {path} failed: {type(e).__name__}: {e}",
                         hint="fix the file (run with --debug for the traceback)") from e
    fn = getattr(module, factory, None)
    if not callable(fn):
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                       and getattr(v, "__module__", None) == mod_name)
        raise InputError(f"{path} has no callable named {factory!r}",
                         hint="name a function defined there: "
                              f"{', '.join(found) or '(none found)'}")
    try:
        model = fn()
    except Exception as e:  # noqa: BLE001
        raise InputError(f"{path}:{factory}() failed: {type(e).__name__}: {e}",
                         hint="fix the factory (run with --debug for the traceback)") from e
    if not isinstance(model, nn.Module):
        raise ModelTypeError(f"{path}:{factory}() returned {type(model).__name__}, not an "
                             "nn.Module",
                             hint="make the factory return the torch.nn.Module to optimize")
    if shape is None:
        declared = getattr(module, "INPUT_SHAPE", None)
        if declared is None:
            raise InputError(f"--input-shape is required for a model from a file ({path})",
                             hint="pass the shape of one input batch, e.g. --input-shape "
                                  "1,3,224,224 (or set INPUT_SHAPE = (1, 3, 224, 224) in the "
                                  "file)")
        shape = parse_input_shape(",".join(map(str, declared)))
    # The command line optimizes for inference: a factory that builds a fresh (training-mode)
    # model should not have to know that.
    return LoadedSpec(f"{path}:{factory}", model.eval(), _random_input(shape),
                      f"{type(model).__name__} from {path}",
                      calibration=[_random_input(shape, seed=s) for s in range(1, 5)])


def _random_input(shape, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
