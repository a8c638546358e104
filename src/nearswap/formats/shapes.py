"""Llama-shaped models by their dimensions: tensor names and shapes, parameter counts, config.

The table the generated checkpoints use (``synthetic.make_base`` writes them to disk,
``formats.generated`` makes them on the fly); no numpy here, so a merge of generated inputs
imports none.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..core.dtypes import by_name


@dataclass(frozen=True)
class LlamaShape:
    hidden: int
    layers: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        h, kv = self.hidden, self.hidden // self.heads * self.kv_heads
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, h))]
        for i in range(self.layers):
            p = f"model.layers.{i}."
            out += [
                (p + "input_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)),
                (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_proj.weight", (self.intermediate, h)),
                (p + "mlp.up_proj.weight", (self.intermediate, h)),
                (p + "mlp.down_proj.weight", (h, self.intermediate)),
            ]
        return out + [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]

    @property
    def num_params(self) -> int:
        return sum(math.prod(s) for _, s in self.tensors())

    def config(self, dtype: str) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": self.hidden,
            "intermediate_size": self.intermediate, "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads, "vocab_size": self.vocab,
            "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
            "tie_word_embeddings": False, "torch_dtype": by_name(dtype).hf_name,
        }


SHAPES = {
    "tiny": LlamaShape(64, 2, 128, 256, 4, 2),  # ~0.1M params: tests
    "demo": LlamaShape(512, 8, 1376, 8000, 8, 4),  # ~31M: make demo
    "0.5b": LlamaShape(1024, 28, 4096, 32000, 16, 8),  # ~0.50B: benchmark
    "1.5b": LlamaShape(2048, 30, 5632, 32000, 16, 4),  # ~1.48B: memory scaling
    "miqu-70b": LlamaShape(8192, 80, 28672, 32000, 64, 8),  # 68.98B: Miqu / Llama-2-70B (generated on the fly only)
}


def is_norm(name: str) -> bool:
    return "norm" in name
