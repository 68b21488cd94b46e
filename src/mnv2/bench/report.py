"""BENCHMARKS.md upkeep: each benchmark script owns one `## ` section and replaces only that one."""

from __future__ import annotations

import platform
import re
from pathlib import Path

from ..atomic import atomic_write_text


def replace_section(path: str | Path, heading: str, text: str) -> None:
    """Put `text` (which starts with the line `heading`) in place of that section of the Markdown file `path` -- from
    the heading to the next `## ` heading -- or append it; other sections are kept byte for byte. Written atomically."""
    path = Path(path)
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    section = re.compile(rf"^{re.escape(heading)}[ \t]*\n.*?(?=^## |\Z)", re.DOTALL | re.MULTILINE)
    body = text.strip("\n") + "\n\n"
    new = section.sub(lambda _: body, old, count=1) if section.search(old) else old.rstrip("\n") + "\n\n" + body
    atomic_write_text(path, new.rstrip("\n") + "\n")


def cpu_name() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), for the machine line of a benchmark section."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"
