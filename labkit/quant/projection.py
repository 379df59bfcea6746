"""Paper arithmetic for big models: where the article's "70B: 140 GB → 35 GB at 4 bits" comes from.

Only for models too large to load here; every number for the models we *can* load is measured instead.
The projection keeps embeddings and the output head in 16 bits (as bitsandbytes does) and counts the
quantization constants, which is what a real checkpoint needs.
"""

from __future__ import annotations

from dataclasses import dataclass


def linear_params(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int) -> int:
    """Weights in a Llama stack's linear layers: per layer q and o (``hidden x hidden``), k and v (``hidden x kv_heads
    * head_dim``: grouped-query attention shares them across heads), and the MLP's gate, up and down."""
    head_dim = hidden // heads
    attn = 2 * hidden * hidden + 2 * hidden * kv_heads * head_dim
    return layers * (attn + 3 * hidden * intermediate)


@dataclass(frozen=True)
class LlamaShape:
    name: str
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    tied: bool = False

    @property
    def linear_params(self) -> int:
        return linear_params(self.hidden, self.intermediate, self.layers, self.heads, self.kv_heads)

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def other_params(self) -> int:  # RMSNorm weights
        return (2 * self.layers + 1) * self.hidden

    @property
    def params(self) -> int:
        return self.linear_params + self.embedding_params + self.other_params


LLAMA_3_8B = LlamaShape("llama-3-8b", 128256, 4096, 14336, 32, 32, 8)
LLAMA_3_70B = LlamaShape("llama-3-70b", 128256, 8192, 28672, 80, 64, 8)

# bits per linear weight, constants included
BITS = {
    "int8": 8 + 32 / 4096,  # one fp32 scale per output row (of ~4096+ inputs), as labkit's Int8Linear stores
    "nf4": 4 + 32 / 64,  # fp32 absmax per block of 64
    "nf4-dq": 4 + 8 / 64 + 32 / (64 * 256),  # int8 absmax + fp32 scale per 256 blocks
}


def project(shape: LlamaShape) -> list[dict]:
    """Projected weight bytes of ``shape`` in each format, as result-record variants."""
    rest16 = 2 * (shape.embedding_params + shape.other_params)
    rows = [
        ("fp32", 4 * shape.params),
        ("fp16", 2 * shape.params),
        ("int8", shape.linear_params * BITS["int8"] / 8 + rest16),
        ("raw-4bit (article)", shape.params / 2),
        ("nf4", shape.linear_params * BITS["nf4"] / 8 + rest16),
        ("nf4-dq", shape.linear_params * BITS["nf4-dq"] / 8 + rest16),
    ]
    return [dict(name=n, model=f"{shape.name} (projected)", params=shape.params, weight_bytes=int(b),
                 weight_gb=round(b / 1e9, 1), projected=True) for n, b in rows]
