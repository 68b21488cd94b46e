"""`mnv2 data`: write the embedded shapes dataset (`synth`) and check an ImageFolder dataset (`check`)."""

from __future__ import annotations

from pathlib import Path

from ..data import synthetic  # numpy + PIL only; the torch-side readers are imported when `check` runs


def register(sub) -> None:
    p = sub.add_parser("data", help="write the embedded shapes dataset, check a dataset folder",
                       description="Datasets: `synth` writes the deterministic shapes dataset in the real layouts "
                       "(ImageFolder, COCO, VOC); `check` reports the classes and images of an ImageFolder dataset "
                       "and lists files that do not decode.")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True, parser_class=type(p))

    s = actions.add_parser("synth", help="write the synthetic shapes dataset",
                           description="Write the shapes dataset: classify/ (ImageFolder train/val), detect/ (COCO "
                           "images + annotations/instances_{train,val}.json), segment/ (VOC JPEGImages, "
                           "SegmentationClass palette PNGs, ImageSets/Segmentation). The same arguments give "
                           "byte-identical files.")
    s.add_argument("--out", required=True, type=Path, help="output folder (a task's sub-folder is replaced)")
    s.add_argument("--task", choices=(*synthetic.TASKS, "all"), default="all", help="which layout (default: all)")
    s.add_argument("--images", type=int, default=None,
                   help="images per task, train + val (default: the demo's, "
                   + ", ".join(f"{t} {d['images']}" for t, d in synthetic.DEMO.items()) + ")")
    s.add_argument("--size", type=int, default=None, help="image side in pixels (default: the demo's, "
                   + ", ".join(f"{t} {d['size']}" for t, d in synthetic.DEMO.items()) + ")")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.set_defaults(func=run_synth)

    c = actions.add_parser("check", help="check an ImageFolder dataset folder",
                           description="Report the classes and images per split of an ImageFolder dataset "
                           "(DIR/train/<class>/..., DIR/val/<class>/..., or DIR/<class>/...), decode every image and "
                           "list the ones that fail. Exit status 1 if any image is unreadable or the splits' classes "
                           "differ, 2 for a missing or malformed folder.")
    c.add_argument("dir", type=Path, help="dataset folder")
    c.add_argument("--no-decode", action="store_true", help="only list files, do not decode them")
    c.add_argument("--max-list", type=int, default=20, help="list at most this many unreadable files (default 20)")
    c.set_defaults(func=run_check)


def run_synth(args) -> int:
    synthetic.write_dataset(args.out, args.task, images=args.images, size=args.size, seed=args.seed)
    tasks = synthetic.TASKS if args.task == "all" else (args.task,)
    for t in tasks:
        m = synthetic.read_marker(args.out / t)
        print(f"{args.out / t}: {t}, {m['images']} images of {m['size']}x{m['size']} px, seed {m['seed']}")
    return 0


def run_check(args) -> int:
    from ..data.imagefolder import make_samples, scan_images, split_dir

    root = split_dir(args.dir, None)
    splits = [s for s in ("train", "val") if (root / s).is_dir()]
    problems = 0
    class_sets = {}
    for split in splits or [None]:
        directory = root / split if split else root
        classes, samples = make_samples(directory)
        class_sets[split] = classes
        counts = [0] * len(classes)
        for _, idx in samples:
            counts[idx] += 1
        name = split or "(no split)"
        print(f"{name}: {len(samples)} images in {len(classes)} classes ({directory})")
        for c, n in zip(classes, counts):
            print(f"  {c}: {n}")
        if not args.no_decode:
            report = scan_images([p for p, _ in samples])
            if report.count:
                problems += 1
                print(f"  {report.count} unreadable image{'s' if report.count != 1 else ''}:")
                for p, reason in report.examples[:args.max_list]:
                    print(f"    {p}: {reason}")
                if report.count > args.max_list:
                    print(f"    ... and {report.count - args.max_list} more")
    if len(class_sets) == 2 and class_sets["train"] != class_sets["val"]:
        problems += 1
        only_train = sorted(set(class_sets["train"]) - set(class_sets["val"]))
        only_val = sorted(set(class_sets["val"]) - set(class_sets["train"]))
        print(f"train and val classes differ: only in train {only_train}, only in val {only_val}")
    if splits == ["val"] or splits == ["train"]:
        print(f"note: only a {splits[0]} split was found")
    return 1 if problems else 0
