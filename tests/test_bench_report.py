"""Benchmark scripts replace only their own section of BENCHMARKS.md."""

from mnv2.bench.report import replace_section


def test_replaces_its_section_and_keeps_the_others(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\n## A\n\nold a\n\n## B\nold b\nmore b\n## C\n\nold c\n")
    replace_section(path, "## B", "## B\n\nnew b")
    assert path.read_text() == "# Benchmarks\n\n## A\n\nold a\n\n## B\n\nnew b\n\n## C\n\nold c\n"
    replace_section(path, "## C", "## C\n\nnew c\n\n\n")  # the last section: trailing blank lines trimmed
    assert path.read_text().endswith("## B\n\nnew b\n\n## C\n\nnew c\n")


def test_appends_a_new_section_or_creates_the_file(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    replace_section(path, "## A", "## A\n\na")
    assert path.read_text() == "# Benchmarks\n\n## A\n\na\n"
    replace_section(path, "## AB", "## AB\n\nb")
    assert path.read_text() == "# Benchmarks\n\n## A\n\na\n\n## AB\n\nb\n"
    replace_section(path, "## A", "## A\n\na2")  # a heading that is a prefix of another is not confused with it
    assert path.read_text() == "# Benchmarks\n\n## A\n\na2\n\n## AB\n\nb\n"
    assert [p.name for p in tmp_path.iterdir()] == ["BENCHMARKS.md"]  # no temporary file left behind
