"""The model zoo sweep (issue 15): every model through the default pipeline, ``prune=0.5`` and
``quantize="int8"``, on random weights and a small input, one row per model and mode.

Columns: how the model was captured (``symbolic_trace`` / ``export``; "+ N inlined by
export": untraceable modules captured with torch.export and inlined) and the modules left
opaque leaves (with the share of parameters they hold), BatchNorm left in the optimized graph
(inside opaque leaves counted apart), convolutions fused with their epilogue (``fuse_act``)
and lowered out of all convs, int8 layers (conv/linear), the parameter ratio after/before, the
error against eager (rel err; SQNR for int8) and, for a failure, the typed error. Nothing is
timed: this is a coverage sweep, not a speed benchmark.

    python bench/zoo.py                                    # the whole list below (long)
    python bench/zoo.py --models timm-issue15 --out -      # the issue's timm models only
    python bench/zoo.py --models resnet18,tf_efficientnet_b0 --modes default,int8

Writes ``bench/results/zoo-<date>.md`` (``--out -``: stdout only).
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import header, write_result  # noqa: E402

__all__ = ["main", "TIMM_ISSUE15", "TIMM", "torchvision_models", "MODES"]

# The timm models issue 15 names: stopped at capture; BN unfolded (shape reads); computed conv
# weights (ScaledStdConv2d).
TIMM_ISSUE15 = ["tf_efficientnet_b0", "vgg11_bn", "mobilevit_xxs", "efficientvit_b0",
                "mobilenetv2_050", "regnetx_002", "efficientnet_b0", "cspresnet50", "repvgg_a0",
                "nf_resnet26"]
# ... and the rest of the issue's timm list (pruning, transformers).
TIMM = TIMM_ISSUE15 + [
    "edgenext_xx_small", "botnet26t_256", "halonet26t", "levit_128s", "efficientformer_l1",
    "vit_tiny_patch16_224", "deit_tiny_patch16_224", "swin_tiny_patch4_window7_224",
    "convnextv2_atto", "coatnet_0_rw_224", "skresnet18", "ecaresnet26t", "resnet18",
    "mobilenetv3_small_100", "ghostnet_100", "densenet121", "dla34", "hrnet_w18_small",
    "res2net50_26w_4s", "rexnet_100", "selecsls42b", "dpn68", "inception_v3", "xception41",
]
MODES = {"default": {}, "prune": {"prune": 0.5}, "int8": {"quantize": "int8"}}
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d)


def torchvision_models() -> list[str]:
    """Every torchvision classification model (``torchvision.models.list_models``)."""
    import torchvision

    return ["tv:" + n for n in torchvision.models.list_models(module=torchvision.models)]


def _build(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if name.startswith("tv:"):
        import torchvision

        model = torchvision.models.get_model(name[3:], weights=None).eval()
        fixed = any(k in name for k in ("vit_", "swin", "maxvit"))
        return model, torch.randn(1, 3, 224, 224) if fixed else torch.randn(1, 3, 64, 64)
    import timm

    model = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(1, 3, 64, 64)
    try:
        with torch.no_grad():
            model(x)
    except Exception:  # noqa: BLE001 - a fixed input size: the model's own
        x = torch.randn(1, *model.pretrained_cfg["input_size"])
    return model, x


def _bn_left(gm) -> int:
    n = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is F.batch_norm:
            n += 1
        elif node.op == "call_module" and isinstance(gm.get_submodule(node.target), _BN):
            n += 1
    return n


def _row(name: str, mode: str, model: nn.Module, x: torch.Tensor) -> list[str]:
    import fxopt

    kw = dict(MODES[mode])
    if mode == "int8":
        kw["calibration_data"] = [x]
    total_convs = sum(isinstance(m, _CONV) for m in model.modules())
    try:
        opt = fxopt.optimize(model, x, **kw)
    except Exception as e:  # noqa: BLE001 - the sweep reports every failure as a row
        first = str(e).splitlines()[0][:140] if str(e) else ""
        if os.environ.get("ZOO_DEBUG"):
            traceback.print_exc()
        return [name, mode] + ["-"] * 7 + [f"{type(e).__name__}: {first}"]
    r = opt.report
    cap = r.capture or {}
    opaque = cap.get("opaque", [])
    params = sum(p.numel() for p in model.parameters()) or 1
    hidden = sum(o["params"] for o in opaque)
    leaves = f"{len(opaque)} ({hidden / params:.0%})" if opaque else "0"
    bn_inside = sum(o["layers"]["bn"] for o in opaque)
    bn = str(_bn_left(opt.graph_module)) + (f" (+{bn_inside} in leaves)" if bn_inside else "")
    fuse = r.record("fuse_act")
    fused = sum(v for k, v in (fuse.stats if fuse else {}).items() if k.startswith("conv"))
    lower = r.record("lower_convs")
    lowered = sum((lower.stats if lower else {}).values())
    int8 = "-"
    err = f"{r.final_rel_err:.1e}" if r.final_rel_err is not None else "-"
    q = r.record("quantize_int8")
    if q is not None:
        int8 = str(sum(q.stats.get(k, 0) for k in ("conv2d", "conv1d", "linear",
                                                   "conv_transpose2d")))
        err = f"SQNR {q.stats.get('sqnr_db', float('nan')):.1f} dB"
    ratio = f"{r.after.params / max(r.before.params, 1):.3f}"
    method = cap.get("method", "?")
    if cap.get("inlined"):
        method += f" + {len(cap['inlined'])} inlined by export"
    return [name, mode, method, leaves, bn, f"{fused}+{lowered}/{total_convs}",
            int8, ratio, err, ""]


COLUMNS = ["model", "mode", "capture", "leaves (params)", "BN left", "convs fused+lowered/all",
           "int8 layers", "params ratio", "rel err / SQNR", "error"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="all",
                    help="'all', 'timm', 'timm-issue15', 'torchvision', or a comma list (tv:name "
                         "for torchvision)")
    ap.add_argument("--modes", default="default,prune,int8")
    ap.add_argument("--out", default=None, help="output file ('-': stdout only)")
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("ZOO_THREADS", "1")))
    groups = {"timm": TIMM, "timm-issue15": TIMM_ISSUE15}
    if args.models == "all":
        names = TIMM + torchvision_models()
    elif args.models == "torchvision":
        names = torchvision_models()
    else:
        names = groups.get(args.models) or args.models.split(",")
    modes = args.modes.split(",")
    rows = []
    for name in names:
        try:
            model, x = _build(name)
        except Exception as e:  # noqa: BLE001
            rows.append([name, "build"] + ["-"] * 7 + [f"{type(e).__name__}: {e}"[:140]])
            continue
        for mode in modes:
            rows.append(_row(name, mode, model, x))
            print(" | ".join(rows[-1]), flush=True)
    failed = sum(1 for r in rows if r[-1])
    text = header("fxopt model zoo sweep (issue 15)")
    text += (f"\nModels: `{args.models}` ({len(names)}), modes {modes}; input 1x3x64x64 "
             f"(the model's own size where it needs one); random weights; int8 calibrated on "
             f"the example input. {failed} of {len(rows)} runs failed.\n\n")
    text += "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"
    text += "".join("| " + " | ".join(r) + " |\n" for r in rows)
    write_result(text, args.out, "zoo")
    return 0


if __name__ == "__main__":
    sys.exit(main())
