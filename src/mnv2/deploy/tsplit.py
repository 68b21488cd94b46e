"""Memory-efficient inference of paper section 5.1: every bottleneck as a t-way split sum.

A bottleneck is F(x) = B(N(A(x))): A the expansion (linear once BN is folded), N = ReLU6 . depthwise . ReLU6 (per
channel), B the linear projection. Cutting the n inner channels into t slices gives F(x) = sum_i B_i(N(A_i(x))), where
A_i are rows of A and B_i the matching columns of B -- the same function, not an approximation. Accumulating the sum in
place keeps a single n/t-channel slice of the wide inner tensor alive at a time.

Table 3's caption applies the same argument to the first layer: the stem conv is linear and computes each output channel
on its own, so stem conv (as A) + the first block's depthwise (in N) + its projection (as B) form one split op, and the
stem's 32-channel map at half the input resolution never exists whole.

Layout: activations run channels_last, so a 1x1 conv is one matrix multiply over (batch * pixels) rows and the
projection accumulates with `addmm_` into the output buffer, which allocates nothing per slice.

Speed: at 224x224 and t = 4 the split makes ~70 small calls instead of ~18 large ones, so the fixed cost of each call
matters as much as its arithmetic. Where the native kernels build (`native.py`, `csrc/tsplit_kernels.cpp`) a whole
bottleneck is one call: per slice a matrix multiply for the expansion, a depthwise kernel that applies the expansion's
bias and ReLU6 as it reads and its own as it writes, and an accumulating matrix multiply for the projection. Elsewhere
(or for other dtypes) the slices run as PyTorch calls: oneDNN's convolution with prepacked weights and fused ReLU6 for
the depthwise where oneDNN exists, `F.conv2d` + `clamp_` otherwise. All paths compute the same function.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from .. import native
from ..models.blocks import Conv2dSame, ConvBNAct, InvertedResidual, _same_pad
from ..models.deeplab import DeepLabV3
from ..models.mobilenetv2 import MobileNetV2
from .fold import fold_bn


def _clamp_of(act: nn.Module) -> tuple[float | None, float | None] | None:
    """The (min, max) clamp an activation module applies, or None for a linear (Identity) layer."""
    if isinstance(act, nn.ReLU6):
        return (0.0, 6.0)
    if isinstance(act, nn.ReLU):
        return (0.0, None)
    if isinstance(act, nn.Identity):
        return None
    raise ValueError(f"tsplit: unsupported activation {type(act).__name__}")


def _apply_clamp(x: torch.Tensor, bounds) -> torch.Tensor:
    return x if bounds is None else x.clamp_(*bounds)


_ONEDNN_CONV = (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
                and hasattr(torch.ops.mkldnn, "_reorder_convolution_weight"))
_conv_pointwise = torch.ops.mkldnn._convolution_pointwise if _ONEDNN_CONV else None
_NATIVE = True  # use the native kernels where they build (tests turn this off to check the PyTorch paths)
_INF = float("inf")


def _bounds_or_inf(bounds) -> tuple[float, float]:
    """`bounds` (see `_clamp_of`) as two floats, +-inf where there is no clamp: the native kernels' convention."""
    lo, hi = bounds if bounds is not None else (None, None)
    return (-_INF if lo is None else float(lo), _INF if hi is None else float(hi))


def _post_op(bounds) -> tuple[str, list[float]]:
    """The oneDNN post-op (name, scalars) that applies `bounds` (see `_clamp_of`)."""
    if bounds is None:
        return "none", []
    lo, hi = bounds
    if lo == 0 and hi is None:
        return "relu", []
    return "hardtanh", [float(lo), float(hi)]


def _pack_conv(weight: torch.Tensor, conv: _Conv, groups: int) -> torch.Tensor:
    """`weight` reordered into oneDNN's blocked layout (an opaque mkldnn tensor), once instead of on every call."""
    ic = weight.shape[1] * groups
    return torch.ops.mkldnn._reorder_convolution_weight(
        weight, list(conv.padding), list(conv.stride), list(conv.dilation), groups, [1, ic, 32, 32])


