"""The benchmark workload of nano-vllm's bench.py (../shared/DEVICE_NOTES.md), optionally scaled down.

256 requests, prompt and output lengths uniform in [100, 1024], random.seed(0), token ids randint(0, 10000),
EOS ignored. `scale` divides the lengths (for the CPU), `num_requests` trims the list.
"""

from __future__ import annotations

import random


def nano_vllm_workload(num_requests: int = 256, scale: int = 1, vocab: int = 10000,
                       seed: int = 0) -> list[tuple[list[int], int]]:
    """(prompt token ids, output length) per request."""
    random.seed(seed)
    lo, hi = 100 // scale, 1024 // scale
    top = 10000 if vocab > 10000 else vocab - 1  # nano-vllm draws randint(0, 10000), both ends included
    prompts = [[random.randint(0, top) for _ in range(random.randint(lo, hi))]
               for _ in range(num_requests)]
    outputs = [random.randint(lo, hi) for _ in range(num_requests)]
    return list(zip(prompts, outputs))
