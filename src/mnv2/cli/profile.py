"""`mnv2 profile`: parameters and multiply-adds, per layer, the paper's Figure 5 grid, Tables 5-6 (SSDLite) and
Table 7 (Mobile DeepLabv3)."""

from __future__ import annotations

import json

from ..errors import UserError
from ..paper import reference

# torch and the models are imported inside the functions that count, so that building the parser does not import them.


def register(sub) -> None:
    p = sub.add_parser("profile", help="parameters and multiply-adds of a model, per layer, or a paper table",
                       description="Count parameters and multiply-adds (convs + linear, depthwise per group) of a "
                       "model at an input resolution. --grid prints the paper's Figure 5 grid, --table5 the paper's "
                       "SSDLite Tables 5-6, --table7 the paper's Mobile DeepLabv3 Table 7, beside the paper's "
                       "reference values.")
    p.add_argument("model", nargs="?", default="mobilenet_v2", help="registered model name (default: mobilenet_v2)")
    p.add_argument("--width", type=float, default=None, help="width multiplier alpha (default: the model's own, 1.0 "
                   "for MobileNets, 2.0 for ShuffleNet)")
    p.add_argument("--resolution", type=int, default=224, help="input height and width (default 224)")
    p.add_argument("--num-classes", type=int, default=None, help="classes (default: the model's own, 1000 for "
                   "classifiers, 80 for detectors)")
    p.add_argument("--output-stride", type=int, choices=(8, 16, 32), default=None, help="atrous output stride "
                   "(default: the model's own: 32 for classifiers, 16 for DeepLab; DeepLab takes 8 or 16)")
    p.add_argument("--aspp", action="store_true", help="DeepLab models: add the three atrous ASPP branches")
    p.add_argument("--per-layer", action="store_true", help="one row per layer: name, output shape, params, MAdds")
    p.add_argument("--grid", action="store_true", help="the Figure 5 grid: widths x resolutions, with paper values")
    p.add_argument("--table5", action="store_true", help="paper Tables 5-6: SSD vs SSDLite prediction layers and "
                   "MobileNetV2 + SSDLite at 300 and 320, beside the paper's values (80 classes unless --num-classes)")
    p.add_argument("--table7", action="store_true", help="paper Table 7: Mobile DeepLabv3's MobileNet rows (OS 16 / 8, "
                   "ASPP, multi-scale + flip) at 512x512, beside the paper's values (21 classes unless --num-classes)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--memory", action="store_true", help="paper section 5.1: eq. (2) working memory and the Table 3 "
                   "largest-tensor-per-resolution table (16-bit activations), beside the paper's values")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..analysis import count_madds, count_params, profile_layers
    if args.grid:
        return _grid(args)
    if args.table5:
        return _table5(args)
    if args.table7:
        return _table7(args)
    if args.resolution < 32:
        raise UserError(f"--resolution must be at least 32, got {args.resolution}")
    if args.memory:
        return _memory(args)
    model = _build(args)
    params, madds = count_params(model), count_madds(model, args.resolution)
    result = {"model": args.model, "width": args.width, "resolution": args.resolution,
              "num_classes": getattr(model, "num_classes", args.num_classes), "params": params, "madds": madds}
    if getattr(model, "output_stride", 32) != 32:
        result["output_stride"] = model.output_stride
    layers = profile_layers(model, args.resolution) if args.per_layer else None
    if args.json:
        if layers is not None:
            result["layers"] = [r.to_dict() for r in layers]
        print(json.dumps(result, indent=2))
        return 0
    if layers is not None:
        print(f"{'layer':<28} {'kind':<16} {'output':>18} {'params':>10} {'MAdds':>12}")
        for r in layers:
            shape = "x".join(map(str, r.output_shape[1:]))
            print(f"{r.name:<28} {r.kind:<16} {shape:>18} {r.params:>10,} {r.madds:>12,}")
        print()
    atrous = f", output stride {result['output_stride']}" if "output_stride" in result else ""
    print(f"{args.model} width {args.width:g}{atrous} @ {args.resolution}x{args.resolution}: "
          f"{params:,} parameters, {madds / 1e6:.1f}M MAdds")
    return 0


def _build(args):
    """The model to profile; `args.width` is filled in with the model's own width when not given."""
    from ..models import create_model
    kwargs = {} if args.num_classes is None else {"num_classes": args.num_classes}
    if args.width is not None:
        kwargs["width_mult"] = args.width
    if args.output_stride is not None:
        kwargs["output_stride"] = args.output_stride
    if args.aspp:
        kwargs["aspp"] = True
    try:
        model = create_model(args.model, **kwargs)
    except ValueError as e:  # a value the model does not take, e.g. --output-stride 32 for DeepLab
        raise UserError(f"model {args.model!r}: {e}") from None
    args.width = getattr(model, "width_mult", args.width)
    return model


