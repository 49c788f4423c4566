"""The core's side of sampling: a step's sequences described to the sampler as a SamplingMetadata of arrays (their
grammars' masks packed by `grammar_masks`), and the log-probabilities of the tokens drawn recorded back into the
sequences."""

from __future__ import annotations

from typing import Any

import numpy as np

from cupaged.device import array_module, to_numpy
from cupaged.engine.sequence import Sequence
from cupaged.sampler import RowPenalties, SamplingMetadata, log_softmax, sample_on_device
from cupaged.structured import allowed_ids, fill_bitmasks

Array = Any


GrammarMasks = tuple[np.ndarray, np.ndarray]  # (bitmask int32 [M, ceil(V / 32)], mask_rows int32 [B]): sampler.py


def grammar_masks(seqs: list[Sequence]) -> GrammarMasks | None:
    """The packed masks of the tokens each sequence's grammar allows next, and each row's mask (-1: none); None
    when no sequence is constrained. A finished sequence gets none (its token is dropped), nor does one whose
    matcher failed and allows nothing (logged by the matcher; the row keeps a token to sample)."""
    constrained = [i for i, s in enumerate(seqs) if s.matcher is not None and not s.is_finished]
    if not constrained:
        return None
    bitmask = fill_bitmasks([seqs[i].matcher for i in constrained])
    mask_rows = np.full(len(seqs), -1, np.int32)
    mask_rows[constrained] = np.arange(len(constrained), dtype=np.int32)
    mask_rows[np.array(constrained)[~bitmask.any(axis=1)]] = -1
    return bitmask, mask_rows


def sampling_metadata(seqs: list[Sequence], eos_ids: list[int], rng: np.random.Generator,
                      masks: GrammarMasks | None = None) -> SamplingMetadata:
    """The metadata of `seqs` (one row each), with their grammars' masks (from grammar_masks, computed once the
    sequences' tokens so far are all known); draws each row's uniform number now."""
    params = [s.params for s in seqs]
    f32 = np.float32
    bitmask, mask_rows = masks if masks is not None else (None, None)
    return SamplingMetadata(temperature=np.array([0.0 if p.greedy else p.temperature for p in params], f32),
                            top_k=np.array([p.top_k for p in params], np.int64),
                            top_p=np.array([p.top_p for p in params], f32),
                            min_p=np.array([p.min_p for p in params], f32),
                            uniform=np.array([(s.rng or rng).random() for s in seqs]),
                            penalties=[_row_penalties(row, s, eos_ids,
                                                      bitmask[mask_rows[row]] if masks and mask_rows[row] >= 0
                                                      else None)
                                       for row, s in enumerate(seqs) if _needs_penalties(s)],
                            bitmask=bitmask, mask_rows=mask_rows)


def _needs_penalties(seq: Sequence) -> bool:
    p = seq.params
    return (p.repetition_penalty != 1.0 or bool(p.presence_penalty or p.frequency_penalty)
            or seq.num_output_tokens < p.min_tokens or bool(p.logit_bias) or p.allowed_token_ids is not None
            or bool(seq.bad_words))


def _row_penalties(row: int, seq: Sequence, eos_ids: list[int], grammar: np.ndarray | None) -> RowPenalties:
    """One row's penalties; `grammar` is its packed grammar mask, if any, which the sampler applies apart."""
    p, out = seq.params, RowPenalties(row)
    if p.repetition_penalty != 1.0:
        out.repetition, out.seen = p.repetition_penalty, np.unique(seq.token_ids)
    if (p.presence_penalty or p.frequency_penalty) and seq.num_output_tokens:
        out.output_ids, counts = np.unique(seq.output_token_ids, return_counts=True)
        out.additive = p.presence_penalty + p.frequency_penalty * counts.astype(np.float32)
    if seq.num_output_tokens < p.min_tokens:
        out.banned = list(p.stop_token_ids) + ([] if p.ignore_eos else list(eos_ids))
    if p.logit_bias:
        out.bias_ids = np.fromiter(p.logit_bias, np.int64, len(p.logit_bias))
        out.bias = np.fromiter(p.logit_bias.values(), np.float32, len(p.logit_bias))
    if p.allowed_token_ids is not None:
        out.allowed = np.array(p.allowed_token_ids, np.int64)
    for word in seq.bad_words:  # its last token is banned where the sequence ends with the rest of it
        if len(word) == 1 or seq.token_ids[len(seq.token_ids) - len(word) + 1:] == word[:-1]:
            out.banned.append(word[-1])
    kept = out.allowed
    if grammar is not None and (out.allowed is not None or out.banned):
        kept = allowed_ids(grammar, seq.matcher.vocab_size)
        both = kept if out.allowed is None else np.intersect1d(out.allowed, kept)
        if both.size:
            kept = both
        else:
            out.allowed = None  # allowed_token_ids the grammar never allows: the grammar wins
    if kept is not None and out.banned and not np.setdiff1d(kept, out.banned).size:
        # every allowed token is banned (a complete grammar allows only EOS, before min_tokens): a row must keep a
        # token to sample, and the constraint that says what may come wins over the bans
        out.banned = []
    return out


def sample(logits: Array, seqs: list[Sequence], eos_ids: list[int], rng: np.random.Generator) -> list[int]:
    """Choose the next token of each sequence from its logits row [B, V] (float32). Records logprobs asked for.

    The engine runs the two halves separately, so that the host can work while the device samples.
    """
    tokens = to_numpy(sample_on_device(logits, sampling_metadata(seqs, eos_ids, rng, grammar_masks(seqs)))).tolist()
    record_logprobs(logits, seqs, tokens)
    return tokens


def _needs_logprobs(seq: Sequence) -> bool:
    return seq.params.logprobs is not None or seq.params.num_sequences > seq.params.n


def record_logprobs(raw: Array, seqs: list[Sequence], tokens: list[int]) -> None:
    """Log-probabilities under the model's raw distribution (before penalties and filters), as vLLM reports.

    Kept for requests that ask for logprobs, and summed for best_of requests, which rank samples by it.
    """
    rows = [i for i, s in enumerate(seqs) if _needs_logprobs(s)]
    if not rows:
        return
    xp = array_module(raw)
    logp = log_softmax(raw[xp.asarray(np.array(rows))])
    width = max(seqs[i].params.logprobs or 0 for i in rows)
    top = to_numpy(xp.argsort(-logp, axis=-1)[:, :width]) if width else np.zeros((len(rows), 0), np.int64)
    logp_host_top = to_numpy(xp.take_along_axis(logp, xp.asarray(top), axis=-1)) if width else top
    chosen_lp = to_numpy(logp[xp.arange(len(rows)), xp.asarray(np.array([tokens[i] for i in rows]))])
    for j, i in enumerate(rows):
        seqs[i].cumulative_logprob += float(chosen_lp[j])
        n = seqs[i].params.logprobs
        if n is not None:
            seqs[i].logprobs.append((tokens[i], float(chosen_lp[j]), top[j, :n].tolist(),
                                     logp_host_top[j, :n].astype(float).tolist()))
