"""Reference logits from Hugging Face transformers, the oracle of tests/test_model.py.

Regenerate the fixtures (needs torch and transformers; a CPU is enough, about a minute):

    python -m tools.make_reference_logits                 # every tiny preset
    python -m tools.make_reference_logits qwen3-tiny      # some of them

For each tiny preset of tools/make_checkpoint.py it builds the checkpoint in a temporary directory (float32,
seed 0), draws 4 token sequences with `np.random.default_rng(1234)` (lengths 3, 17, 33, 40, ids uniform over the
tokenizer's id range, which for the tiny presets is the whole model vocabulary) and writes
tests/fixtures/reference_logits/<preset>.npz holding `weights_digest` (str), `seq_i` (int64 [len]) and
`logits_i` (float32 [len, vocab]: transformers' logits at every position, eager attention, float32) for
i in 0..3, and the `transformers` and `torch` versions used. Run it again whenever tools/make_checkpoint.py
changes the weights (tests/test_model.py checks the digest and says so).

The GPU tests import `reference_logits` and `reference_greedy` and run them live, on CUDA, in float32 or bfloat16.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import tempfile
from pathlib import Path

import numpy as np

from tools.make_checkpoint import make_checkpoint, weights_digest

logger = logging.getLogger(__name__)

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "reference_logits"
TINY = ["llama-tiny", "llama3-tiny", "mistral-tiny", "qwen2-tiny", "qwen3-tiny"]
LENGTHS = [3, 17, 33, 40]
SEED = 1234


def _load(checkpoint_dir: str | Path, dtype: str, device: str):
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint_dir), dtype=torch_dtype,
                                                 attn_implementation="eager")
    return model.to(device).eval()


@contextlib.contextmanager
def _exact_float32():
    """float32 matmuls in full precision (no TF32 on the GPU) while the reference runs; restored afterwards."""
    import torch

    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with torch.inference_mode():
            yield
    finally:
        torch.set_float32_matmul_precision(old)


def reference_logits(checkpoint_dir: str | Path, sequences: list[list[int]], dtype: str = "float32",
                     device: str = "cpu") -> list[np.ndarray]:
    """transformers' logits at every position of each sequence, as float32 numpy arrays [len, vocab].

    Each sequence runs alone (one forward pass over the whole sequence, no padding, no cache), with eager
    attention; `dtype` is the dtype the model runs in (float32, float16 or bfloat16), `device` a torch device.
    """
    import torch

    model = _load(checkpoint_dir, dtype, device)
    out = []
    with _exact_float32():
        for seq in sequences:
            ids = torch.tensor([[int(t) for t in seq]], dtype=torch.long, device=device)
            out.append(model(input_ids=ids).logits[0].float().cpu().numpy())
    del model
    return out


def reference_greedy(checkpoint_dir: str | Path, prompts: list[list[int]], max_new_tokens: int,
                     dtype: str = "float32", device: str = "cpu") -> list[list[int]]:
    """transformers' greedy continuation (`generate(do_sample=False)`) of each prompt, run one at a time.

    EOS does not stop generation and is not banned either (as `ignore_eos=True`): each result has exactly
    `max_new_tokens` tokens. (`min_new_tokens` would instead mask the EOS logits and change the tokens.)
    """
    import torch

    model = _load(checkpoint_dir, dtype, device)
    model.generation_config.eos_token_id = None  # so that no default brings EOS stopping back
    out = []
    with _exact_float32():
        for prompt in prompts:
            ids = torch.tensor([[int(t) for t in prompt]], dtype=torch.long, device=device)
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_new_tokens, eos_token_id=None, pad_token_id=0)
            tokens = gen[0, ids.shape[1]:].tolist()
            if len(tokens) != max_new_tokens:
                raise AssertionError(f"generate stopped after {len(tokens)} of {max_new_tokens} tokens")
            out.append(tokens)
    del model
    return out


def tokenizer_vocab_size(checkpoint_dir: str | Path) -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(checkpoint_dir) / "tokenizer.json")).get_vocab_size(with_added_tokens=True)


def make_fixture(preset: str, out_dir: Path = OUT) -> Path:
    """Write out_dir/<preset>.npz (see the module docstring) and return its path."""
    import torch
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        path = make_checkpoint(Path(tmp) / preset, preset, dtype="float32", seed=0)
        rng = np.random.default_rng(SEED)
        vocab = tokenizer_vocab_size(path)
        sequences = [rng.integers(0, vocab, n).astype(np.int64) for n in LENGTHS]
        logits = reference_logits(path, [s.tolist() for s in sequences], dtype="float32", device="cpu")
        record: dict[str, np.ndarray] = {"weights_digest": np.array(weights_digest(path)),
                                         "transformers": np.array(transformers.__version__),
                                         "torch": np.array(torch.__version__)}
    for i, (seq, lg) in enumerate(zip(sequences, logits)):
        record[f"seq_{i}"] = seq
        record[f"logits_{i}"] = lg.astype(np.float32)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{preset}.npz"
    np.savez_compressed(target, **record)
    logger.info("wrote %s (%.0f KB; logits %s)", target, target.stat().st_size / 1024,
                ", ".join(str(lg.shape) for lg in logits))
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.make_reference_logits",
                                     description="Write transformers' reference logits for the tiny presets.")
    parser.add_argument("presets", nargs="*", metavar="PRESET",
                        help=f"presets to regenerate (default: all of {', '.join(TINY)})")
    parser.add_argument("--out", type=Path, default=OUT, help="default: tests/fixtures/reference_logits")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.presets) - set(TINY))
    if unknown:
        parser.error(f"unknown preset(s) {', '.join(unknown)}: choose from {', '.join(TINY)}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for preset in args.presets or TINY:
        make_fixture(preset, args.out)


if __name__ == "__main__":
    main()