def _slice_sizes(n: int, t: int) -> list[int]:
    """t slices of n channels (t capped at n); the first n % t slices get one channel more."""
    t = max(1, min(t, n))
    return [n // t + (1 if i < n % t else 0) for i in range(t)]


class _Conv:
    """What a folded conv needs at run time: stride, dilation, and symmetric padding or TF 'SAME' padding."""

    def __init__(self, conv: nn.Conv2d):
        self.stride, self.dilation, self.kernel = conv.stride, conv.dilation, conv.kernel_size
        self.same = isinstance(conv, Conv2dSame)
        self.padding = (0, 0) if self.same else conv.padding

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        if not self.same:
            return x
        ih, iw = x.shape[-2:]
        ph = _same_pad(ih, self.kernel[0], self.stride[0], self.dilation[0])
        pw = _same_pad(iw, self.kernel[1], self.stride[1], self.dilation[1])
        return F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2]) if ph or pw else x


class SplitBottleneck(nn.Module):
    """One bottleneck (or the stem fused with the first block) computed as the t-way split sum of section 5.1.

    `first` is the operator playing A: a 1x1 expansion ConvBNAct, the stem ConvBNAct (any kernel / stride), or None
    when the block has no expansion (A is the identity and slice i is just input channels of slice i).
    All modules must have their BN folded (`fold_bn`). Weight slices are cut once here, as contiguous tensors.
    """

    def __init__(self, first: ConvBNAct | None, dw: ConvBNAct, project: ConvBNAct, residual: bool, t: int):
        super().__init__()
        n = dw.conv.in_channels
        self.sizes = _slice_sizes(n, t)
        self.residual = residual
        self.kind = "identity" if first is None else ("pointwise" if _is_pointwise(first.conv) else "conv")
        self.first_conv = _Conv(first.conv) if first is not None else None
        self.first_act = _clamp_of(first.act) if first is not None else None
        self.dw_conv, self.dw_act = _Conv(dw.conv), _clamp_of(dw.act)
        self.out_act = _clamp_of(project.act)
        self.out_channels = project.conv.out_channels
        pw = project.conv.weight.detach().reshape(self.out_channels, n)
        bounds = [0, *itertools.accumulate(self.sizes)]
        for i, (lo, hi) in enumerate(itertools.pairwise(bounds)):
            if first is not None:
                w, b = first.conv.weight.detach()[lo:hi], first.conv.bias.detach()[lo:hi]
                if self.kind == "pointwise":  # (n_i, in), the layout of a linear layer
                    w = w.reshape(hi - lo, -1)
                else:
                    w = w.contiguous(memory_format=torch.channels_last)
                self.register_buffer(f"a_w{i}", w.contiguous() if self.kind == "pointwise" else w)
                self.register_buffer(f"a_b{i}", b.contiguous())
            self.register_buffer(f"d_w{i}", dw.conv.weight.detach()[lo:hi].contiguous())
            self.register_buffer(f"d_b{i}", dw.conv.bias.detach()[lo:hi].contiguous())
            self.register_buffer(f"b_w{i}", pw[:, lo:hi].t().contiguous())  # (n_i, out): right operand
        self.bounds = bounds
        self.register_buffer("b_bias", project.conv.bias.detach().clone())
        self._cache()

    def _cache(self) -> None:
        """One tuple per slice, so the per-slice loop does no module attribute look-ups (it runs t times per block).

        On the oneDNN path the depthwise (and the stem conv) weights are also reordered here, once, into the blocked
        layout oneDNN computes with; the plain convolution would reorder them on every call. Called again after
        `.to()` / `.double()` (`_apply`), so a converted module takes the path that fits its new dtype / device."""
        has_a = self.kind != "identity"
        cpu32 = self.d_w0.dtype == torch.float32 and self.d_w0.device.type == "cpu"
        self._native = cpu32 and _NATIVE and native.available()
        self._fast = cpu32 and _ONEDNN_CONV
        dc, fc = self.dw_conv, self.first_conv
        slices = []
        for i, (size, lo, hi) in enumerate(zip(self.sizes, self.bounds[:-1], self.bounds[1:], strict=True)):
            aw = getattr(self, f"a_w{i}") if has_a else None
            dw = getattr(self, f"d_w{i}")
            if self._native:
                dw = dw.flatten(1).t().contiguous()  # (kh * kw, n_i), the native kernel's layout
            elif self._fast:
                dw = _pack_conv(dw, dc, size)
            if self._fast and self.kind == "conv":
                aw = _pack_conv(aw, fc, 1)
            slices.append((size, lo, hi, aw, getattr(self, f"a_b{i}") if has_a else None, dw,
                           getattr(self, f"d_b{i}"), getattr(self, f"b_w{i}")))
        self._slices = slices
        if self._native:  # split_block's per-slice weight lists (no expansion lists for an identity A)
            _, _, _, aw, ab, dw, db, bw = (list(column) for column in zip(*slices, strict=True))
            pointwise = self.kind == "pointwise"
            self._native_args = (aw if pointwise else [], ab if pointwise else [], dw, db, bw)
            self._bounds = [*_bounds_or_inf(self.first_act), *_bounds_or_inf(self.dw_act),
                            *_bounds_or_inf(self.out_act)]
            self._geometry = {}
        # oneDNN post-op names of the activations (ReLU6 = hardtanh(0, 6)), for the fused calls.
        self._first_post = _post_op(self.first_act)
        self._dw_post = _post_op(self.dw_act)

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self._cache()
        return out

    def __getstate__(self):
        """Pickle / deepcopy without the prepared tuples: oneDNN's packed weights have no storage to copy."""
        state = self.__dict__.copy()
        for key in ("_slices", "_native_args", "_geometry"):
            state.pop(key, None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._cache()

    def dw_geometry(self, h: int, w: int) -> list[int]:
        """The depthwise filter's (kh, kw, sh, sw, pad top, pad left, dh, dw, out h, out w) on an h x w slice."""
        dc = self.dw_conv
        (kh, kw), (sh, sw), (dh, dw) = dc.kernel, dc.stride, dc.dilation
        if dc.same:  # TF 'SAME': the padding depends on the input size; the extra row / column goes bottom / right
            ph, pw = _same_pad(h, kh, sh, dh), _same_pad(w, kw, sw, dw)
            top, left = ph // 2, pw // 2
        else:
            top, left = dc.padding
            ph, pw = 2 * top, 2 * left
        return [kh, kw, sh, sw, top, left, dh, dw, (h + ph - dh * (kh - 1) - 1) // sh + 1,
                (w + pw - dw * (kw - 1) - 1) // sw + 1]

    def _geometry_for(self, h: int, w: int) -> list[int]:
        g = self._geometry.get((h, w))
        if g is None:
            g = self._geometry[(h, w)] = self.dw_geometry(h, w)
        return g

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        hw = h * w
        kind, dc, fc, fast = self.kind, self.dw_conv, self.first_conv, self._fast
        if self._native and kind != "conv":  # the whole block, every slice, in one native call
            return torch.ops.mnv2_native.split_block(
                x.contiguous(memory_format=torch.channels_last), *self._native_args, self.b_bias,
                self._geometry_for(h, w), self._bounds, self.residual)
        x2d = x.permute(0, 2, 3, 1).reshape(-1, c) if kind == "pointwise" or self.residual else None
        if kind == "conv":
            # TF 'SAME' padding and channels_last, once for all slices: the convolution would otherwise copy an NCHW
            # input to channels_last in every slice (measured: 3 of 4 input copies were a third of this op at t = 4).
            x = fc.pad(x).contiguous(memory_format=torch.channels_last)
        d_stride, d_pad, d_dil, d_same = dc.stride, dc.padding, dc.dilation, dc.same
        first_act, first_post, dw_act, dw_post = self.first_act, self._first_post, self.dw_act, self._dw_post
        acc = None
        for size, lo, hi, aw, ab, dw, db, bw in self._slices:
            # A_i and its activation: slice i of the inner tensor, (N, n_i, H, W) channels_last.
            if kind == "pointwise":
                # (N*H*W, n_i) rows -> the same memory seen as (N, n_i, H, W) channels_last: one call, no copy
                e = _linear_act(x2d, aw, ab, first_act).as_strided((n, size, h, w), (hw * size, 1, w * size, size))
            elif kind == "conv":
                if fast:
                    e = _conv_pointwise(x, aw, ab, fc.padding, fc.stride, fc.dilation, 1, *first_post, "")
                else:
                    e = _apply_clamp(F.conv2d(x, aw, ab, fc.stride, fc.padding, fc.dilation), first_act)
            else:
                e = x[:, lo:hi]
            # N_i: the slice's depthwise filters and their ReLU6 (fused into the convolution on the oneDNN path).
            if self._native:  # the stem's slice, channels_last as the convolution wrote it: viewed as (pixels, n_i)
                geometry = self._geometry_for(*e.shape[-2:])
                d2 = torch.ops.mnv2_native.depthwise_nhwc(e.permute(0, 2, 3, 1).reshape(-1, size), n, *e.shape[-2:],
                                                          dw, db, *self._bounds[2:4], geometry)
                ho, wo = geometry[-2:]
            else:
                if d_same:
                    e = dc.pad(e)
                if fast:
                    d = _conv_pointwise(e, dw, db, d_pad, d_stride, d_dil, size, *dw_post, "")
                else:
                    d = _apply_clamp(F.conv2d(e, dw, db, d_stride, d_pad, d_dil, size), dw_act)
                ho, wo = d.shape[-2:]
                if d.is_contiguous(memory_format=torch.channels_last):  # as oneDNN writes it: view as (pixels, n_i)
                    d2 = d.as_strided((n * ho * wo, size), (size, 1))
                else:
                    d2 = d.permute(0, 2, 3, 1).reshape(-1, size)
                del d
            del e  # free this slice of the expanded tensor before the next one exists
            # B_i: accumulate the slice's projection; the projection bias enters once, with the first slice.
            if acc is None:
                acc = torch.addmm(self.b_bias, d2, bw)
            else:
                acc.addmm_(d2, bw)
            del d2
        _apply_clamp(acc, self.out_act)
        if self.residual:
            acc.add_(x2d)
        return acc.view(n, ho, wo, self.out_channels).permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return f"A={self.kind}, slices={self.sizes}, residual={self.residual}"


_FUSED_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
_FUSED_MIN_NUMEL = 1 << 18


def _linear_act(x2d: torch.Tensor, w: torch.Tensor, b: torch.Tensor, bounds) -> torch.Tensor:
    """act(x2d @ w.T + b) for a (rows, in) matrix and a (out, in) weight.

    oneDNN's fused linear + clamp (the kernel torch.compile emits for the same pattern) writes the wide slice once;
    addmm would first copy the broadcast bias into it and the clamp would pass over it again (~25% slower measured
    here on the 1x1 expansions). Its fixed cost per call is ~10 us higher, so products below ~2^18 outputs keep addmm
    + clamp_ (measured break-even 1.5-2.3e5 outputs on 1 thread: a 3136 x 36 slice is 12% faster with addmm).
    """
    fused = _FUSED_LINEAR and x2d.dtype == torch.float32 and bounds is not None and bounds[1] is not None
    if fused and x2d.shape[0] * w.shape[0] >= _FUSED_MIN_NUMEL:
        return torch.ops.mkldnn._linear_pointwise(x2d, w, b, "hardtanh", list(bounds), "")
    return _apply_clamp(torch.addmm(b, x2d, w.t()), bounds)


class PointwiseHead(nn.Module):
    """The last 1x1 conv (+ ReLU6) and the global average pool, as one matrix multiply over channels_last pixels.

    PyTorch runs a 1x1 conv on a 7x7 map with its slow reference kernel; the matrix multiply is the same arithmetic.
    """

    def __init__(self, head: ConvBNAct):
        super().__init__()
        conv = head.conv
        self.register_buffer("weight", conv.weight.detach().reshape(conv.out_channels, -1).contiguous())
        self.register_buffer("bias", conv.bias.detach().clone())
        self.act = _clamp_of(head.act)

    def _pixels(self, x: torch.Tensor) -> torch.Tensor:
        """act(conv(x)) as a (N * H * W, C_out) matrix."""
        return _linear_act(x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]), self.weight, self.bias, self.act)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        return self._pixels(x).view(n, h, w, self.weight.shape[0]).permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features (N, C_out): the mean over each image's pixels."""
        n, _, h, w = x.shape
        return self._pixels(x).view(n, h * w, self.weight.shape[0]).mean(1)


