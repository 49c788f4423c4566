"""cupaged.progress: a bar on a terminal once a phase has taken more than a second, nothing otherwise; and the
load phases that report through it."""

from __future__ import annotations

import io
import logging
import sys

import numpy as np
import pytest
from helpers import load_model

from cupaged import progress as progress_module
from cupaged.layers import reference
from cupaged.progress import progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock(monkeypatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(progress_module, "_now", c)
    return c


def use_terminal(monkeypatch) -> Terminal:
    """stderr as a terminal. Called in the test itself: pytest re-installs its own capture of sys.stderr between
    a fixture's setup and the test."""
    t = Terminal()
    monkeypatch.setattr(sys, "stderr", t)
    return t


def test_short_phase_draws_nothing(clock, monkeypatch) -> None:
    terminal = use_terminal(monkeypatch)
    with progress("reading", 10) as bar:
        for _ in range(10):
            clock.t += 0.05
            bar.update()
    assert terminal.getvalue() == "" and not bar.shown


def test_long_phase_on_a_terminal_draws_a_bar_from_where_it_is(clock, monkeypatch) -> None:
    terminal = use_terminal(monkeypatch)
    with progress("dequantizing model.gguf", 10) as bar:
        clock.t += 0.5
        bar.update(2)
        assert terminal.getvalue() == ""
        clock.t += 0.6  # past DELAY_S
        bar.update()
        assert bar.shown
        assert "dequantizing model.gguf" in terminal.getvalue() and "3/10" in terminal.getvalue()
        bar.update(7)
    assert "10/10" in terminal.getvalue() and terminal.getvalue().endswith("\n")


def test_no_bar_without_a_terminal(clock, monkeypatch) -> None:
    pipe = io.StringIO()
    monkeypatch.setattr(sys, "stderr", pipe)
    with progress("uploading", 4) as bar:
        clock.t += 5
        bar.update()
    assert pipe.getvalue() == "" and not bar.shown


def test_bar_line_is_ended_when_the_phase_fails(clock, monkeypatch) -> None:
    terminal = use_terminal(monkeypatch)
    with pytest.raises(KeyError):
        with progress("reading", 5) as bar:
            clock.t += 2
            bar.update()
            raise KeyError("x")
    assert terminal.getvalue().endswith("\n")


def test_no_bar_when_the_work_is_done(clock, monkeypatch) -> None:
    terminal = use_terminal(monkeypatch)
    """A bar that would appear at 100% tells nothing."""
    with progress("reading", 1) as bar:
        clock.t += 3
        bar.update()
    assert terminal.getvalue() == ""


def test_a_long_first_step_is_drawn_by_the_timer(monkeypatch) -> None:
    """Reading a GGUF file's metadata is one call of seconds: the bar shows while it runs."""
    import time

    terminal = use_terminal(monkeypatch)
    monkeypatch.setattr(progress_module, "DELAY_S", 0.05)
    with progress("reading model.gguf (metadata, tokenizer)", 2) as bar:
        deadline = time.monotonic() + 5
        while not bar.shown and time.monotonic() < deadline:
            time.sleep(0.01)
        assert bar.shown and "reading model.gguf (metadata, tokenizer)" in terminal.getvalue()
        assert "0/2" in terminal.getvalue()
        bar.update(2)
    assert "2/2" in terminal.getvalue()


def test_loading_a_checkpoint_reports_its_phases(checkpoints, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="cupaged.progress"):
        load_model(checkpoints("llama-tiny"), "float32", reference, np)
    assert "reading model.safetensors" in caplog.text
    assert "preparing layers (2 steps)" in caplog.text
