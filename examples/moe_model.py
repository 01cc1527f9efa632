"""A small Mixtral-style MoE language model in plain PyTorch, written the way many codebases
write it: experts as an ``nn.ModuleList`` of gate/up/down ``nn.Linear`` in a static loop."""

import torch
import torch.nn as nn
import torch.nn.functional as F


class Expert(nn.Module):
    def __init__(self, hidden: int, intermediate: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoEBlock(nn.Module):
    """Softmax router, top-k, renormalise; each expert processes the tokens routed to it."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int, bias: bool = False):
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(hidden, num_experts, bias=False)
        self.experts = nn.ModuleList(Expert(hidden, intermediate, bias) for _ in range(num_experts))

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = F.softmax(self.router(x), dim=-1, dtype=torch.float32)
        topk_weights, topk_ids = torch.topk(probs, self.top_k, dim=-1)
        topk_weights = (topk_weights / topk_weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(topk_ids == e)
            out.index_add_(0, token, expert(x[token]) * topk_weights[token, slot, None])
        return out.reshape(shape)


class Block(nn.Module):
    def __init__(self, hidden, intermediate, num_experts, top_k, heads=4):
        super().__init__()
        self.norm1 = nn.RMSNorm(hidden)
        self.attn = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.norm2 = nn.RMSNorm(hidden)
        self.moe = MoEBlock(hidden, intermediate, num_experts, top_k)

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.moe(self.norm2(x))


class TinyMoELM(nn.Module):
    def __init__(self, vocab=1000, hidden=512, intermediate=1024, num_experts=8, top_k=2, layers=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.blocks = nn.ModuleList(Block(hidden, intermediate, num_experts, top_k) for _ in range(layers))
        self.norm = nn.RMSNorm(hidden)
        self.head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


class NVFP4Linear(nn.Module):
    """An ``nn.Linear`` held as NVFP4 in the compressed-tensors / ModelOpt layout (``weight_packed``
    uint8 [N, K/2] low nibble first, e4m3 ``weight_scale`` [N, K/16], its own fp32
    ``weight_global_scale``) and dequantised in forward, as such checkpoints run without a kernel."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        from inductor_moe import formats

        q, s, g = formats.quantize_nvfp4(linear.weight.detach().float())
        self.register_buffer("weight_packed", q)
        self.register_buffer("weight_scale", s)
        self.register_buffer("weight_global_scale", g.reshape(1).float())
        self.bias = linear.bias

    def forward(self, x):
        p = self.weight_packed
        lut = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=p.device)
        codes = torch.stack((p & 0xF, p >> 4), dim=-1).reshape(p.shape[0], -1).long()
        w = lut[codes] * self.weight_scale.float().repeat_interleave(16, dim=-1) * self.weight_global_scale
        return F.linear(x, w.to(x.dtype), self.bias)


def with_nvfp4_experts(block: MoEBlock) -> MoEBlock:
    """Replace every expert projection of ``block`` by its ``NVFP4Linear`` (in place)."""
    for expert in block.experts:
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(expert, name, NVFP4Linear(getattr(expert, name)))
    return block
