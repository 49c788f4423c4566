"""The Llama-family transformer (Llama 2/3, Mistral, Qwen2, Qwen3) in one readable file.

The forward pass takes a flattened batch of tokens from many sequences, prefills and decodes mixed, and the
AttentionMetadata that says where each token sits (DESIGN.md). Weights are stored transposed ([in, out]) and
fused (q|k|v, gate|up) at load time so each layer is four GEMMs. `ops` is the op set of the device
(layers.reference on the CPU, layers.cuda_ops on the GPU, whose GEMMs go through a cuBLAS handle of its own so
that CUDA graphs can capture them).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from cupaged.checkpoint import FiniteCheck
from cupaged.config import ModelConfig, rope_cos_sin
from cupaged.kv_cache import AttentionMetadata, KVCache
from cupaged.progress import progress

Array = Any


def expected_weights(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Hugging Face tensor names and shapes the checkpoint must hold for this config."""
    c = config
    q_out, kv_out = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (c.vocab_size, c.hidden_size),
                                          "model.norm.weight": (c.hidden_size,)}
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, c.hidden_size)
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (c.hidden_size,),
            p + "post_attention_layernorm.weight": (c.hidden_size,),
            p + "self_attn.q_proj.weight": (q_out, c.hidden_size),
            p + "self_attn.k_proj.weight": (kv_out, c.hidden_size),
            p + "self_attn.v_proj.weight": (kv_out, c.hidden_size),
            p + "self_attn.o_proj.weight": (c.hidden_size, q_out),
            p + "mlp.gate_proj.weight": (c.intermediate_size, c.hidden_size),
            p + "mlp.up_proj.weight": (c.intermediate_size, c.hidden_size),
            p + "mlp.down_proj.weight": (c.hidden_size, c.intermediate_size),
        })
        if c.qkv_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q_out,), p + "self_attn.k_proj.bias": (kv_out,),
                           p + "self_attn.v_proj.bias": (kv_out,)})
        if c.qk_norm:
            shapes.update({p + "self_attn.q_norm.weight": (c.head_dim,), p + "self_attn.k_norm.weight": (c.head_dim,)})
    return shapes


class Layer:
    """One decoder layer's weights, moved to the device, then fused and transposed there for `x @ w`.

    Each tensor is added to `check` (NaN/Inf) as it reaches the device, before fusing loses its name."""

    def __init__(self, t: dict[str, Array], prefix: str, xp: ModuleType, check: FiniteCheck | None = None):
        def get(name: str) -> Array:
            a = xp.asarray(t[prefix + name])
            if check is not None:
                check.add(prefix + name, a)
            return a

        def fused_t(*names: str) -> Array:  # [in, sum of outs], contiguous
            return xp.ascontiguousarray(xp.concatenate([get(n) for n in names]).T)

        def optional(name: str) -> Array | None:
            return get(name) if prefix + name in t else None

        self.input_norm = get("input_layernorm.weight")
        self.post_norm = get("post_attention_layernorm.weight")
        self.w_qkv = fused_t("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")
        self.b_qkv = xp.concatenate([get(f"self_attn.{n}_proj.bias") for n in "qkv"]) \
            if prefix + "self_attn.q_proj.bias" in t else None
        self.w_o = fused_t("self_attn.o_proj.weight")
        self.w_gate_up = fused_t("mlp.gate_proj.weight", "mlp.up_proj.weight")
        self.w_down = fused_t("mlp.down_proj.weight")
        self.q_norm = optional("self_attn.q_norm.weight")  # Qwen3
        self.k_norm = optional("self_attn.k_norm.weight")


