"""The paper's tables computed from the models this package builds, each row beside the paper's values.

Functions here count and trace; they print nothing. `mnv2 profile` prints some of them as terminal tables and
`mnv2 paper` writes all of them into its report. Every `paper_*` value comes from `reference` (someone else's number);
every other value is computed here.
"""

from __future__ import annotations

from . import reference

TABLE4_MODELS = {  # Table 4 row -> (registered model, kwargs); NasNet-A is not built here
    "MobileNetV1": ("mobilenet_v1", {"width_mult": 1.0}),
    "ShuffleNet (1.5)": ("shufflenet_v1", {"width_mult": 1.5, "groups": 3}),
    "ShuffleNet (x2)": ("shufflenet_v1", {"width_mult": 2.0, "groups": 3}),
    "NasNet-A": None,
    "MobileNetV2": ("mobilenet_v2", {"width_mult": 1.0}),
    "MobileNetV2 (1.4)": ("mobilenet_v2", {"width_mult": 1.4}),
}


def bn_params(model) -> int:
    """BatchNorm's scale and offset: 2 per channel of every BN layer (the TF-Slim zoo's counts leave them out)."""
    from torch import nn
    return sum(p.numel() for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters())


def _shape(t) -> str:
    return "x".join(map(str, (*t.shape[2:], t.shape[1]))) if t.dim() == 4 else "x".join(map(str, t.shape[1:]))


def _record_shapes(model, modules: dict, resolution: int) -> dict[str, tuple[str, str]]:
    """(input shape, output shape) as 'HxWxC' of each named module in one forward pass at `resolution`."""
    import torch
    seen, hooks = {}, []

    def record(name):
        def hook(module, inputs, output) -> None:
            seen.setdefault(name, (_shape(inputs[0]), _shape(output)))
        return hook

    for name, m in modules.items():
        hooks.append(m.register_forward_hook(record(name)))
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, resolution, resolution))
    finally:
        for h in hooks:
            h.remove()
    return seen


