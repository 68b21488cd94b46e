"""`mnv2 convert`: torchvision / timm / Keras MobileNetV2 weights -> a self-describing mnv2 `.safetensors` file."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError

SOURCES = ("torchvision", "timm", "keras")


def register(sub) -> None:
    p = sub.add_parser("convert", help="import torchvision, timm or Keras MobileNetV2 weights",
                       description="Convert MobileNetV2 weights from torchvision or timm (a .pth/.pt state dict, "
                       "loaded without running pickled code, or a .safetensors state dict) or Keras (a .h5 file in "
                       "the layout of the published ImageNet weights, a Keras 3 .weights.h5, or a .keras archive) "
                       "into an mnv2 .safetensors file holding the weights, the model config and the preprocessing "
                       "the weights expect. Width multiplier and class count are read from the weight shapes; the "
                       "converted model gives the same outputs as the original.")
    p.add_argument("src", metavar="SRC", help="the weights file to convert")
    p.add_argument("--from", dest="source", required=True, choices=SOURCES, help="the library SRC comes from")
    p.add_argument("--out", required=True, metavar="DST", help="output .safetensors file (a .json copy of the "
                   "config is written beside it)")
    p.add_argument("--resolution", type=int, help="override the evaluation resolution stored with the weights")
    p.add_argument("--crop-fraction", type=float, help="override the centre-crop fraction stored with the weights "
                   "(e.g. 0.9655 = 224/232 for torchvision's IMAGENET1K_V2 weights)")
    p.set_defaults(func=run)


def run(args) -> int:
    src, dst = Path(args.src), Path(args.out)
    if dst.suffix != ".safetensors":
        raise UserError(f"--out {dst}: the output must be a .safetensors file")
    if dst.exists() and src.exists() and dst.resolve() == src.resolve():
        raise UserError(f"--out {dst}: would overwrite SRC")
    overrides = {}
    if args.resolution is not None:
        if args.resolution < 32:
            raise UserError(f"--resolution must be at least 32, got {args.resolution}")
        overrides["resolution"] = args.resolution
    if args.crop_fraction is not None:
        if not 0 < args.crop_fraction <= 1:
            raise UserError(f"--crop-fraction must be in (0, 1], got {args.crop_fraction}")
        overrides["crop_fraction"] = args.crop_fraction

    from .. import interop
    from ..analysis import count_params
    if args.source == "keras":
        imported = interop.from_keras(src, preprocess=overrides)
    else:
        state = interop.read_state_dict(src)
        importer = interop.from_torchvision if args.source == "torchvision" else interop.from_timm
        imported = importer(state, origin=str(src), preprocess=overrides)
    imported.save(dst)
    kwargs, pre = imported.model_kwargs, imported.preprocess
    print(f"wrote {dst}: mobilenet_v2 width {kwargs['width_mult']:g}, {kwargs['num_classes']} classes, "
          f"{count_params(imported.model):,} parameters (from {args.source} {src}; preprocess {pre['resolution']} px, "
          f"crop {pre['crop_fraction']:g}, {pre['interpolation']}, mean {pre['mean']}, std {pre['std']})")
    return 0