class LlamaModel:
    """Weights on the device plus the forward pass."""

    def __init__(self, config: ModelConfig, tensors: dict[str, Array], ops: ModuleType, xp: ModuleType,
                 max_positions: int | None = None):
        """`tensors`: expected_weights' names to NumPy (host) or device arrays. Every weight is checked for NaN
        and Inf on its way (checkpoint.FiniteCheck: CheckpointError naming the tensors)."""
        self.config, self.ops, self.xp = config, ops, xp
        check = FiniteCheck()

        def get(name: str) -> Array:
            a = xp.asarray(tensors[name])
            check.add(name, a)
            return a

        self.embed = get("model.embed_tokens.weight")
        self.final_norm = get("model.norm.weight")
        head = self.embed if config.tie_word_embeddings else get("lm_head.weight")
        self.lm_head = xp.ascontiguousarray(head.T)
        where = "uploading layers to the GPU" if xp.__name__ == "cupy" else "preparing layers"
        self.layers = []
        with progress(where, config.num_layers) as bar:
            for i in range(config.num_layers):
                self.layers.append(Layer(tensors, f"model.layers.{i}.", xp, check))
                bar.update()
        check.raise_if_any()
        self.cos_sin = xp.asarray(rope_cos_sin(config, max_positions or config.max_position_embeddings))
        self.scale = config.head_dim ** -0.5

    def forward(self, input_ids: Array, meta: AttentionMetadata, cache: KVCache) -> Array:
        """Hidden states [T, hidden] after the final norm, for tokens `input_ids` [T] described by `meta`.

        Writes each token's K/V into `cache` at `meta.slot_mapping` before attending. A layer is its attention
        inputs (norm, q|k|v, rotary, the K/V write), attention over the paged cache, then its attention outputs
        (o-proj, norm, MLP): the halves around attention are what the engine's piecewise CUDA graphs capture.
        """
        hidden, residual = self.embed[input_ids], None
        for i in range(len(self.layers)):
            q, residual = self.attention_inputs(i, hidden, residual, meta.positions, meta.slot_mapping, cache)
            attn = self.ops.paged_attention(q, cache.k[i], cache.v[i], meta, self.scale, kv_scales=cache.scales(i))
            hidden, residual = self.attention_outputs(i, attn, residual)
        return self.final_norm_of(hidden, residual)

    def attention_inputs(self, i: int, hidden: Array, residual: Array | None, positions: Array, slot_mapping: Array,
                         cache: KVCache) -> tuple[Array, Array]:
        """Layer i up to attention: (q [T, Hq, D], the residual stream). K and V go into the cache."""
        c, ops, layer = self.config, self.ops, self.layers[i]
        eps, tokens = c.rms_norm_eps, hidden.shape[0]
        q_size, kv_size = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        if residual is None:  # the residual stream is kept in float32: bf16 rounding would accumulate in it
            x, residual = ops.rms_norm(hidden, layer.input_norm, eps), hidden.astype(self.xp.float32)
        else:
            x, residual = ops.add_rms_norm(hidden, residual, layer.input_norm, eps)
        qkv = ops.matmul(x, layer.w_qkv)
        if layer.b_qkv is not None:
            qkv = qkv + layer.b_qkv
        q = qkv[:, :q_size].reshape(tokens, c.num_heads, c.head_dim)
        k = qkv[:, q_size:q_size + kv_size].reshape(tokens, c.num_kv_heads, c.head_dim)
        v = qkv[:, q_size + kv_size:].reshape(tokens, c.num_kv_heads, c.head_dim)
        if layer.q_norm is not None:  # Qwen3 normalises each head before rotary
            q = ops.rms_norm(q, layer.q_norm, eps)
            k = ops.rms_norm(k, layer.k_norm, eps)
        q, k = ops.apply_rotary(q, k, positions, self.cos_sin)
        ops.write_kv(k, v, cache.k[i], cache.v[i], slot_mapping, kv_scales=cache.scales(i))
        return q, residual

    def attention_outputs(self, i: int, attn: Array, residual: Array) -> tuple[Array, Array]:
        """Layer i after attention: (its output, the residual stream)."""
        c, ops, layer = self.config, self.ops, self.layers[i]
        hidden = ops.matmul(attn.reshape(attn.shape[0], c.num_heads * c.head_dim), layer.w_o)
        x, residual = ops.add_rms_norm(hidden, residual, layer.post_norm, c.rms_norm_eps)
        return ops.matmul(ops.silu_and_mul(ops.matmul(x, layer.w_gate_up)), layer.w_down), residual

    def final_norm_of(self, hidden: Array, residual: Array | None) -> Array:
        if residual is None:
            return self.ops.rms_norm(hidden, self.final_norm, self.config.rms_norm_eps)
        return self.ops.add_rms_norm(hidden, residual, self.final_norm, self.config.rms_norm_eps)[0]

    def logits(self, hidden: Array, out: Array | None = None) -> Array:
        """float32 logits [N, vocab] for hidden states [N, hidden] (into `out` if given)."""
        return self.ops.matmul(hidden, self.lm_head, self.xp.float32, out)