def _is_pointwise(conv: nn.Conv2d) -> bool:
    return conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.groups == 1 and not isinstance(conv, Conv2dSame)


def _folded_for_split(model: nn.Module, t: int) -> nn.Module:
    """`model` BN-folded and frozen, after checking that it can be split."""
    if t < 1:
        raise ValueError(f"t must be a positive integer, got {t}")
    if getattr(model, "shortcut", "bottleneck") == "expansion":
        raise ValueError("tsplit: the 'expansion' shortcut ablation adds wide tensors across blocks and cannot be "
                         "split; use shortcut='bottleneck' or 'none'")
    folded = fold_bn(model)
    for p in folded.parameters():
        p.requires_grad_(False)
    return folded


def _split_body(folded: nn.Module, t: int) -> nn.Sequential:
    """A BN-folded MobileNetV2's stem and bottlenecks as split ops. Dilated depthwise filters (an atrous backbone,
    paper section 6.3) are part of N and split like any other: each slice keeps its channels' dilation and padding."""
    blocks = list(folded.blocks)
    if not all(isinstance(b, InvertedResidual) for b in blocks):
        raise ValueError("tsplit expects a MobileNetV2 (blocks of InvertedResidual)")
    ops: list[nn.Module] = []
    first = blocks[0]
    if first.expand is None and not first.use_residual:
        # Table 3 caption: stem conv (A) + first block's depthwise (N) + projection (B) as one split op.
        ops.append(SplitBottleneck(folded.stem, first.dw, first.project, False, t))
        blocks = blocks[1:]
    else:
        ops.append(folded.stem)
    for b in blocks:
        ops.append(SplitBottleneck(b.expand, b.dw, b.project, b.use_residual, t))
    return nn.Sequential(*ops)