def _grid(args) -> int:
    from ..paper.tables import figure5_grid
    args.num_classes = 1000 if args.num_classes is None else args.num_classes
    rows = figure5_grid(args.num_classes)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"MobileNetV2, paper Figure 5 grid ({args.num_classes} classes). 'paper' and 'zoo' columns are the TF-Slim "
          "model zoo's published values, not measured here.")
    print(f"{'width':>5} {'res':>4} {'params':>11} {'w/o BN':>11} {'zoo params*':>11} {'MAdds':>9} {'paper MAdds':>11} "
          f"{'paper top-1':>11}")
    for row in rows:
        print(f"{row['width']:>5g} {row['resolution']:>4} {row['params']:>11,} {row['params_without_bn']:>11,} "
              f"{row['paper_params_m']:>10.2f}M {row['madds'] / 1e6:>8.1f}M {row['paper_madds_m']:>10}M "
              f"{row['paper_top1']:>10.1f}%")
    print(GRID_FOOTNOTE)
    return 0


GRID_FOOTNOTE = """\
* zoo params: the TF-Slim release's parameter counts (1001 classes). They agree with 'w/o BN' (ours without
  BatchNorm's scale and offset) at every width, not with 'params' (ours with them, as torchvision counts): the zoo
  leaves BN out. The paper's own Table 4 gives 3.4M for 1.0 and 6.9M for 1.4."""


def _table5(args) -> int:
    """Paper Table 5 (prediction layers of SSD and SSDLite) and the Table 6 row, ours at 300 and 320 beside the paper's.
    "Prediction layers" here = the four extra feature layers + the class and box heads: everything but the backbone."""
    from ..paper.tables import table5
    classes = 80 if args.num_classes is None else args.num_classes
    width = 1.0 if args.width is None else args.width
    result = table5(classes, width)
    rows, table6 = result["table5"], result["table6_paper"]
    table6_params, table6_madds = table6["paper_params_m"], table6["paper_madds_b"]
    if args.json:
        print(json.dumps({"table5": rows, "table6_paper": table6}, indent=2))
        return 0
    print(f"ssdlite_mobilenet_v2 width {width:g}, {classes} classes + background, TF anchor layout. Prediction layers "
          "= 4 extra layers + class/box heads. 'paper' columns are the paper's values (Tables 5-6, 80 classes), not "
          "measured here.")
    print(f"{'':<34} {'params':>8} {'paper':>7} {'MAdds@300':>10} {'MAdds@320':>10} {'paper':>7}")

    def line(label, params, m300, m320, paper_p="", paper_m=""):
        print(f"{label:<34} {params / 1e6:>7.2f}M {paper_p:>7} {m300 / 1e9:>9.3f}B {m320 / 1e9:>9.3f}B {paper_m:>7}")

    for row in rows:
        name = row["heads"].replace("ssdlite", "SSDLite").replace("ssd", "SSD")
        line(f"Table 5 {name} prediction layers", row["prediction_params"], row["prediction_madds_300"],
             row["prediction_madds_320"], f"{row['paper_params_m']}M", f"{row['paper_madds_b']}B")
        line("  of which heads only", row["heads_params"], row["heads_madds_300"], row["heads_madds_320"])
    lite = rows[1]
    line("Table 6 MobileNetV2 + SSDLite", lite["total_params"], lite["total_madds_300"], lite["total_madds_320"],
         f"{table6_params}M", f"{table6_madds}B")
    return 0


TABLE7_FOOTNOTE = """\
'paper' columns are the paper's Table 7 values, not measured here; mIoU is the paper's (VOC 2012 val).
MF rows: the sum over the 12 passes of multi-scale + flip (scales 0.5-1.75 of the input, each also flipped).
ours = our counter (convolutions; BN, ReLU, pooling, the image-pooling broadcast and the final bilinear upsampling
  are not multiply-adds) at 512 x 512, the paper's stated input. Parameters agree to the paper's 0.01M, which
  fixes the design: heads on the 320-channel map for MNet V2* (the 1280-channel conv is not built), regular (not
  separable) 3x3 ASPP convs, BN with scale and offset.
@513 = the same counter at 513 x 513, the crop TF DeepLab evaluates (maps of 33 x 33 at OS 16, 65 x 65 at OS 8
  instead of 32 / 64; MF scales (513 - 1) * s + 1 = 257 ... 897). It closes the gap of the rows without ASPP.
513 TF atrous = @513 with each dilated conv counted on the grid TF 1.x computes it on: space_to_batch pads the map to
  a multiple of the rate, so a 3x3 conv at rate r on an n-wide map computes r * (ceil((n + 2r) / r) - 2) outputs
  per dimension (36 for n = 33 at every ASPP rate of OS 16, 72 for n = 65 at OS 8). A model of how the paper's
  numbers were counted, not a cost of this code: it reproduces five of the six rows within 0.4%; MNet V1 OS 8 MF
  stays 5% above the paper's 941.9B, and we found no convention that gives that value.
ResNet-101 rows: the paper's only (not built here)."""


