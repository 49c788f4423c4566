"""Reference logits from Hugging Face transformers, the oracle of tests/test_model.py.

    python -m tools.make_reference_logits      # needs torch and transformers

For each tiny preset of tools/make_checkpoint.py (float32, seed 0) it draws 4 token sequences (lengths 3, 17,
33, 40; numpy seed 1234) and writes tests/fixtures/reference_logits/<preset>.npz with the weights digest, the
sequences (seq_i) and transformers' float32 logits at every position (logits_i). The GPU tests call
`reference_logits` and `reference_greedy` live instead.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np

from tools.make_checkpoint import make_checkpoint, weights_digest

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "reference_logits"
TINY = ["llama-tiny", "llama3-tiny", "mistral-tiny", "qwen2-tiny", "qwen3-tiny"]
LENGTHS = [3, 17, 33, 40]


def _load(checkpoint_dir: str | Path, dtype: str, device: str):
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint_dir), dtype=torch_dtype,
                                                 attn_implementation="eager")
    return model.to(device).eval()


def reference_logits(checkpoint_dir: str | Path, sequences: list[list[int]], dtype: str = "float32",
                     device: str = "cpu") -> list[np.ndarray]:
    """transformers' float32 logits [len, vocab] at every position of each sequence (run one at a time)."""
    import torch

    model = _load(checkpoint_dir, dtype, device)
    out = []
    with torch.no_grad():
        for seq in sequences:
            logits = model(torch.tensor([list(seq)], device=device)).logits[0]
            out.append(logits.float().cpu().numpy())
    return out


def reference_greedy(checkpoint_dir: str | Path, prompts: list[list[int]], max_new_tokens: int,
                     dtype: str = "float32", device: str = "cpu") -> list[list[int]]:
    """transformers' greedy continuation of each prompt, EOS ignored (exactly max_new_tokens tokens)."""
    import torch

    model = _load(checkpoint_dir, dtype, device)
    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids = model.generate(torch.tensor([list(prompt)], device=device), do_sample=False,
                                 max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, pad_token_id=0)
            out.append(ids[0, len(prompt):].tolist())
    return out


def main() -> None:
    import torch
    import transformers

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    OUT.mkdir(parents=True, exist_ok=True)
    for preset in TINY:
        path = make_checkpoint(Path(tempfile.mkdtemp()) / preset, preset)
        rng = np.random.default_rng(1234)
        vocab = 1000  # token ids below every tiny vocabulary
        sequences = [rng.integers(0, vocab, n) for n in LENGTHS]
        logits = reference_logits(path, [s.tolist() for s in sequences])
        record = {"weights_digest": weights_digest(path), "transformers": transformers.__version__,
                  "torch": torch.__version__}
        for i, (seq, lg) in enumerate(zip(sequences, logits)):
            record[f"seq_{i}"] = seq.astype(np.int64)
            record[f"logits_{i}"] = lg.astype(np.float32)
        np.savez_compressed(OUT / f"{preset}.npz", **record)
        logging.info("wrote %s", OUT / f"{preset}.npz")


if __name__ == "__main__":
    main()
