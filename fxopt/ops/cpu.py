"""The ops the CPU int8 lowering writes: every one on plain uint8 codes, no quantized tensor.

``lower_int8_cpu`` writes these ops only, so a lowered int8 module holds plain tensors (it
saves as int8 weights and scales), ``torch.export``s and ``torch.compile``s (every op has a fake
implementation; Inductor calls it as an extern kernel). Layers run oneDNN's int8 kernels
(``torch.ops.onednn.qconv2d_pointwise`` / ``.binary`` / ``qlinear_pointwise``, what Inductor
emits for PT2E models) with their fused post-ops (relu, relu6 as hardtanh, hardswish, SiLU,
GELU, ...) and a residual add as oneDNN's ``sum`` post-op; ``engine="fbgemm"`` runs
PyTorch's quantized fbgemm kernel instead, packed once per weight and run on a view of the
codes (faster on small layers: measured in ``bench/int8_plain.py``). The ops between the layers
(``cpu_quantize`` ... ``cpu_batch_norm2d_int8``, below) are the IR's, run on PyTorch's
quantized kernels through views of the codes::

    y = torch.ops.fxopt.onednn_conv2d_int8(q, w_q, w_scale, b, [1, 1], [1, 1], [1, 1], 1,
                                           0.03, 128, 0.02, 100, act="hardswish")
    # == conv2d_int8(q, ..., act="hardswish", out_int8=True), channels-last uint8 codes

Codes in on the ``x`` grid (uint8, affine), codes out on the ``y`` grid; weights int8 per output
channel, symmetric, held as plain tensors (the module saves and copies) and packed for oneDNN
once per weight, grid and input shape (``fxopt.ops.onednn``). Which activations each kind takes
is the ``onednn_int8`` column of the activation table; any other activation (sigmoid and
hardsigmoid gates, GELU or tanh after a convolution, leaky ReLU, ...) runs on the kernel's
float32 output (``output_dtype=torch.float32``: int8 in, the int32 sums scaled and the bias
added in the kernel), then quantizes onto the y grid: the convolution itself stays int8. The
reference, on any device and
wherever oneDNN refuses, is the int8 IR's own (``conv2d_int8_reference``): oneDNN sums the same
integers exactly; its float epilogue may round a tie the other way, which the lowering's
lockstep check allows (one code).

On an x86 CPU without VNNI or AMX the kernels add u8 x s8 product pairs in int16 and saturate
(``fxopt.ops.saturation``): there a layer whose weight codes leave [-64, 64] (8-bit weight
grids: a module quantized with ``reduce_range`` True or False, or made on a VNNI CPU) runs its
single kernel call only for inputs whose codes are at most 127 (one read of the codes a call);
other inputs take two exact calls, one per half of the weight (each within [-64, 64]), their
float32 outputs added before the activation and the requantize (a tie may round the other way:
one code), and a fused residual the reference. No saturated sum comes back. fxopt's own grids
on such a CPU are 7-bit weights: none of this runs.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch
import torch.nn.functional as F

from fxopt.ir.activations import ACTIVATIONS, apply_activation
from fxopt.ops import onednn
from fxopt.ops.int8 import (ADD_INT8, AVG_POOL2D_INT8, AVGPOOL_INT8, BATCH_NORM2D_INT8, CAT_INT8,
                            DEQUANTIZE, MAXPOOL_INT8, MUL_INT8, QUANTIZE, UPSAMPLE_NEAREST2D_INT8,
                            adaptive_avg_pool2d_int8_reference, add_int8_reference,
                            avg_pool2d_int8_reference, batch_norm2d_int8_reference,
                            cat_int8_reference, conv2d_int8_reference,
                            dequantize_reference, linear_int8_reference,
                            max_pool2d_int8_reference, mul_int8_reference, quantize_reference,
                            upsample_nearest2d_int8_reference)
from fxopt.ops.saturation import exact_only, exact_sums, weight_halves
from fxopt.ops.qviews import (CODES, CodesKernel, QuantizedKernel, as_quantized, codes_of,
                              linkable, on_grid,
                              plain_codes, spend_deprecation_warning)
from fxopt.ops.schema import define_op, weight_macs
from fxopt.ops.shapes import conv_out_shape, out_format, to_format

__all__ = ["ONEDNN_CONV2D_INT8", "ONEDNN_LINEAR_INT8", "OnednnConv2dInt8", "OnednnLinearInt8",
           "as_quantized", "codes_of", "quantized_nearest_alike", "CPU_OF", "CPU_QUANTIZE",
           "CPU_DEQUANTIZE", "CPU_ADD_INT8", "CPU_MUL_INT8", "CPU_CAT_INT8",
           "CPU_ADAPTIVE_AVG_POOL2D_INT8", "CPU_AVG_POOL2D_INT8", "CPU_MAX_POOL2D_INT8",
           "CPU_UPSAMPLE_NEAREST2D_INT8", "CPU_BATCH_NORM2D_INT8"]


def _grid(scale: float, zp: int, device):
    return (torch.tensor(scale, dtype=torch.float32, device=device),
            torch.tensor(zp, dtype=torch.int64, device=device))


def _conv_reference(q, w_q, w_scale, bias, stride, padding, dilation, groups, x_scale, x_zp,
                    y_scale, y_zp, residual=None, residual_scale=1.0, residual_zp=0,
                    conv_scale=0.0, conv_zp=0, *, act="none", act_args=(), engine="onednn"):
    """The IR's conv2d_int8 on codes; a residual (codes) is added in float before ``act``,
    with no rounding of the convolution's own output in between (oneDNN's sum post-op).
    ``conv_scale`` / ``conv_zp`` only record the grid the IR rounded the convolution's output
    onto before the add (0: none): the QDQ export writes that rounding back, so ONNX Runtime
    sees its QLinearConv then QLinearAdd pattern."""
    r = None if residual is None else dequantize_reference(
        residual, *_grid(residual_scale, residual_zp, q.device))
    y = conv2d_int8_reference(q, w_q, w_scale, bias, stride, padding, dilation, groups,
                              *_grid(x_scale, x_zp, q.device), *_grid(y_scale, y_zp, q.device),
                              r, act=act, act_args=act_args, out_int8=True)
    return to_format(y, torch.channels_last)


def _linear_reference(q, w_q, w_scale, bias, x_scale, x_zp, y_scale, y_zp, *, act="none",
                      act_args=(), engine="onednn"):
    return linear_int8_reference(q, w_q, w_scale, bias, *_grid(x_scale, x_zp, q.device),
                                 *_grid(y_scale, y_zp, q.device), act=act, act_args=act_args,
                                 out_int8=True)


_FLOAT_EPILOGUE = "float"  # oneDNN has no post-op for the activation: it runs after, in float


def _fast(q, w_q, kind: str, act: str, act_args):
    """oneDNN's post-op for this call, ``_FLOAT_EPILOGUE`` when oneDNN fuses no such post-op
    (the kernel writes float32, the activation and the requantize follow), or None (the
    reference runs)."""
    if not (onednn.onednn_int8_available() and q.dtype == torch.uint8
            and w_q.dtype == torch.int8):
        return None
    return onednn.int8_post_op(kind, act, act_args) or _FLOAT_EPILOGUE


def _requantize(y, act: str, act_args, y_scale: float, y_zp: int):
    """uint8 codes of ``act(y)`` on the y grid (``y``: the kernel's fresh float32 output)."""
    y = apply_activation(y, act, act_args, inplace=True)
    # PyTorch's quantize kernel: one pass, round half to even as the IR's (4x faster here than
    # round/add/clamp in three, 12x than quantized_decomposed's); its deprecation warning is
    # about quantized tensors, which go no further than int_repr
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*quantized tensor creation.*")
        return torch.quantize_per_tensor(y, float(y_scale), int(y_zp), torch.quint8).int_repr()


def _on_halves(kernel, w_q, bias, act: str, act_args, y_scale: float, y_zp: int):
    """A layer whose kernel would saturate on these codes (``fxopt.ops.saturation``), as two
    exact calls ``kernel(weight, bias)`` (float32 out) on the halves of ``w_q``, added, then the
    activation and the requantize; None where the kernel refuses."""
    lo, hi = weight_halves(w_q)
    y = kernel(lo, bias)
    y2 = None if y is None else kernel(hi, None)
    return None if y2 is None else _requantize(y.add_(y2), act, act_args, y_scale, y_zp)


# PyTorch's quantized engines a layer may name (``engine=``): their packed kernels on views of
# the codes. "onednn" (the default) is oneDNN's ``qconv2d_pointwise`` / ``qlinear_pointwise``.
ENGINES = ("onednn", "fbgemm", "x86")
# PyTorch's quantized engines in this build, read once (the property costs microseconds a call)
_SUPPORTED = frozenset(torch.backends.quantized.supported_engines)


def _engine_fits(engine: str, act: str, residual) -> bool:
    """Whether PyTorch's quantized kernels of ``engine`` run this layer: no residual, an
    activation they fuse or clamp after (the activation table's ``quantized_cpu``)."""
    return (engine != "onednn" and engine in _SUPPORTED and residual is None
            and ACTIVATIONS[act].quantized_cpu is not None)


def _quantized_call(kind: str, w_q, w_scale, bias, geometry, x_scale, x_zp, y_scale, y_zp,
                    act, act_args, engine) -> Callable[[torch.Tensor], torch.Tensor]:
    """``quantized.<kind>(_relu)`` packed under ``engine`` (once per weight), as a function of
    the codes (run on a view of them); a clamp-like activation is a clamp of the quantized
    output (exact)."""
    def pack():
        spend_deprecation_warning()
        before = torch.backends.quantized.engine
        torch.backends.quantized.engine = engine
        try:
            wq = torch._make_per_channel_quantized_tensor(
                w_q.detach(), w_scale.detach().double(),
                torch.zeros(w_q.shape[0], dtype=torch.int64), 0)
            b = None if bias is None else bias.detach().float()
            if kind == "conv2d":
                stride, padding, dilation, groups = geometry
                return torch.ops.quantized.conv2d_prepack(wq, b, list(stride), list(padding),
                                                          list(dilation), groups)
            return torch.ops.quantized.linear_prepack(wq, b)
        finally:
            torch.backends.quantized.engine = before

    packed = onednn.packed_int8(f"{kind}_{engine}", w_q, (geometry,), pack, (w_scale, bias))
    fused = "relu" if act == "relu" else None
    fn = getattr(torch.ops.quantized, f"{kind}_{fused}" if fused else kind)
    # the overload's C++ callable: the packet's and the overload's Python checks (for
    # torch.compile's fake script objects; a bound call never runs under it) cost ~3 us a call
    fn = getattr(fn, "new", fn.default) if kind == "conv2d" else fn.default
    fn = getattr(fn, "_op", fn)
    return QuantizedKernel(fn, packed, (float(x_scale), int(x_zp)), (float(y_scale), int(y_zp)),
                           ACTIVATIONS[act].bounds(act_args))


def _conv_call(q, w_q, w_scale, bias, stride, padding, dilation, groups, x_scale, x_zp, y_scale,
               y_zp, residual=None, residual_scale=1.0, residual_zp=0, conv_scale=0.0, conv_zp=0, *,
               act="none", act_args=(), engine="onednn"):
    """The single kernel call ``_conv_cpu`` makes for these arguments and this input shape, as
    a function of the codes; None where it makes another (a residual, a float epilogue, the
    reference)."""
    if q.dim() != 4 or residual is not None:
        return None
    if _engine_fits(engine, act, None) and _quint8(q):
        return exact_only(_quantized_call(
            "conv2d", w_q, w_scale, bias, (tuple(stride), tuple(padding), tuple(dilation), groups),
            x_scale, x_zp, y_scale, y_zp, act, act_args, engine), w_q)
    post, affine = _fast(q, w_q, "conv2d", act, act_args), None
    if post is _FLOAT_EPILOGUE and act == "hardsigmoid":
        # hardsigmoid(v) = clip(v / 6 + 1/2, 0, 1): the 1/6 and 1/2 go into the weight scales
        # and the bias, the clip is oneDNN's hardtanh: one kernel call for a squeeze-excitation
        # gate instead of a float output, the activation and a quantize
        post, affine = ("hardtanh", [0.0, 1.0], ""), (1 / 6, 0.5)
    if post is None or post is _FLOAT_EPILOGUE:
        return None
    call = exact_only(onednn.conv2d_int8_call(q, w_q, w_scale, bias, stride, padding, dilation,
                                               groups, x_scale, x_zp, y_scale, y_zp, post,
                                               affine), w_q)
    return None if call is None else CodesKernel(call, (float(y_scale), int(y_zp)))


def _conv_cpu(q, w_q, w_scale, bias, stride, padding, dilation, groups, x_scale, x_zp, y_scale,
              y_zp, residual=None, residual_scale=1.0, residual_zp=0, conv_scale=0.0, conv_zp=0, *,
              act="none", act_args=(), engine="onednn"):
    call = _conv_call(q, w_q, w_scale, bias, stride, padding, dilation, groups, x_scale, x_zp,
                      y_scale, y_zp, residual, act=act, act_args=act_args, engine=engine)
    y = None if call is None else call(q)  # None: oneDNN refused it
    if y is not None:
        return y
    exact = q.dim() != 4 or exact_sums(q, w_q)
    if not exact and residual is None and _fast(q, w_q, "conv2d", act, act_args) is not None:
        y = _on_halves(lambda w, b: onednn.conv2d_int8_onednn(
            q, w, w_scale, b, stride, padding, dilation, groups, x_scale, x_zp, y_scale, y_zp,
            None), w_q, bias, act, act_args, y_scale, y_zp)
        if y is not None:
            return y
    post = _fast(q, w_q, "conv2d", act, act_args) if q.dim() == 4 and exact else None
    if residual is not None and (act not in ("none", "relu") or residual.dtype != torch.uint8):
        post = None  # oneDNN fuses only relu after its sum post-op
    if post is not None:
        epilogue = post is _FLOAT_EPILOGUE
        y = onednn.conv2d_int8_onednn(q, w_q, w_scale, bias, stride, padding, dilation, groups,
                                      x_scale, x_zp, y_scale, y_zp,
                                      None if epilogue else post, residual,
                                      (residual_scale, residual_zp))
        if y is not None:
            return _requantize(y, act, act_args, y_scale, y_zp) if epilogue else y
    return _conv_reference(q, w_q, w_scale, bias, stride, padding, dilation, groups, x_scale,
                           x_zp, y_scale, y_zp, residual, residual_scale, residual_zp, act=act,
                           act_args=act_args)


def _linear_call(q, w_q, w_scale, bias, x_scale, x_zp, y_scale, y_zp, *, act="none",
                 act_args=(), engine="onednn"):
    """As ``_conv_call``, for ``_linear_cpu`` (the function makes the codes contiguous)."""
    if q.dim() < 2:
        return None
    if _engine_fits(engine, act, None) and _quint8(q):
        call = _quantized_call("linear", w_q, w_scale, bias, None, x_scale, x_zp, y_scale,
                               y_zp, act, act_args, engine)
    else:
        post = _fast(q, w_q, "linear", act, act_args)
        if post is None or post is _FLOAT_EPILOGUE:
            return None
        call = onednn.linear_int8_call(q, w_q, w_scale, bias, x_scale, x_zp, y_scale, y_zp,
                                       post)
    call = exact_only(call, w_q)
    return None if call is None else lambda codes: call(codes.contiguous())


def _linear_cpu(q, w_q, w_scale, bias, x_scale, x_zp, y_scale, y_zp, *, act="none",
                act_args=(), engine="onednn"):
    q = q.contiguous()
    call = _linear_call(q, w_q, w_scale, bias, x_scale, x_zp, y_scale, y_zp, act=act,
                        act_args=act_args, engine=engine)
    y = None if call is None else call(q)  # None: oneDNN refused it
    if y is not None:
        return y
    exact = q.dim() < 2 or exact_sums(q, w_q)
    if not exact and _fast(q, w_q, "linear", act, act_args) is not None:
        y = _on_halves(lambda w, b: onednn.linear_int8_onednn(
            q, w, w_scale, b, x_scale, x_zp, y_scale, y_zp, None), w_q, bias, act, act_args,
            y_scale, y_zp)
        if y is not None:
            return y
    post = _fast(q, w_q, "linear", act, act_args) if q.dim() >= 2 and exact else None
    if post is _FLOAT_EPILOGUE:
        y = onednn.linear_int8_onednn(q, w_q, w_scale, bias, x_scale, x_zp, y_scale, y_zp, None)
        if y is not None:
            return _requantize(y, act, act_args, y_scale, y_zp)
    return _linear_reference(q, w_q, w_scale, bias, x_scale, x_zp, y_scale, y_zp, act=act,
                             act_args=act_args)


def _conv_fake(q, w_q, w_scale, bias, stride, padding, dilation, groups, x_scale, x_zp, y_scale,
               y_zp, residual=None, residual_scale=1.0, residual_zp=0, conv_scale=0.0, conv_zp=0,
               *, act="none", act_args=(), engine="onednn"):
    shape = conv_out_shape(q, w_q.shape[2:], w_q.shape[0], stride, padding, dilation)
    return torch.empty(shape, dtype=torch.uint8, device=q.device,
                       memory_format=torch.channels_last)


def _linear_fake(q, w_q, w_scale, bias, x_scale, x_zp, y_scale, y_zp, *, act="none",
                 act_args=(), engine="onednn"):
    return q.new_empty((*q.shape[:-1], w_q.shape[0]), dtype=torch.uint8)


_GRIDS = "float x_scale, int x_zp, float y_scale, int y_zp, *, str act='none', " \
         "float[] act_args=[], str engine='onednn') -> Tensor"
ONEDNN_CONV2D_INT8 = define_op(
    "onednn_conv2d_int8(Tensor q, Tensor w_q, Tensor w_scale, Tensor? bias, int[2] stride, "
    "int[2] padding, int[2] dilation, int groups, float x_scale, int x_zp, float y_scale, "
    "int y_zp, Tensor? residual=None, float residual_scale=1.0, int residual_zp=0, "
    "float conv_scale=0.0, int conv_zp=0, *, "
    "str act='none', float[] act_args=[], str engine='onednn') -> Tensor",
    family="cpu", quantized=True, reference=_conv_reference, cpu=_conv_cpu, fake=_conv_fake,
    macs=weight_macs("w_q"), cpu_bind=_conv_call)
ONEDNN_LINEAR_INT8 = define_op(
    "onednn_linear_int8(Tensor q, Tensor w_q, Tensor w_scale, Tensor? bias, " + _GRIDS,
    family="cpu", quantized=True, reference=_linear_reference, cpu=_linear_cpu,
    fake=_linear_fake, macs=weight_macs("w_q"), cpu_bind=_linear_call)

OnednnConv2dInt8 = ONEDNN_CONV2D_INT8.view
OnednnLinearInt8 = ONEDNN_LINEAR_INT8.view


# -- the ops between the layers: the int8 IR's, on PyTorch's quantized kernels -------------------
# Each ``cpu_<op>`` has its IR op's signature, reference and fake: plain uint8 codes in and out,
# grids as tensors. Inside, where the grid is PyTorch's quint8 ([0, 255]), the codes are viewed
# as a quantized tensor (no copy) for one of PyTorch's quantized kernels, and its result's memory
# viewed back as uint8 codes: the kernels' speed, with no quantized tensor in the graph (so a
# lowered module saves as plain tensors, torch.export's and torch.compile's: they see an fxopt op
# and its fake). Elsewhere (another grid, another dtype) the reference runs.
def _quint8(*codes, grid=(0, 255), linked: bool = False) -> bool:
    """Whether PyTorch's quantized kernels take these codes: quint8's grid, on the CPU, uint8
    (``linked``: or a quint8 tensor a linked op of the direct twin passed, ``fxopt.infra.direct``;
    for the ops that take one)."""
    dtypes = CODES if linked else (torch.uint8,)
    return tuple(int(g) for g in grid) == (0, 255) and all(
        c.dtype in dtypes and c.device.type == "cpu" for c in codes)


def _f(t) -> float:
    return float(t)


def _quantize_cpu(x, scale, zp, qmin, qmax):
    if qmin != 0 or qmax != 255 or x.dtype != torch.float32:
        return quantize_reference(x, scale, zp, qmin, qmax)
    spend_deprecation_warning()
    return codes_of(torch.quantize_per_tensor(x, _f(scale), int(zp), torch.quint8))


def _dequantize_cpu(q, scale, zp):
    if not _quint8(q):
        return dequantize_reference(q, scale, zp)
    return as_quantized(q, _f(scale), int(zp)).dequantize()


def _binary_cpu(kind: str, reference):
    """add_int8 / mul_int8 on ``quantized.<kind>(_relu)`` (they broadcast as the IR does).
    Every forward of a residual network calls it: the checks are plain comparisons and the
    kernels are looked up once (14 -> 6 us of Python around a 10-30 us kernel here)."""
    kernels = {"none": getattr(torch.ops.quantized, kind).default,
               "relu": getattr(torch.ops.quantized, f"{kind}_relu").default}

    def run(a, a_scale, a_zp, b, b_scale, b_zp, y_scale, y_zp, *, act="none", act_args=(),
            y_qmin=0, y_qmax=255, quantized_out=False):
        fn = kernels.get(act)
        if fn is None or y_qmin != 0 or y_qmax != 255 or a.dtype not in CODES \
                or b.dtype not in CODES or a.device.type != "cpu" or b.device.type != "cpu":
            return reference(plain_codes(a), a_scale, a_zp, plain_codes(b), b_scale, b_zp,
                             y_scale, y_zp, act=act, act_args=act_args, y_qmin=y_qmin,
                             y_qmax=y_qmax)
        y = fn(on_grid(a, a_scale, a_zp), on_grid(b, b_scale, b_zp), float(y_scale), int(y_zp))
        return y if quantized_out else codes_of(y)

    # linked in the direct twin: either operand may be a layer's quint8 output
    return linkable((0, 3))(run)


@linkable((0,))  # in the direct twin any input may be a quint8 tensor, used where on its grid
def _cat_cpu(qs, scales, zps, dim, y_scale, y_zp, y_qmin, y_qmax, *, quantized_out=False):
    if not _quint8(*qs, grid=(y_qmin, y_qmax), linked=True):
        return cat_int8_reference([plain_codes(q) for q in qs], scales, zps, dim, y_scale, y_zp,
                                  y_qmin, y_qmax)
    y = torch.ops.quantized.cat([on_grid(q, s, z) for q, s, z in zip(qs, scales, zps)], dim,
                                _f(y_scale), int(y_zp))
    return y if quantized_out else codes_of(y)


def _adaptive_avg_pool_cpu(q, output_size, scale, zp, qmin, qmax, y_scale=None, y_zp=None):
    if not _quint8(q, grid=(qmin, qmax)):
        return adaptive_avg_pool2d_int8_reference(q, output_size, scale, zp, qmin, qmax,
                                                  y_scale, y_zp)
    if y_scale is None:  # on its input's grid: PyTorch's quantized pooling keeps it
        return codes_of(F.adaptive_avg_pool2d(as_quantized(q, _f(scale), int(zp)),
                                              list(output_size)))
    # onto its own grid: the float average of the values, quantized once (the IR's arithmetic;
    # a quantized pool then a requantize would round twice)
    zp_y = zp if y_zp is None else y_zp
    hw = q.shape[-1] * q.shape[-2] if q.dim() == 4 else 0
    if hw and list(output_size) == [1, 1] and hw * 255 < 2 ** 24:
        # a global pool (squeeze-excitation, the head): the codes summed exactly in float32
        # (13 us against 38 for dequantize + pool on [1, 120, 28, 28]), then
        # (sum - hw * zp) * scale / hw, the IR's average up to float rounding (a tie may land
        # one code away, as any kernel's)
        y = q.sum((2, 3), dtype=torch.float32, keepdim=True)
        y = y.sub_(hw * int(zp)).mul_(_f(scale)).div_(hw)
        return codes_of(torch.quantize_per_tensor(y, _f(y_scale), int(zp_y), torch.quint8))
    y = F.adaptive_avg_pool2d(as_quantized(q, _f(scale), int(zp)).dequantize(),
                              list(output_size))
    return codes_of(torch.quantize_per_tensor(y, _f(y_scale), int(zp_y), torch.quint8))


@linkable((0,))
def _avg_pool2d_cpu(q, kernel_size, stride, padding, ceil_mode, count_include_pad, scale, zp,
                    qmin, qmax, *, quantized_out=False):
    """Bit for bit on channels-last codes; contiguous ones round a tie after adding the zero
    point (within one code)."""
    if not _quint8(q, grid=(qmin, qmax), linked=True):
        return avg_pool2d_int8_reference(plain_codes(q), kernel_size, stride, padding, ceil_mode,
                                         count_include_pad, scale, zp, qmin, qmax)
    y = F.avg_pool2d(on_grid(q, scale, zp), list(kernel_size), list(stride), list(padding),
                     ceil_mode, count_include_pad)
    return y if quantized_out else codes_of(y)


@linkable((0,))
def _max_pool_cpu(q, kernel_size, stride, padding, dilation, ceil_mode, *, quantized_out=False):
    # any grid: the codes' maximum is the values' (a linked input's grid is kept, so the next
    # op may use the result as it is)
    if not _quint8(q, linked=True):
        return max_pool2d_int8_reference(plain_codes(q), kernel_size, stride, padding, dilation,
                                         ceil_mode)
    y = F.max_pool2d(q if q.dtype is torch.quint8 else as_quantized(q, 1.0, 0),
                     list(kernel_size), list(stride), list(padding), list(dilation), ceil_mode)
    return y if quantized_out else codes_of(y)


def quantized_nearest_alike(scale_factors) -> bool:
    """Whether PyTorch's quantized nearest kernel indexes as its float one (the IR's rule) for
    these scale factors: it computes ``floor(i * float32(1 / scale))`` for every size, the float
    kernel copies a kept size and halves the index of a doubled one, so they differ for a scale
    factor in (1, 1.5) or (2, 2.5) (a size given is always alike)."""
    return not any(1 < f < 1.5 or 2 < f < 2.5 for f in (scale_factors or []))


def _upsample_nearest_cpu(q, output_size, scale_factors, scale, zp, qmin, qmax):
    if not (_quint8(q, grid=(qmin, qmax)) and quantized_nearest_alike(scale_factors)):
        return upsample_nearest2d_int8_reference(q, output_size, scale_factors, scale, zp, qmin,
                                                 qmax)
    return codes_of(F.interpolate(as_quantized(q, _f(scale), int(zp)), size=output_size,
                                  scale_factor=scale_factors, mode="nearest"))


@linkable((0,))
def _batch_norm_cpu(q, weight, bias, mean, var, eps, x_scale, x_zp, y_scale, y_zp, *,
                    act="none", act_args=(), y_qmin=0, y_qmax=255, quantized_out=False):
    """``quantized::batch_norm2d(_relu)`` (torch.ao's kernel for DenseNet's BN-ReLU): the
    per-channel factors ``weight / sqrt(var + eps) * x_scale / y_scale`` on the centered codes,
    one rounding. It writes channels-last: a contiguous input's result is copied back."""
    if act not in ("none", "relu") or q.dim() != 4 or \
            not _quint8(q, grid=(y_qmin, y_qmax), linked=True):
        return batch_norm2d_int8_reference(plain_codes(q), weight, bias, mean, var, eps, x_scale,
                                           x_zp, y_scale, y_zp, act=act, act_args=act_args,
                                           y_qmin=y_qmin, y_qmax=y_qmax)
    fn = torch.ops.quantized.batch_norm2d_relu if act == "relu" else \
        torch.ops.quantized.batch_norm2d
    y = to_format(fn(on_grid(q, x_scale, x_zp), weight, bias, mean, var, float(eps),
                     _f(y_scale), int(y_zp)), out_format(q))
    return y if quantized_out else codes_of(y)


def _on_quantized_kernels(ir, fast):
    """``cpu_<ir op>``: the IR op's signature, reference and fake; ``fast`` on the CPU."""
    return define_op("cpu_" + ir.signature, family="cpu", quantized=True,
                     reference=ir.reference, fake=ir.fake, cpu=fast)


CPU_QUANTIZE = _on_quantized_kernels(QUANTIZE, _quantize_cpu)
CPU_DEQUANTIZE = _on_quantized_kernels(DEQUANTIZE, _dequantize_cpu)
CPU_ADD_INT8 = _on_quantized_kernels(ADD_INT8, _binary_cpu("add", add_int8_reference))
CPU_MUL_INT8 = _on_quantized_kernels(MUL_INT8, _binary_cpu("mul", mul_int8_reference))
CPU_CAT_INT8 = _on_quantized_kernels(CAT_INT8, _cat_cpu)
CPU_ADAPTIVE_AVG_POOL2D_INT8 = _on_quantized_kernels(AVGPOOL_INT8, _adaptive_avg_pool_cpu)
CPU_AVG_POOL2D_INT8 = _on_quantized_kernels(AVG_POOL2D_INT8, _avg_pool2d_cpu)
CPU_MAX_POOL2D_INT8 = _on_quantized_kernels(MAXPOOL_INT8, _max_pool_cpu)
CPU_UPSAMPLE_NEAREST2D_INT8 = _on_quantized_kernels(UPSAMPLE_NEAREST2D_INT8,
                                                    _upsample_nearest_cpu)
CPU_BATCH_NORM2D_INT8 = _on_quantized_kernels(BATCH_NORM2D_INT8, _batch_norm_cpu)
# the IR op -> the op that runs it on plain codes on the CPU (same arguments)
CPU_OF = {ir.overload: op for ir, op in (
    (QUANTIZE, CPU_QUANTIZE), (DEQUANTIZE, CPU_DEQUANTIZE), (ADD_INT8, CPU_ADD_INT8),
    (MUL_INT8, CPU_MUL_INT8), (CAT_INT8, CPU_CAT_INT8),
    (AVGPOOL_INT8, CPU_ADAPTIVE_AVG_POOL2D_INT8), (AVG_POOL2D_INT8, CPU_AVG_POOL2D_INT8),
    (MAXPOOL_INT8, CPU_MAX_POOL2D_INT8), (UPSAMPLE_NEAREST2D_INT8, CPU_UPSAMPLE_NEAREST2D_INT8),
    (BATCH_NORM2D_INT8, CPU_BATCH_NORM2D_INT8))}
