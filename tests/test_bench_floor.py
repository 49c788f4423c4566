"""bench/floor.py against figures worked out by hand on a tiny config (so a wrong term makes a test fail).

The config: vocab 10, hidden 4, intermediate 6, 2 layers, 2 query heads and 1 KV head of head_dim 2, 2-byte items.
Per layer: q 4x4 = 16, k 2x4 = 8, v 8, o 4x4 = 16, gate/up 6x4 = 24 each, down 4x6 = 24: 120 matrix parameters,
plus two norms of 4. Two layers: 240 + 16; the final norm 4; the embedding 40 (the LM head when tied).
Weights read per step: 240 + 16 + 4 + 40 = 300 parameters = 600 bytes (untied: the LM head's 40 instead of the
embedding's, the same). K/V per token: 2 (K, V) x 2 layers x 1 head x 2 dims x 2 bytes = 16 bytes.
Attention FLOPs per key seen: 4 x 2 heads x 2 dims x 2 layers = 32. LM head: 2 x 4 x 10 = 80 per sampled row.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from bench.floor import model_terms, step_floor, workload_floor
from cupaged.config import ModelConfig

TINY = ModelConfig(architecture="LlamaForCausalLM", vocab_size=10, hidden_size=4, intermediate_size=6, num_layers=2,
                   num_heads=2, num_kv_heads=1, head_dim=2, rms_norm_eps=1e-6, rope_theta=10000.0,
                   max_position_embeddings=128, tie_word_embeddings=True, qkv_bias=False, qk_norm=False)
# 1,000 bytes/s and 1,000 FLOP/s, so a step's seconds are its kilobytes or its kiloFLOPs
SLOW_MATH = {"read_gb_s": 1e-6, "matmul_tflops": 1e-9}
# 1,000 bytes/s and 10,000 FLOP/s
FAST_MATH = {"read_gb_s": 1e-6, "matmul_tflops": 1e-8}


def i32(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int32)


def test_model_terms_by_hand():
    assert model_terms(TINY, 2) == {"weight_bytes": 600, "layer_matrix_params": 240, "kv_bytes_per_token": 16,
                                    "attention_flops_per_key": 32, "lm_head_flops_per_row": 80}
    # untied: the LM head is read, the embedding table is only gathered from
    assert model_terms(dataclasses.replace(TINY, tie_word_embeddings=False), 2)["weight_bytes"] == 600
    # q/k norms of head_dim 2 in each of 2 layers: 8 more parameters, no more matrix parameters
    qk = model_terms(dataclasses.replace(TINY, qk_norm=True), 2)
    assert (qk["weight_bytes"], qk["layer_matrix_params"]) == (616, 240)


def test_decode_step():
    # 3 decodes at contexts 10, 20, 30 (after the step).
    # bytes: 600 + 16 x (10 + 20 + 30) read + 16 x 3 written = 600 + 960 + 48 = 1,608
    # FLOPs: 2 x 240 x 3 = 1,440 + 80 x 3 = 240 + 32 x (10 + 20 + 30 keys) = 1,920 -> 3,600
    q, s = i32(1, 1, 1), i32(10, 20, 30)
    assert step_floor(TINY, q, s, 3, 2, SLOW_MATH) == pytest.approx(3.600)   # FLOP-bound
    assert step_floor(TINY, q, s, 3, 2, FAST_MATH) == pytest.approx(1.608)   # bytes-bound (0.36 s of math)
    floor = workload_floor(TINY, [(q, s, 3)], FAST_MATH, 2)
    assert (floor["bytes"], floor["flops"], floor["steps"], floor["bytes_bound_steps"]) == (1608, 3600, 1, 1)


def test_prefill_with_cached_prefix():
    # 4 new tokens after 6 cached: seq_len 10. bytes: 600 + 16 x 10 + 16 x 4 = 824.
    # keys seen: 4 x 6 + (1 + 2 + 3 + 4) = 34. FLOPs: 2 x 240 x 4 = 1,920 + 80 + 32 x 34 = 1,088 -> 3,088
    floor = workload_floor(TINY, [(i32(4), i32(10), 1)], SLOW_MATH, 2)
    assert (floor["bytes"], floor["flops"]) == (824, 3088)
    assert floor["floor_s"] == pytest.approx(3.088)
    # the same chunk when it does not end its prompt samples nothing: 80 FLOPs less
    assert step_floor(TINY, i32(4), i32(10), 0, 2, SLOW_MATH) == pytest.approx(3.008)


def test_fresh_prefill_and_mixed_step():
    # a fresh prompt of 5 (keys 15) next to a decode at context 7 (keys 7); 2 rows sampled.
    # bytes: 600 + 16 x (5 + 7) + 16 x (5 + 1) = 600 + 192 + 96 = 888
    # FLOPs: 2 x 240 x 6 = 2,880 + 160 + 32 x 22 = 704 -> 3,744
    floor = workload_floor(TINY, [(i32(5, 1), i32(5, 7), 2)], None, 2)
    assert (floor["bytes"], floor["flops"], floor["floor_s"]) == (888, 3744, None)
    # float32 items double every byte, not the FLOPs
    assert workload_floor(TINY, [(i32(5, 1), i32(5, 7), 2)], None, 4)["bytes"] == 2 * 888


def test_workload_sums_steps_each_at_its_own_bound():
    # the decode step (1,608 B, 3,600 FLOP) and the prefill (824 B, 3,088 FLOP) at 1,000 B/s and 10,000 FLOP/s:
    # max(1.608, 0.36) + max(0.824, 0.3088) = 2.432 s; an empty step adds nothing
    trace = [(i32(1, 1, 1), i32(10, 20, 30), 3), (i32(), i32(), 0), (i32(4), i32(10), 1)]
    floor = workload_floor(TINY, trace, FAST_MATH, 2)
    assert floor["floor_s"] == pytest.approx(2.432)
    assert (floor["steps"], floor["bytes"], floor["flops"]) == (3, 1608 + 824, 3600 + 3088)
    # at 1,000 FLOP/s the decode is FLOP-bound and the prefill too: 3.6 + 3.088
    assert workload_floor(TINY, trace, SLOW_MATH, 2)["floor_s"] == pytest.approx(6.688)
    assert workload_floor(TINY, [], FAST_MATH, 2)["floor_s"] == 0.0


def test_bad_steps_are_refused():
    with pytest.raises(ValueError):
        workload_floor(TINY, [(i32(1, 1), i32(5), 1)], FAST_MATH, 2)
    with pytest.raises(ValueError):
        workload_floor(TINY, [(i32(6), i32(5), 1)], FAST_MATH, 2)
