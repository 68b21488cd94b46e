"""`mnv2` command line: one small module per subcommand in this package, each exposing `register(subparsers)`.

Errors the user can fix (`UserError`, missing files) are printed as one line on stderr with exit status 2; no
traceback reaches the user.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

from ..errors import PeerError, UserError


class ArgumentParser(argparse.ArgumentParser):
    """argparse with errors on one line: `mnv2 profile: error: ...`."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="mnv2", description="MobileNetV2 (Sandler et al., CVPR 2018): models, training, "
                            "evaluation, memory-efficient and fast inference.")
    from .. import __version__
    parser.add_argument("--version", action="version", version=f"mnv2 {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    package = importlib.import_module(__package__)
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        if info.name in ("main", "common"):
            continue
        module = importlib.import_module(f"{__package__}.{info.name}")
        if hasattr(module, "register"):
            module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except PeerError:  # another process of the torchrun job failed; rank 0 reports its error
        pass
    except UserError as e:
        print(f"mnv2 {args.command}: error: {e}", file=sys.stderr)
    except FileNotFoundError as e:
        print(f"mnv2 {args.command}: error: no such file or directory: {e.filename}", file=sys.stderr)
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0
    except OSError as e:  # permission denied, a full disk, ...: the path and the reason, no traceback
        where = f"{e.filename}: " if e.filename else ""
        print(f"mnv2 {args.command}: error: {where}{e.strerror or e}", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"mnv2 {args.command}: interrupted", file=sys.stderr)
        return 130
    return 2


def entry() -> None:
    """The `mnv2` command, and `python -m mnv2.cli.main` (what torchrun starts): `main`'s status as the exit code.

    A process of a torchrun job leaves with os._exit once its work is written, flushed and closed (Trainer.close):
    the interpreter's own teardown, with a gloo process group's threads in the C++ runtime, aborted finished ranks
    now and then (SIGABRT, 'terminate called without an active exception': twice in four full runs of the test
    suite on 2026-12-03, never in 16 runs of the two-process job alone), and torchrun then killed the others and
    failed the job."""
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
