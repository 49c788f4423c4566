"""One step of beam search, with the semantics of transformers' `generate(num_beams=...)`.

Each step scores every continuation of every live beam by the beam's summed log-probability plus the token's,
keeps the best `2 x width` candidates (more with several EOS tokens), and:
- candidates among the first `width` that end (an EOS token, or the length limit) become finished hypotheses,
  scored by sum / generated_length ** length_penalty; the best `width` hypotheses are kept;
- the best `width` candidates that do not end become the next beams;
- the search stops when no beam can still beat the worst kept hypothesis (early_stopping False: judged at the
  current length; "never": at the maximum length when length_penalty > 0; True: as soon as `width`
  hypotheses exist), or when every candidate ended.
"""

from __future__ import annotations

import numpy as np

from cupaged.device import array_module, to_numpy
from cupaged.engine.sequence import SequenceGroup


def beam_step(group: SequenceGroup, eos_ids: list[int], at_max_length: bool
              ) -> tuple[list[tuple[int, int, float]], bool]:
    """Choose the next beams of `group` from its live beams' pending log-probabilities.

    Returns ([(parent beam index, token, new summed log-prob)], whether the search is done) and updates
    group.beam_finished (sorted best first).
    """
    p = group.params
    width, penalty = p.beam_width, p.length_penalty
    live = group.live()
    xp = array_module(live[0].pending_logprobs)
    scores = xp.stack([s.pending_logprobs for s in live]) + xp.asarray(
        np.array([s.cumulative_logprob for s in live], np.float32))[:, None]
    vocab = scores.shape[1]
    flat = scores.ravel()
    keep = min(max(2, 1 + len(eos_ids)) * width, flat.shape[0])
    top = xp.argpartition(-flat, keep - 1)[:keep]
    top = top[xp.argsort(-flat[top], kind="stable")]
    values, indices = to_numpy(flat[top]), to_numpy(top)
    finite = np.isfinite(values)  # a grammar's mask leaves -inf: those tokens are no candidates
    values, indices = values[finite], indices[finite]
    generated = live[0].num_output_tokens + 1
    eos = set(eos_ids)
    ends = [at_max_length or int(i % vocab) in eos for i in indices]

    full = len(group.beam_finished) >= width and p.early_stopping is True
    if not full:
        for rank in range(min(width, len(indices))):
            if ends[rank]:
                parent, token = divmod(int(indices[rank]), vocab)
                hypothesis = live[parent].fork(-1)
                hypothesis.token_ids.append(token)
                hypothesis.cumulative_logprob = float(values[rank])
                group.beam_finished.append((float(values[rank]) / generated ** penalty, hypothesis))
        group.beam_finished.sort(key=lambda h: -h[0])
        del group.beam_finished[width:]

    choices = [(int(i) // vocab, int(i) % vocab, float(v)) for i, v, e in zip(indices, values, ends) if not e][:width]
    if all(ends) or not choices:
        return [], True
    if len(group.beam_finished) < width:
        return choices, False
    if p.early_stopping is True:
        return choices, True
    best_length = (p.max_tokens if p.early_stopping == "never" and penalty > 0 and p.max_tokens else generated)
    best_possible = choices[0][2] / best_length ** penalty
    worst_kept = group.beam_finished[-1][0]
    return choices, not best_possible > worst_kept
