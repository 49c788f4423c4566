"""Tokenizer, chat template and streaming detokenization."""

from __future__ import annotations

import pytest

from cupaged.tokenizer import IncrementalDetokenizer, Tokenizer, TokenizerError

TEXTS = [
    "Hello, world! This is plain English.",
    "def f(x):\n    return x ** 2  # code\n",
    "naïve café — Zürich, Ελληνικά, 日本語のテキスト",
    "emoji: 👩‍👩‍👧‍👦 🚀🔥 and flags 🇫🇷",
    "   leading and trailing spaces   ",
]


@pytest.fixture(scope="module", params=["qwen3-tiny", "llama-tiny"])
def tokenizer(request, checkpoints) -> Tokenizer:
    return Tokenizer.from_dir(checkpoints(request.param))


@pytest.mark.parametrize("text", TEXTS)
def test_streaming_detokenization_is_exact(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, prompt_ids=tokenizer.encode("prefix", add_special_tokens=False))
    deltas = [detok.add(i) for i in ids]
    assert "".join(deltas) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas), "a multi-byte character was split"


def test_multibyte_characters_span_tokens(tokenizer: Tokenizer) -> None:
    """The byte-level tokenizer splits rare characters into byte tokens: the test above must cover that case."""
    ids = tokenizer.encode("👩‍👩‍👧‍👦", add_special_tokens=False)
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)


def test_eos_ids_come_from_the_checkpoint(tokenizer: Tokenizer) -> None:
    assert tokenizer.eos_token_ids
    assert all(tokenizer.decode([i], skip_special_tokens=False) for i in tokenizer.eos_token_ids)


def test_chat_template_matches_transformers(request, checkpoints) -> None:
    transformers = pytest.importorskip("transformers")
    for preset in ("qwen3-tiny", "llama-tiny"):
        path = checkpoints(preset)
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                    {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What is 2+2?"}]
        ours = Tokenizer.from_dir(path)
        theirs = transformers.AutoTokenizer.from_pretrained(str(path))
        assert ours.apply_chat_template(messages) == theirs.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True)
        assert ours.encode_chat(messages) == theirs.apply_chat_template(messages, add_generation_prompt=True,
                                                                        tokenize=True, return_dict=False)


def test_chat_template_renders_roles(checkpoints) -> None:
    tok = Tokenizer.from_dir(checkpoints("qwen3-tiny"))
    text = tok.apply_chat_template([{"role": "user", "content": "ping"}])
    assert "ping" in text and text.index("ping") < len(text)


def test_missing_tokenizer_is_clear(tmp_path) -> None:
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_no_chat_template_is_clear(checkpoints) -> None:
    tok = Tokenizer.from_dir(checkpoints("qwen3-tiny"))
    tok.chat_template = None
    with pytest.raises(TokenizerError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_tokens_decoded_together_give_the_text_of_one_by_one(tokenizer: Tokenizer) -> None:
    """add_many (a final_only request decodes its whole output at once) releases what add, token by token, does:
    on real text and on random ids (byte tokens that form no character, special tokens, anything a random model
    samples)."""
    import numpy as np

    rng = np.random.default_rng(0)
    vocab = tokenizer.tokenizer.get_vocab_size()
    sequences = [tokenizer.encode(t, add_special_tokens=False) for t in TEXTS]
    sequences += [rng.integers(0, vocab, int(rng.integers(1, 40))).tolist() for _ in range(200)]
    prompt = tokenizer.encode("prefix", add_special_tokens=False)
    for ids in sequences:
        for skip in (True, False):
            one_by_one = IncrementalDetokenizer(tokenizer, prompt, skip)
            together = IncrementalDetokenizer(tokenizer, prompt, skip)
            assert together.add_many(ids) == "".join(one_by_one.add(i) for i in ids), ids