class TSplitMobileNetV2(nn.Module):
    """A MobileNetV2 whose bottlenecks (and stem + first block) run as t-way split sums; same outputs as the model.

    Inference only: forward runs under `torch.inference_mode`.
    """

    def __init__(self, model: nn.Module, t: int):
        super().__init__()
        folded = _folded_for_split(model, t)
        self.t = t
        self.body = _split_body(folded, t)
        # head conv + global pool: the model's `head` and `pool` (a model without the last conv pools the last block)
        self.head = PointwiseHead(folded.head) if folded.head is not None else None
        self.dropout, self.classifier = folded.dropout, folded.classifier
        self.eval()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            f = self.body(x)
            return f if self.head is None else self.head.feature_map(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            f = self.body(x)
            pooled = f.mean((2, 3)) if self.head is None else self.head(f)
            return self.classifier(self.dropout(pooled))


class TSplitBackbone(nn.Module):
    """A BN-folded MobileNetV2 backbone's last maps through the split executor, behind the backbone's `forward_taps`:
    the last bottleneck's output and, when the backbone has it, the 1x1 head conv's. Earlier taps are not offered (the
    split ops do not stop at them)."""

    def __init__(self, folded: nn.Module, t: int):
        super().__init__()
        self.body = _split_body(folded, t)
        self.head = PointwiseHead(folded.head) if folded.head is not None else None
        taps = folded.feature_taps
        # The declared taps end with the last stage's output, then "head" when the last conv exists.
        self.last_block_tap = taps[-2].name if self.head is not None else taps[-1].name
        self.feature_taps = tuple(t for t in taps if t.name in (self.last_block_tap, "head"))

    def forward_taps(self, x: torch.Tensor, names) -> dict[str, torch.Tensor]:
        known = {t.name for t in self.feature_taps}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise KeyError(f"unknown feature tap(s) {unknown}; the split backbone has {sorted(known)}")
        out = {self.last_block_tap: self.body(x)}
        if "head" in names:
            out["head"] = self.head.feature_map(out[self.last_block_tap])
        return {n: out[n] for n in names}


class TSplitDeepLab(nn.Module):
    """Mobile DeepLabv3 with its MobileNetV2 backbone on the split executor (paper section 5.1 on the atrous
    backbone of section 6.3); the head runs as the BN-folded model's, whole (section 5.1 splits bottlenecks: the
    head's branches and their concatenation are materialised as in the model). Same outputs as the model; inference
    only."""

    def __init__(self, model: nn.Module, t: int):
        super().__init__()
        folded = _folded_for_split(model, t)
        if not isinstance(folded.backbone, MobileNetV2):
            raise TypeError(f"tsplit needs bottleneck blocks (a MobileNetV2 backbone), not a "
                             f"{type(folded.backbone).__name__}: its layers have no inner tensor to split")
        self.t = t
        folded.backbone = TSplitBackbone(folded.backbone, t)  # the copy's backbone: `model` is left untouched
        self.model = folded.eval()

    def forward_logits_at_stride(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.model.forward_logits_at_stride(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.model(x)


def tsplit(model: nn.Module, t: int) -> nn.Module:
    """`model` with BN folded and every bottleneck computed as the t-way split sum of paper section 5.1: a MobileNetV2
    (any width / padding / output stride), or a Mobile DeepLabv3 on one (its backbone split, dilated depthwise
    filters included; the segmentation head unchanged). t runs from 1 to an op's inner width; an op narrower than t is
    split into one-channel slices. The input may be in either memory format; activations run channels_last."""
    if isinstance(model, DeepLabV3):
        return TSplitDeepLab(model, t)
    return TSplitMobileNetV2(model, t)
