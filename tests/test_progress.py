"""Progress output: a tqdm bar on a terminal; in a file or a pipe, plain lines without carriage returns, a bounded
number of them."""

import io
import types

from test_engine_trainer import colour_folder, small_config

from mnv2 import progress
from mnv2.engine.trainer import Trainer
from mnv2.progress import progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_when_not_a_terminal():
    out = io.StringIO()
    assert list(progress_bar(range(500), desc="eval", file=out)) == list(range(500))
    assert out.getvalue() == "eval: 500/500 in 0 s\n"  # one line, when the loop ends


def test_plain_lines_of_a_long_loop(monkeypatch):
    """Counted with `update`, as the training loop counts: a line every `every` seconds and one at the end."""
    clock = iter(range(0, 1000, 10))  # each reading of the clock is 10 s after the last
    monkeypatch.setattr(progress, "time", types.SimpleNamespace(monotonic=lambda: next(clock)))
    out = io.StringIO()
    bar = progress_bar(total=6, initial=1, desc="epoch 1/3", file=out, every=25)
    for _ in range(5):
        bar.update()
        bar.set_postfix(loss="0.5", refresh=False)
    bar.close()
    bar.close()  # closing twice prints once
    assert out.getvalue().splitlines() == ["epoch 1/3: 4/6 in 30 s, loss 0.5", "epoch 1/3: 6/6 in 60 s, loss 0.5"]


def test_disabled_prints_nothing_and_a_terminal_gets_tqdm():
    out = io.StringIO()
    assert sum(progress_bar(range(3), desc="eval", enabled=False, file=out)) == 3
    assert out.getvalue() == ""
    terminal = Terminal()
    bar = progress_bar(range(3), desc="eval", file=terminal)
    assert type(bar).__name__ == "tqdm"
    list(bar)
    assert "\r" in terminal.getvalue()


def test_training_log_in_a_file_has_no_carriage_returns(tmp_path, capfd):
    """What `mnv2 train > train.log 2>&1` writes: stderr is a file, so one line per epoch."""
    data = colour_folder(tmp_path / "data")
    epochs = 3
    Trainer(small_config(f"train.epochs={epochs}", f"data.root={data}"), tmp_path / "run", data, progress=True,
            log=lambda *a: None).fit()
    err = capfd.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert [line.split(":")[0] for line in lines if line.startswith("epoch")] == [f"epoch {e}/{epochs}"
                                                                                 for e in range(1, epochs + 1)]
    assert len(lines) <= epochs + 5, err  # + a few warnings at most