def table1(resolution: int = 224) -> list[dict]:
    """Paper Table 1 on two real blocks of MobileNetV2 1.0 (a stride-2 block and a stride-1 block with its shortcut):
    each operator's input and output shapes traced at `resolution`, beside the paper's symbolic row, and the block's
    multiply-adds counted against the Table 1 cost formula h*w*k*t*k + (h/s)*(w/s)*t*k*(9 + k')."""
    from ..models import create_model
    model = create_model("mobilenet_v2")
    rows = []
    for index in (1, 2):
        block = model.blocks[index]
        parts = {"expand": block.expand, "dw": block.dw, "project": block.project, "block": block}
        shapes = _record_shapes(model, parts, resolution)
        h = int(shapes["block"][0].split("x")[0])
        k, k2, s = block.in_ch, block.out_ch, block.stride
        t = block.hidden // k
        formula = h * h * k * t * k + (h // s) * (h // s) * t * k * (9 + k2)
        counted = _block_madds(block, k, h)
        ops = []
        for (paper_in, paper_op, paper_out), part in zip(reference.TABLE1, ("expand", "dw", "project")):
            ours_in, ours_out = shapes[part]
            ops.append({"paper_input": paper_in, "operator": paper_op, "paper_output": paper_out,
                        "input": ours_in, "output": ours_out})
        rows.append({"block": index, "h": h, "k": k, "t": t, "s": s, "k_out": k2, "shortcut": block.use_residual,
                     "ops": ops, "madds": counted, "formula_madds": formula})
    return rows


def _block_madds(block, channels: int, size: int) -> int:
    """A block's multiply-adds on a `channels` x `size` x `size` input, by the package's counter."""
    from torch import nn

    from ..analysis import count_madds

    class _Input(nn.Module):  # count_madds feeds 3-channel images; a block takes `channels`
        def __init__(self):
            super().__init__()
            self.block = block

        def forward(self, x):
            return self.block(x.new_zeros(x.shape[0], channels, *x.shape[2:]))

    return count_madds(_Input(), (size, size))


def table2(resolution: int = 224, width: float = 1.0) -> list[dict]:
    """Paper Table 2 read off the built MobileNetV2: per row the traced input shape, the operator, and t, c, n, s
    taken from the modules themselves (expansion = hidden / input channels, n = blocks in the stage, s = the first
    block's stride), beside the paper's row."""
    from ..models import create_model
    model = create_model("mobilenet_v2", width_mult=width)
    stage_of, first = {}, 0
    for end in sorted(model._stage_ends):
        stage_of[first] = end
        first = end + 1
    modules = {"stem": model.stem, "head": model.head, "pool": model.pool, "classifier": model.classifier}
    modules.update({f"stage{i}": model.blocks[i] for i in stage_of})
    shapes = _record_shapes(model, modules, resolution)
    stem = model.stem.conv
    rows = [{"input": shapes["stem"][0], "operator": "conv2d", "t": None, "c": stem.out_channels, "n": 1,
             "s": stem.stride[0]}]
    for start, end in stage_of.items():
        block = model.blocks[start]
        rows.append({"input": shapes[f"stage{start}"][0], "operator": "bottleneck", "t": block.hidden // block.in_ch,
                     "c": block.out_ch, "n": end - start + 1, "s": block.stride})
    rows.append({"input": shapes["head"][0], "operator": "conv2d 1x1", "t": None, "c": model.head.conv.out_channels,
                 "n": 1, "s": model.head.conv.stride[0]})
    h = shapes["pool"][0].split("x")
    rows.append({"input": shapes["pool"][0], "operator": f"avgpool {h[0]}x{h[1]}", "t": None, "c": None, "n": 1,
                 "s": None})
    rows.append({"input": f"1x1x{model.classifier.in_features}", "operator": "conv2d 1x1", "t": None,
                 "c": model.classifier.out_features, "n": None, "s": None})
    for row, paper in zip(rows, reference.TABLE2):
        row["paper"] = dict(zip(("input", "operator", "t", "c", "n", "s"), paper))
    return rows


def table4_counts(resolution: int = 224) -> list[dict]:
    """Paper Table 4's networks: parameters (with and without BatchNorm's scale and offset) and multiply-adds of
    every row built here, beside the paper's columns. NasNet-A is not built (its row has the paper's values only)."""
    from ..analysis import count_madds, count_params
    from ..models import create_model
    rows = []
    for network, (top1, params_m, madds_m, pixel_ms) in reference.TABLE4.items():
        row = {"network": network, "paper_top1": top1, "paper_params_m": params_m, "paper_madds_m": madds_m,
               "paper_pixel1_ms": pixel_ms}
        built = TABLE4_MODELS.get(network)
        if built is not None:
            model = create_model(built[0], num_classes=1000, **built[1])
            params = count_params(model)
            row.update(model=built[0], kwargs=built[1], params=params, params_without_bn=params - bn_params(model),
                       madds=count_madds(model, resolution))
        rows.append(row)
    return rows


def figure5_grid(num_classes: int = 1000) -> list[dict]:
    """The Figure 5 grid (width x resolution): our parameters and multiply-adds beside the TF-Slim zoo's values."""
    from ..analysis import count_madds, count_params
    from ..models import create_model
    cells = list(reference.GRID_EXTRA) + [(a, r) for a in reference.GRID_WIDTHS for r in reference.GRID_RESOLUTIONS]
    rows, models = [], {}
    for a, r in cells:
        if a not in models:
            models[a] = create_model("mobilenet_v2", width_mult=a, num_classes=num_classes)
        model = models[a]
        top1, paper_madds = reference.FIGURE5[(a, r)]
        params = count_params(model)
        rows.append({"width": a, "resolution": r, "params": params, "params_without_bn": params - bn_params(model),
                     "madds": count_madds(model, r), "paper_madds_m": paper_madds, "paper_top1": top1,
                     "paper_params_m": reference.FIGURE5_PARAMS_M[a]})
    return rows


def table5(num_classes: int = 80, width: float = 1.0) -> dict:
    """Paper Table 5 (SSD vs SSDLite prediction layers) and the Table 6 MobileNetV2 + SSDLite row at 300 and 320.

    "Prediction layers" = the four extra feature layers + the class and box heads: everything but the backbone.
    """
    from ..models import create_model
    rows = []
    for heads in ("ssd", "ssdlite"):
        model = create_model("ssdlite_mobilenet_v2", heads=heads, num_classes=num_classes, width_mult=width)
        row = {"heads": heads, "num_classes": num_classes, "width": width,
               "paper_params_m": reference.TABLE5[heads][0], "paper_madds_b": reference.TABLE5[heads][1]}
        for size in (300, 320):
            parts = _parts(model, size)
            for name, keys in (("prediction", ("extras", "cls_heads", "box_heads")),
                               ("heads", ("cls_heads", "box_heads")), ("total", tuple(parts))):
                row[f"{name}_params"] = sum(parts[k][0] for k in keys)
                row[f"{name}_madds_{size}"] = sum(parts[k][1] for k in keys)
        rows.append(row)
    _, params_m, madds_b, _ = reference.TABLE6["MNet V2 + SSDLite"]
    return {"table5": rows, "table6_paper": {"paper_params_m": params_m, "paper_madds_b": madds_b}}


def table7(num_classes: int = 21, width: float = 1.0) -> list[dict]:
    """Paper Table 7's rows: the MobileNet ones counted at 512 x 512 (and at TF DeepLab's 513 crops, plain and with
    TF 1.x's atrous grid) beside the paper's values; ResNet-101's with the paper's values only.

    The models are built on the meta device: shapes only, so the 12 passes of an MF row at up to 896 x 896 are counted
    without being computed.
    """
    import torch

    from ..analysis import count_madds, count_params
    from ..models import create_model
    rows = []
    for (network, stride, aspp, mf), (miou, paper_params, paper_madds) in reference.TABLE7.items():
        row = {"network": network, "output_stride": stride, "aspp": aspp, "mf": mf, "paper_miou": miou,
               "paper_params_m": paper_params, "paper_madds_b": paper_madds}
        name = reference.TABLE7_MODELS.get(network)
        if name is not None:
            with torch.device("meta"):
                model = create_model(name, num_classes=num_classes, width_mult=width, output_stride=stride,
                                     aspp=aspp)
            scales = reference.TABLE7_MF_SCALES if mf else (1.0,)
            passes = 2 if mf else 1  # each scale and its left-right flip
            at_513 = [madds_513(model, round(512 * s) + 1) for s in scales]
            row.update(model=name, params=count_params(model),
                       madds=passes * sum(count_madds(model, round(512 * s)) for s in scales),
                       madds_513=passes * sum(plain for plain, _ in at_513),
                       madds_513_tf_atrous=passes * sum(tf for _, tf in at_513))
        rows.append(row)
    return rows


def madds_513(model, size: int) -> tuple[int, int]:
    """(MAdds, MAdds with dilated convs counted as TF 1.x computes them), from one per-layer count.

    TF 1.x runs a dilated conv as space_to_batch -> conv -> batch_to_space on the map padded to a multiple of the rate
    (`required_space_to_batch_paddings`): r * (ceil((n + (k - 1) * r) / r) - (k - 1)) outputs per dimension of an
    n-wide map. Every multiply-add of these models is in a profiled layer, so the first number is `count_madds`'s.
    """
    from torch import nn

    from ..analysis import profile_layers
    from ..models.blocks import ConvBNAct
    modules = dict(model.named_modules())
    plain = tf = 0
    for row in profile_layers(model, size):
        m = modules[row.name]
        conv = m.conv if isinstance(m, ConvBNAct) else m
        rate = conv.dilation[0] if isinstance(conv, nn.Conv2d) else 1
        plain += row.madds
        if rate == 1:
            tf += row.madds
            continue
        k = conv.kernel_size[0]
        h, w = row.output_shape[-2:]
        grid = [rate * (-(-(n + (k - 1) * rate) // rate) - (k - 1)) for n in (h, w)]
        tf += row.madds * grid[0] * grid[1] // (h * w)
    return plain, tf


def _parts(model, size) -> dict[str, tuple[int, int]]:
    """(params, MAdds) per top-level submodule (backbone, extras, cls_heads, box_heads), from one counted pass."""
    from ..analysis import profile_layers
    parts: dict[str, tuple[int, int]] = {}
    for r in profile_layers(model, size):
        top = r.name.split(".")[0]
        params, madds = parts.get(top, (0, 0))
        parts[top] = (params + r.params, madds + r.madds)
    return parts
