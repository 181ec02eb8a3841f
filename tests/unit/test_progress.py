"""`timing.progress`, the one progress bar of long work: quiet where stderr is no terminal (CI, DVC's queue),
drawn on a terminal or when forced."""

from __future__ import annotations

import io
import sys

from intentops.timing import latency_ms, progress


class Terminal(io.StringIO):
    """A stderr that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def test_quiet_when_stderr_is_not_a_terminal(capsys):
    assert list(progress(range(5), "calibrate: bootstrap")) == list(range(5))
    with progress(total=3, desc="embed: train") as bar:
        bar.update(3)
    assert capsys.readouterr().err == ""


def test_drawn_on_a_terminal(monkeypatch):
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    assert list(progress(range(5), "calibrate: bootstrap", unit="resample")) == list(range(5))
    assert "calibrate: bootstrap" in term.getvalue()
    assert "5/5" in term.getvalue()


def test_drawn_anywhere_when_forced(capsys):
    with progress(total=4, desc="label export", show=True) as bar:
        bar.update(4)
    err = capsys.readouterr().err
    assert "label export" in err
    assert "4/4" in err


def test_unlabelled_library_loops_draw_nothing_even_on_a_terminal(monkeypatch):
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    assert list(progress(range(5))) == list(range(5))
    assert latency_ms(lambda _: None, ["a"], calls=3, warmup=1)["calls"] == 3
    assert term.getvalue() == ""


def test_a_labelled_latency_run_counts_warm_up_and_timed_calls(monkeypatch):
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    out = latency_ms(lambda _: None, ["a", "b"], calls=3, warmup=2, desc="promote: latency")
    assert out["calls"] == 3
    assert "promote: latency" in term.getvalue()
    assert "5/5" in term.getvalue()
