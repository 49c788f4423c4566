"""Reference beam-search outputs from transformers, for tests/test_sharing.py.

    python -m tools.make_beam_fixtures      # needs torch and transformers

Writes tests/fixtures/beam_search/qwen3-tiny-w{2,3,4}.npz: 10 prompts, transformers' best beam for each
(`generate(num_beams=w, do_sample=False)`, one prompt at a time), and the settings used. The width-3 case also
stops on a token the model often produces (`stop_token_ids`), so finished hypotheses compete with open beams.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np

from tools.make_checkpoint import make_checkpoint, weights_digest

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "beam_search"
SETTINGS = {2: dict(length_penalty=1.0, early_stopping=False), 3: dict(length_penalty=0.0, early_stopping=False),
            4: dict(length_penalty=0.7, early_stopping=True)}
MAX_NEW_TOKENS = 12


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    logging.basicConfig(level=logging.INFO)
    OUT.mkdir(parents=True, exist_ok=True)
    path = make_checkpoint(Path(tempfile.mkdtemp()) / "qwen3-tiny", "qwen3-tiny")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    eos = GenerationConfig.from_pretrained(path).eos_token_id
    rng = np.random.default_rng(99)
    prompts = [rng.integers(0, 1000, int(rng.integers(3, 40))) for _ in range(10)]
    with torch.no_grad():  # the token greedy decoding produces most often, to act as an extra stop token
        greedy = [model.generate(torch.tensor(p)[None], do_sample=False, max_new_tokens=MAX_NEW_TOKENS,
                                 pad_token_id=0)[0, len(p):] for p in prompts]
    common = int(np.bincount(torch.cat(greedy).numpy()).argmax())
    eos = eos if isinstance(eos, list) else [eos]
    for width, settings in SETTINGS.items():
        stop = [common] if width == 3 else []
        record = {"weights_digest": weights_digest(path), "max_new_tokens": MAX_NEW_TOKENS,
                  "stop_token_ids": np.array(stop, np.int64), **settings}
        for i, prompt in enumerate(prompts):
            with torch.no_grad():
                out = model.generate(torch.tensor(prompt)[None], num_beams=width, do_sample=False,
                                     max_new_tokens=MAX_NEW_TOKENS, eos_token_id=eos + stop, pad_token_id=0,
                                     **settings)
            record[f"prompt_{i}"] = prompt.astype(np.int64)
            record[f"output_{i}"] = out[0, len(prompt):].numpy().astype(np.int64)
        np.savez(OUT / f"qwen3-tiny-w{width}.npz", **record)
        logging.info("wrote %s", OUT / f"qwen3-tiny-w{width}.npz")


if __name__ == "__main__":
    main()
