"""Tokenizer: tokenizer.json through `tokenizers`, special tokens and the chat template from the checkpoint.

`IncrementalDetokenizer` turns a growing list of token ids into text deltas for streaming. A character can be
split across tokens (byte-level BPE splits multi-byte UTF-8 sequences), so text is only released once the
bytes decoded so far form whole characters.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterable

from tokenizers import Tokenizer as HFTokenizer

logger = logging.getLogger(__name__)


class TokenizerError(ValueError):
    """A tokenizer or chat template is missing or malformed."""


def _token_text(value: Any) -> str | None:
    """Special tokens in tokenizer_config.json are strings or {"content": ...} objects."""
    return value.get("content") if isinstance(value, dict) else value


class Tokenizer:
    def __init__(self, tokenizer: HFTokenizer, chat_template: str | None = None, bos_token: str | None = None,
                 eos_token_ids: Iterable[int] = (), eos_token: str | None = None):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.eos_token_ids = sorted(set(eos_token_ids))
        self._token_texts: dict[bool, dict[int, str]] = {True: {}, False: {}}  # decode_one's memo, per skip flag

    @classmethod
    def from_dir(cls, path: Path, config_eos_ids: Iterable[int] = ()) -> "Tokenizer":
        """Load tokenizer.json, tokenizer_config.json and generation_config.json from a checkpoint directory."""
        file = path / "tokenizer.json"
        if not file.is_file():
            raise TokenizerError(f"{path}: no tokenizer.json (cupaged reads fast-tokenizer files only)")
        try:
            tok = HFTokenizer.from_file(str(file))
        except Exception as exc:
            raise TokenizerError(f"{file}: cannot be loaded: {exc}") from None
        cfg = _read_json(path / "tokenizer_config.json")
        gen = _read_json(path / "generation_config.json")
        template = cfg.get("chat_template")
        if isinstance(template, list):  # a list of named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if template is None and (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text()
        eos_token = _token_text(cfg.get("eos_token"))
        eos_ids = set(config_eos_ids)
        gen_eos = gen.get("eos_token_id")
        eos_ids.update(gen_eos if isinstance(gen_eos, list) else [] if gen_eos is None else [gen_eos])
        if eos_token is not None and tok.token_to_id(eos_token) is not None:
            eos_ids.add(tok.token_to_id(eos_token))
        return cls(tok, template, _token_text(cfg.get("bos_token")), eos_ids, eos_token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def decode_one(self, token_id: int, skip_special_tokens: bool = True) -> str:
        """decode([token_id]), memoised: the streaming detokenizer asks for it for almost every token it sees."""
        texts = self._token_texts[bool(skip_special_tokens)]
        text = texts.get(token_id)
        if text is None:
            text = texts[token_id] = self.decode([token_id], skip_special_tokens)
        return text

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> str:
        """Render the checkpoint's chat template (jinja2, sandboxed, as transformers renders it). `tools` (OpenAI's
        function definitions) are passed to templates that take them; without them `tools` stays undefined."""
        if not self.chat_template:
            raise TokenizerError("this checkpoint has no chat template; pass plain prompts instead of --chat")
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise TokenizerError(f"chat template: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = raise_exception
        extra = {"tools": tools} if tools is not None else {}
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt, bos_token=self.bos_token or "",
                eos_token=self.eos_token or "", **extra)
        except TemplateError as exc:
            raise TokenizerError(f"chat template failed: {exc}") from None

    def bad_words_token_ids(self, words: list[str]) -> list[list[int]]:
        """The token sequences of `words` that generation must not produce: each word as written alone and after a
        space (the tokenizer may merge a leading space into the first token), as vLLM's bad_words are."""
        out: list[list[int]] = []
        for word in words:
            for variant in (word, " " + word.lstrip()):
                ids = self.encode(variant, add_special_tokens=False)
                if ids and ids not in out:
                    out.append(ids)
        return out

    def encode_chat(self, messages: list[dict[str, Any]], tools: list[dict] | None = None) -> list[int]:
        """Token ids of a conversation ready for the assistant's reply (the template adds BOS itself)."""
        return self.encode(self.apply_chat_template(messages, tools=tools), add_special_tokens=False)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise TokenizerError(f"{path}: not valid JSON: {exc}") from None


class IncrementalDetokenizer:
    """Text deltas for a growing token list, never splitting a multi-byte character.

    Decoding each token alone loses the spaces and merged bytes that depend on neighbours, and decoding the
    whole list every step is quadratic. As vLLM does, we decode a short window: `prefix_offset:read_offset`
    is text already released, `prefix_offset:` the same window plus the new tokens; the difference is the delta.
    A trailing U+FFFD means the last token ended inside a UTF-8 sequence: we wait for the next token.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int] | None = None, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = list(prompt_ids or [])
        # start the window a few tokens back into the prompt so the first output token decodes in context
        self.read_offset = len(self.ids)
        self.prefix_offset = max(0, self.read_offset - 5)
        self.text = ""

    def copy(self) -> "IncrementalDetokenizer":
        twin = IncrementalDetokenizer(self.tokenizer, skip_special_tokens=self.skip_special_tokens)
        twin.ids, twin.prefix_offset, twin.read_offset, twin.text = list(self.ids), self.prefix_offset, \
            self.read_offset, self.text
        return twin

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add_many(self, token_ids: list[int]) -> str:
        """Append tokens; return the newly complete text. Several tokens are decoded in one call (the text is the
        same as adding them one by one: byte-level and SentencePiece decoding concatenate), except when the last
        ones end inside a character, which `add` then holds back token by token."""
        if len(token_ids) == 1:
            return self.add(token_ids[0])
        if not token_ids:
            return ""
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:] + list(token_ids))
        if new_text.endswith("\ufffd"):
            return "".join(self.add(t) for t in token_ids)
        self.ids += token_ids
        if len(new_text) <= len(prefix_text):
            return ""
        delta = new_text[len(prefix_text):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.text += delta
        return delta

    def add(self, token_id: int) -> str:
        """Append one token; return the newly complete text (possibly empty)."""
        self.ids.append(token_id)
        if self.read_offset - self.prefix_offset == 1:
            # Once text streams, the released window is just the previous token: its text is memoised, so a
            # token costs one decode call instead of two.
            prefix_text = self.tokenizer.decode_one(self.ids[self.prefix_offset], self.skip_special_tokens)
        else:
            prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        delta = new_text[len(prefix_text):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.text += delta
        return delta