def _table7(args) -> int:
    """Paper Table 7's MobileNet rows counted by our counter beside the paper's values (see TABLE7_FOOTNOTE)."""
    from ..paper.tables import table7
    classes = 21 if args.num_classes is None else args.num_classes
    width = 1.0 if args.width is None else args.width
    rows = table7(classes, width)
    if args.json:
        print(json.dumps({"num_classes": classes, "width": width, "rows": rows}, indent=2))
        return 0
    print(f"Mobile DeepLabv3, paper Table 7: width {width:g}, {classes} classes, MAdds at 512 x 512 (ours) beside the "
          "paper's.")
    print(f"{'network':<10} {'OS':>2} {'ASPP':>4} {'MF':>3} {'mIoU':>6} | {'params':>7} {'paper':>7} | {'MAdds':>8} "
          f"{'@513':>8} {'513 TF':>8} {'paper':>8} {'ours/paper':>10}")
    print(f"{'':<10} {'':>2} {'':>4} {'':>3} {'paper':>6} | {'':>7} {'':>7} | {'':>8} {'':>8} {'atrous':>8} "
          f"{'':>8} {'':>10}")
    for r in rows:
        left = (f"{r['network']:<10} {r['output_stride']:>2} {'yes' if r['aspp'] else '':>4} "
                f"{'yes' if r['mf'] else '':>3} {r['paper_miou']:>6.2f} | ")
        paper_p, paper_m = f"{r['paper_params_m']:.2f}M", f"{r['paper_madds_b']:g}B"
        if "params" not in r:
            print(left + f"{'-':>7} {paper_p:>7} | {'-':>8} {'-':>8} {'-':>8} {paper_m:>8} {'-':>10}")
            continue
        madds = [f"{r[k] / 1e9:.2f}B" for k in ("madds", "madds_513", "madds_513_tf_atrous")]
        ratio = r["madds"] / 1e9 / r["paper_madds_b"]
        print(left + f"{r['params'] / 1e6:>6.2f}M {paper_p:>7} | {madds[0]:>8} {madds[1]:>8} {madds[2]:>8} "
              f"{paper_m:>8} {ratio:>10.3f}")
    print(TABLE7_FOOTNOTE)
    return 0


def _memory(args) -> int:
    """Paper section 5.1: eq. (2) in both modes and Table 3 (largest tensor per resolution), ours beside the paper's."""
    from ..analysis.memory import memory_report, table3_rows
    model = _build(args)
    report = memory_report(model, args.resolution)
    config = reference.TABLE3_CONFIG.get(args.model)
    matches = config is not None and args.resolution == 224 and all(
        getattr(model, k, None) == v for k, v in config.items())
    paper = reference.TABLE3[args.model] if matches else None
    rows = table3_rows(report, paper)
    peaks = {"every_op_bytes": report.peak_materialised, "every_op_at": report.peak_op_materialised.name,
             "fused_bytes": report.peak_fused, "fused_at": report.peak_op_fused.name}
    if args.json:
        print(json.dumps({"model": args.model, "width": args.width, "resolution": args.resolution, "dtype_bytes": 2,
                          "eq2": peaks, "table3": rows,
                          "paper_max_kb": reference.TABLE3_MAX_KB[args.model] if paper else None,
                          "paper_note": reference.TABLE3_NOTES.get(args.model) if paper else None}, indent=2))
        return 0

    def cell(ch, kb):
        if ch is None:
            return "-"
        if kb is None or isinstance(kb, int):  # the paper's cells, as printed in the paper
            return f"{ch}/{'O(1)' if kb is None else kb}"
        return f"{ch}/{kb:.0f}" if kb >= 10 else f"{ch}/{kb:.1f}"

    print(f"{args.model} width {args.width:g} @ {args.resolution}: largest tensor materialised per resolution, "
          "channels/kB (16-bit, kB = 1000 bytes)")
    print(f"{'size':>9} {'fused blocks (b)':>17} {'every op (a)':>13} {'paper Table 3':>14}")
    for r in rows:
        print(f"{r['resolution']:>9} {cell(r['fused_channels'], r['fused_kb']):>17} "
              f"{cell(r['every_channels'], r['every_kb']):>13} {cell(r['paper_channels'], r['paper_kb']):>14}")
    top = {k: max((r[k] or 0) for r in rows) for k in ("fused_kb", "every_kb")}
    paper_max = f"{reference.TABLE3_MAX_KB[args.model]}" if paper else "-"
    print(f"{'max':>9} {top['fused_kb']:>17.0f} {top['every_kb']:>13.0f} {paper_max:>14}")
    if paper and args.model in reference.TABLE3_NOTES:
        print(f"note: {reference.TABLE3_NOTES[args.model]}")
    if config is not None and not matches:
        print(f"(the paper's column is {args.model} {config} at 224; run with those settings to see it)")
    print(f"eq. (2) peak, (a) every op materialised: {report.peak_materialised / 1000:.0f} kB at "
          f"{report.peak_op_materialised.name}; (b) blocks as one op, stem fused: {report.peak_fused / 1000:.0f} kB "
          f"at {report.peak_op_fused.name}")
    return 0
