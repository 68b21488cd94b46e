"""`mnv2 convert`: torchvision / timm / Keras MobileNetV2 weights -> a self-describing mnv2 `.safetensors` file."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError

SOURCES = ("torchvision", "timm", "keras")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")  # the resizes mnv2.deploy.preprocess offers


def register(sub) -> None:
    p = sub.add_parser("convert", help="import torchvision, timm or Keras MobileNetV2 weights",
                       description="Convert MobileNetV2 weights from torchvision or timm (a .pth/.pt state dict, "
                       "loaded without running pickled code, or a .safetensors state dict) or Keras (a model saved "
                       "with model.save as .keras or .h5, Keras 2 or 3, built on keras.applications.MobileNetV2 with "
                       "a head of global pooling, dropout and one Dense; or weights: the published .h5 files, a "
                       "Keras 3 .weights.h5) into an mnv2 .safetensors file holding the weights, the model config, "
                       "the preprocessing the weights expect and the output activation. Width multiplier and class "
                       "count are read from the weights (and a Keras model's config); the converted model gives the "
                       "same outputs as the original.")
    p.add_argument("src", metavar="SRC", help="the weights file to convert")
    p.add_argument("--from", dest="source", required=True, choices=SOURCES, help="the library SRC comes from")
    p.add_argument("--out", required=True, metavar="DST", help="output .safetensors file (a .json copy of the "
                   "config is written beside it)")
    p.add_argument("--resolution", type=int, help="override the evaluation resolution stored with the weights")
    p.add_argument("--crop-fraction", type=float, help="override the centre-crop fraction stored with the weights "
                   "(e.g. 0.9655 = 224/232 for torchvision's IMAGENET1K_V2 weights)")
    p.add_argument("--interpolation", choices=INTERPOLATIONS, help="override the resize interpolation stored with "
                   "the weights (a Keras model: the one its images were loaded with, keras.utils.load_img's "
                   "`interpolation`; default bilinear)")
    p.add_argument("--class-names", metavar="FILE", help="a text file naming the classes, one a line, in output "
                   "order; stored with the weights, `mnv2 predict` shows them")
    p.add_argument("--backbone-only", action="store_true", help="keras: import the MobileNetV2 base alone (no "
                   "classifier, pooled features out), e.g. to fine-tune a model whose head mnv2 cannot represent")
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
    if args.interpolation is not None:
        overrides["interpolation"] = args.interpolation
    if args.backbone_only and args.source != "keras":
        raise UserError("--backbone-only is for --from keras (torchvision and timm files are read whole)")
    names = _class_names(Path(args.class_names)) if args.class_names else None

    from .. import interop
    from ..analysis import count_params
    if args.source == "keras":
        imported = interop.from_keras(src, preprocess=overrides, backbone_only=args.backbone_only)
    else:
        state = interop.read_state_dict(src)
        importer = interop.from_torchvision if args.source == "torchvision" else interop.from_timm
        imported = importer(state, origin=str(src), preprocess=overrides)
    if names is not None:
        if len(names) != imported.model_kwargs["num_classes"]:
            raise UserError(f"--class-names {args.class_names}: {len(names)} names for a model with "
                            f"{imported.model_kwargs['num_classes']} classes")
        imported.class_names = names
    imported.save(dst)
    kwargs, pre = imported.model_kwargs, imported.preprocess
    resize = "whole image" if pre.get("resize") == "squash" else f"crop {pre['crop_fraction']:g}"
    output = f", {imported.output} output" if imported.output else ""
    print(f"wrote {dst}: mobilenet_v2 width {kwargs['width_mult']:g}, {kwargs['num_classes']} classes{output}, "
          f"{count_params(imported.model):,} parameters (from {args.source} {src}; preprocess {pre['resolution']} px, "
          f"{resize}, {pre['interpolation']}, mean {pre['mean']}, std {pre['std']})")
    return 0


def _class_names(path: Path) -> list[str]:
    """One class name a line; blank lines at the end are ignored, blank lines between names are an error."""
    try:
        names = [name.strip() for name in path.read_text(encoding="utf-8").rstrip().splitlines()]
    except OSError as e:
        raise UserError(f"--class-names {path}: cannot read it ({e.strerror})") from None
    except UnicodeDecodeError:
        raise UserError(f"--class-names {path}: not a UTF-8 text file") from None
    if not any(names) or not all(names):
        raise UserError(f"--class-names {path}: expected one non-empty class name a line")
    return names
