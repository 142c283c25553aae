"""A Llama-architecture decoder (RMSNorm, RoPE, GQA attention, SwiGLU MLP) with random weights.

Shapes are those of Llama-3-8B, Llama-2-7B and Yi-6B (conf/serving/model/*.yaml); nothing is
downloaded: weights are seeded N(0, 1/fan_in) so activations keep unit scale through the layers.
`num_layers` may be cut (the per-token cost of attention and of the linear layers both scale with
it, so attention's share of an iteration does not depend on it; only the embedding/LM head's does).

The model is attention-agnostic: `forward(tokens, positions, attention)` calls
`attention(layer, q, k, v) -> o` for each layer, with
    q [T, num_q_heads, head_dim], k, v [T, num_kv_heads, head_dim]  (RoPE already applied to q, k)
    o [T, num_q_heads, head_dim]
where T are the iteration's new tokens in any order the caller chose. The serving engine passes an
attention that writes k, v into the paged cache and calls a backend of `baselines.registry`;
`causal_self_attention` is the plain, cache-free attention of ONE sequence (the test's reference).

Not modelled (irrelevant to attention's cost): Llama-3's RoPE frequency scaling, tied embeddings.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pod.batch import ModelHeads

Attention = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ModelConfig:
    name: str
    hidden_size: int
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position: int = 32768      # RoPE table length: the longest prompt + output served

    def __post_init__(self):
        for f in ("hidden_size", "num_layers", "num_q_heads", "num_kv_heads", "head_dim",
                  "intermediate_size", "vocab_size", "max_position"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"ModelConfig.{f}={v!r} is invalid: must be a positive integer")
        if self.num_q_heads % self.num_kv_heads:
            raise ValueError(f"ModelConfig.num_kv_heads={self.num_kv_heads} must divide "
                             f"num_q_heads={self.num_q_heads}")
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim={self.head_dim} must be even (RoPE)")

    @property
    def heads(self) -> ModelHeads:
        return ModelHeads(self.num_q_heads, self.num_kv_heads, self.head_dim)

    def with_layers(self, num_layers: int | None) -> "ModelConfig":
        return self if num_layers is None else dataclasses.replace(self, num_layers=int(num_layers))

    def num_parameters(self) -> int:
        h, d = self.hidden_size, self.head_dim
        attn = h * (self.num_q_heads + 2 * self.num_kv_heads) * d + self.num_q_heads * d * h
        mlp = 3 * h * self.intermediate_size
        per_layer = attn + mlp + 2 * h                      # + the two RMSNorm weights
        return self.num_layers * per_layer + 2 * self.vocab_size * h + h

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """K and V of one token in every layer."""
        elt = torch.finfo(dtype).bits // 8
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * elt


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def rope_tables(head_dim: int, max_position: int, theta: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max_position, head_dim] fp32, halves duplicated (Llama's rotate-half convention)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.arange(max_position, dtype=torch.float64)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float().to(device), angles.sin().float().to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D]; cos/sin [T, D] of each token's position. Rotation in fp32, result in x's dtype:
    x_rot = x * cos + rotate_half(x) * sin, rotate_half([a, b]) = [-b, a] over the two halves of D."""
    xf = x.float()
    a, b = xf.chunk(2, dim=-1)
    rotated = torch.cat([-b, a], dim=-1)
    return (xf * cos[:, None, :] + rotated * sin[:, None, :]).to(x.dtype).contiguous()


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype, device, gen: torch.Generator):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.cfg = cfg

        def w(out_f: int, in_f: int) -> nn.Parameter:
            t = torch.empty(out_f, in_f, dtype=dtype, device=device)
            return nn.Parameter(t.normal_(0.0, 1.0 / math.sqrt(in_f), generator=gen), requires_grad=False)

        def ones() -> nn.Parameter:
            return nn.Parameter(torch.ones(h, dtype=dtype, device=device), requires_grad=False)

        self.attn_norm = ones()
        self.wqkv = w((cfg.num_q_heads + 2 * cfg.num_kv_heads) * d, h)   # fused q, k, v projections
        self.wo = w(h, cfg.num_q_heads * d)
        self.mlp_norm = ones()
        self.w_gate_up = w(2 * cfg.intermediate_size, h)                 # fused SwiGLU gate and up
        self.w_down = w(h, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, cos, sin, layer: int, attention: Attention) -> torch.Tensor:
        c = self.cfg
        t = x.shape[0]
        qkv = F.linear(rms_norm(x, self.attn_norm, c.rms_norm_eps), self.wqkv)
        q, k, v = qkv.split([c.num_q_heads * c.head_dim, c.num_kv_heads * c.head_dim,
                             c.num_kv_heads * c.head_dim], dim=-1)
        q = apply_rope(q.view(t, c.num_q_heads, c.head_dim), cos, sin)
        k = apply_rope(k.view(t, c.num_kv_heads, c.head_dim), cos, sin)
        v = v.view(t, c.num_kv_heads, c.head_dim)
        o = attention(layer, q, k, v)
        x = x + F.linear(o.reshape(t, -1), self.wo)
        gate, up = F.linear(rms_norm(x, self.mlp_norm, c.rms_norm_eps), self.w_gate_up).chunk(2, dim=-1)
        return x + F.linear(F.silu(gate) * up, self.w_down)


class LlamaModel(nn.Module):
    """Embedding -> num_layers x DecoderLayer -> final RMSNorm; `logits` applies the LM head."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype = torch.bfloat16,
                 device: str | torch.device = "cpu", seed: int = 0):
        super().__init__()
        self.cfg, self.dtype, self.device = cfg, dtype, torch.device(device)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        h = cfg.hidden_size
        self.embed = nn.Parameter(torch.empty(cfg.vocab_size, h, dtype=dtype, device=device)
                                  .normal_(0.0, 1.0, generator=gen), requires_grad=False)
        self.layers = nn.ModuleList(DecoderLayer(cfg, dtype, device, gen) for _ in range(cfg.num_layers))
        self.final_norm = nn.Parameter(torch.ones(h, dtype=dtype, device=device), requires_grad=False)
        self.lm_head = nn.Parameter(torch.empty(cfg.vocab_size, h, dtype=dtype, device=device)
                                    .normal_(0.0, 1.0 / math.sqrt(h), generator=gen), requires_grad=False)
        cos, sin = rope_tables(cfg.head_dim, cfg.max_position, cfg.rope_theta, device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, attention: Attention) -> torch.Tensor:
        """tokens, positions [T] (int32/int64, on the model's device) -> final hidden states [T, hidden]."""
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        x = F.embedding(tokens, self.embed)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, i, attention)
        return rms_norm(x, self.final_norm, self.cfg.rms_norm_eps)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> fp32 logits [N, vocab]. The engine applies it to the sampled rows only."""
        return F.linear(hidden, self.lm_head).float()

    @torch.inference_mode()
    def full_forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits [L, vocab] at every position of ONE sequence: no cache, plain causal attention."""
        positions = torch.arange(tokens.shape[0], device=tokens.device)
        return self.logits(self.forward(tokens, positions, causal_self_attention))


def causal_self_attention(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal GQA attention of one sequence whose tokens are q/k/v's rows 0..L-1 (no cache)."""
    group = q.shape[1] // k.shape[1]
    qh = q.transpose(0, 1)                                        # [Hq, L, D]
    kh = k.repeat_interleave(group, dim=1).transpose(0, 1)        # query head h reads KV head h // group
    vh = v.repeat_interleave(group, dim=1).transpose(0, 1)
    o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True)
    return o.transpose(0, 1)
