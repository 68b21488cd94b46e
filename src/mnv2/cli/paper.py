"""`mnv2 paper`: regenerate the paper's tables and figures beside what this code measures (mnv2.paper.report)."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from ..paper.report import BUDGETS, PARTS  # torch-free: the report imports torch inside its parts


def register(sub) -> None:
    p = sub.add_parser("paper", help="the paper's tables and figures beside ours, as a report",
                       description="Regenerate every table (1-7) and figure (1, 5, 6) of the paper beside what this "
                       "code computes and measures here: OUT/README.md (Markdown tables), OUT/*.png, "
                       "OUT/report.json. Paper values are always labelled as the paper's; each difference over 2%% "
                       "is explained in one line. --budget quick takes under 10 minutes on 2 cores (Figure 6 "
                       "trains 8 small proxy runs on the embedded shapes); full about 70 minutes (12 runs on a "
                       "larger synthetic set, every Figure 5 cell timed).")
    p.add_argument("--out", type=Path, default=Path("paper-report"), help="report folder (default: paper-report; "
                   "files of an earlier report there are replaced)")
    p.add_argument("--budget", choices=tuple(BUDGETS), default="quick", help="how much to measure (default quick)")
    p.add_argument("--runs", nargs="+", type=Path, default=[], metavar="RUN_DIR",
                   help="finished mnv2 runs whose recorded results fill the 'ours' accuracy columns (classification "
                   "top-1 in Table 4 / Figure 5, detection AP in Table 6, segmentation mIoU in Table 7)")
    p.add_argument("--data", type=Path, default=None, help="an ImageFolder (train/, val/) for the Figure 6 "
                   "ablations instead of the budget's synthetic shapes")
    p.add_argument("--threads", type=int, default=2, help="threads for the latency and training parts (default 2)")
    p.add_argument("--parts", default=None, help=f"comma-separated subset of the report ({', '.join(PARTS)}; "
                   "default: all)")
    p.add_argument("--json", action="store_true", help="also print the report's JSON on stdout")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..paper.report import build
    parts = [x.strip() for x in args.parts.split(",") if x.strip()] if args.parts else None
    command = " ".join(["mnv2 paper", "--budget", args.budget, "--out", shlex.quote(str(args.out))]
                       + (["--runs", *(shlex.quote(str(r)) for r in args.runs)] if args.runs else [])
                       + (["--data", shlex.quote(str(args.data))] if args.data else [])
                       + ([f"--threads {args.threads}"] if args.threads != 2 else [])
                       + ([f"--parts {args.parts}"] if args.parts else []))
    report = build(args.out, args.budget, runs=args.runs, data=args.data, threads=args.threads, parts=parts,
                   say=lambda line: print(line, file=sys.stderr), command=command)
    if args.json:
        print(json.dumps(report, indent=1, default=str))
    else:
        print(f"wrote {args.out / 'README.md'} ({len(report['sections'])} parts, "
              f"{report['meta']['seconds'] / 60:.1f} minutes)")
    return 0
