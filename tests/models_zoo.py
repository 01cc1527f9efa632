"""Tiny random-weight MoE models for the pattern tests: Hugging Face ``*ForCausalLM`` built from
their ``*Config(...)`` (nothing downloaded) and plain-PyTorch MoE blocks in each idiom.

# T: tokens, H: hidden size, E: experts, k: experts per token, I: expert intermediate size
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

H, I, E, VOCAB = 64, 32, 8, 128

# ---------------------------------------------------------------- Hugging Face transformers v5

_COMMON = dict(vocab_size=VOCAB, hidden_size=H, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)


def _mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    return MixtralForCausalLM, MixtralConfig(**_COMMON, intermediate_size=I, num_local_experts=E,
                                             num_experts_per_tok=2)


def _qwen3_moe():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    return Qwen3MoeForCausalLM, Qwen3MoeConfig(**_COMMON, head_dim=16, intermediate_size=2 * I,
                                               moe_intermediate_size=I, num_experts=E, num_experts_per_tok=4,
                                               norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])


def _qwen2_moe():
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    return Qwen2MoeForCausalLM, Qwen2MoeConfig(**_COMMON, intermediate_size=2 * I, moe_intermediate_size=I,
                                               shared_expert_intermediate_size=2 * I, num_experts=E,
                                               num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[])


def _deepseek_v3():
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    return DeepseekV3ForCausalLM, DeepseekV3Config(
        **dict(_COMMON, num_key_value_heads=4), intermediate_size=2 * I, moe_intermediate_size=I, n_routed_experts=E, num_experts_per_tok=2,
        n_shared_experts=1, n_group=2, topk_group=1, first_k_dense_replace=0, routed_scaling_factor=2.5,
        q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)


def _deepseek_v4():
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    cfg = dict(_COMMON, num_key_value_heads=1)
    return DeepseekV4ForCausalLM, DeepseekV4Config(
        **cfg, head_dim=32, qk_rope_head_dim=8, q_lora_rank=32, o_groups=2, o_lora_rank=16, moe_intermediate_size=I,
        n_routed_experts=E, num_experts_per_tok=2, n_shared_experts=1, index_n_heads=2, index_head_dim=16,
        index_topk=8, sliding_window=8, hc_mult=2, hc_sinkhorn_iters=2, num_nextn_predict_layers=0,
        layer_types=["compressed_sparse_attention", "heavily_compressed_attention"],
        mlp_layer_types=["hash_moe", "moe"])


def _gpt_oss():
    from transformers import GptOssConfig, GptOssForCausalLM

    return GptOssForCausalLM, GptOssConfig(**_COMMON, head_dim=16, intermediate_size=I, num_local_experts=E,
                                           num_experts_per_tok=2, sliding_window=8,
                                           layer_types=["sliding_attention", "full_attention"])


HF_MODELS = {"mixtral": _mixtral, "qwen2_moe": _qwen2_moe, "qwen3_moe": _qwen3_moe, "deepseek_v3": _deepseek_v3,
             "deepseek_v4": _deepseek_v4, "gpt_oss": _gpt_oss}


def hf_available(name: str) -> bool:
    try:
        HF_MODELS[name]()
        return True
    except (ImportError, TypeError, ValueError):
        return False


def hf_model(name: str, experts_implementation: str = "grouped_mm", dtype=torch.float32, seed: int = 0,
             layers: int | None = None):
    """A tiny ``*ForCausalLM`` with random weights, in eval mode, in ``dtype``."""
    cls, config = HF_MODELS[name]()
    if layers is not None:
        config.num_hidden_layers = layers
        for key in ("layer_types", "mlp_layer_types"):
            if isinstance(getattr(config, key, None), list):
                setattr(config, key, getattr(config, key)[:layers])
    config._experts_implementation = experts_implementation
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():  # random init of the MoE buffers the HF init leaves at zero / empty
        for pname, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
            elif "norm" not in pname:
                p.normal_(0, 0.1)
        for bname, b in model.named_buffers():
            if "e_score_correction_bias" in bname:
                b.normal_(0, 0.1)
            elif "tid2eid" in bname:
                b.copy_(torch.randint(0, E, b.shape))
    return model.to(dtype)


def num_moe_layers(model) -> int:
    return sum(1 for m in model.modules() if type(m).__name__.endswith("Experts"))


def token_ids(batch: int = 2, seq: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)


# ---------------------------------------------------------------------------- plain PyTorch


class Router(nn.Module):
    """softmax-then-top-k (renormalised) or top-k-then-softmax."""

    def __init__(self, hidden, num_experts, top_k, order="softmax_topk"):
        super().__init__()
        self.top_k, self.order = top_k, order
        self.proj = nn.Linear(hidden, num_experts, bias=False)

    def forward(self, x):
        logits = self.proj(x)
        if self.order == "softmax_topk":
            w, ids = torch.topk(F.softmax(logits, dim=-1, dtype=torch.float32), self.top_k, dim=-1)
            w = w / w.sum(-1, keepdim=True)
        else:
            w, ids = torch.topk(logits, self.top_k, dim=-1)
            w = F.softmax(w, dim=-1, dtype=torch.float32)
        return w.to(x.dtype), ids


class SwiGLU(nn.Module):
    def __init__(self, hidden, inter, bias=False, act="silu"):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=bias)
        self.up_proj = nn.Linear(hidden, inter, bias=bias)
        self.down_proj = nn.Linear(inter, hidden, bias=bias)
        self.act = act

    def forward(self, x):
        g = self.gate_proj(x)
        a = F.relu(g).square() if self.act == "relu2" else F.silu(g)
        return self.down_proj(a * self.up_proj(x))


class LoopMoE(nn.Module):
    """ModuleList experts in a static loop; ``select``: "where" (``torch.where(ids == e)``) or
    "one_hot" (Mixtral's ``one_hot(ids, E).permute(2, 1, 0)``, ``torch.where(mask[e])``)."""

    def __init__(self, hidden=H, inter=I, num_experts=E, top_k=2, bias=False, select="where",
                 router="softmax_topk", shared=False, act="silu"):
        super().__init__()
        self.E, self.select = num_experts, select
        self.router = Router(hidden, num_experts, top_k, router)
        self.experts = nn.ModuleList(SwiGLU(hidden, inter, bias, act) for _ in range(num_experts))
        self.shared = SwiGLU(hidden, 2 * inter) if shared else None

    def forward(self, x):
        w, ids = self.router(x)
        out = torch.zeros_like(x)
        mask = F.one_hot(ids, self.E).permute(2, 1, 0) if self.select == "one_hot" else None
        for e, expert in enumerate(self.experts):
            if mask is None:
                token, slot = torch.where(ids == e)
            else:
                slot, token = torch.where(mask[e])
            out.index_add_(0, token, expert(x[token]) * w[token, slot, None])
        return out + self.shared(x) if self.shared is not None else out


class StackedMoE(nn.Module):
    """Experts as 3-D parameters, w13 [E, 2I, H] and w2 [E, H, I]; ``via``: "bmm" (gathered
    weights), "einsum" (gathered weights), or "grouped_mm" (sorted tokens, offsets)."""

    def __init__(self, hidden=H, inter=I, num_experts=E, top_k=2, via="bmm", router="softmax_topk",
                 shared=False, combine="weighted_sum", leak=False, act="silu", weigh="after_down"):
        super().__init__()
        self.E, self.k, self.via, self.combine, self.leak, self.act = num_experts, top_k, via, combine, leak, act
        self.weigh = weigh  # "before_down": routing weights scale the activation, not the output
        self.router = Router(hidden, num_experts, top_k, router)
        self.w13 = nn.Parameter(torch.randn(num_experts, 2 * inter, hidden) * hidden ** -0.5)
        self.w2 = nn.Parameter(torch.randn(num_experts, hidden, inter) * inter ** -0.5)
        self.shared = SwiGLU(hidden, 2 * inter) if shared else None

    def experts(self, x, ids, w=None):
        """Per-(token, slot) rows [T*k, H], in token-major order (``w``: weights applied to h)."""
        T, k = ids.shape
        flat = ids.reshape(-1)
        xs = x.repeat_interleave(k, dim=0)
        if self.via == "bmm":
            h13 = torch.bmm(self.w13[flat], xs.unsqueeze(-1)).squeeze(-1)
        elif self.via == "einsum":
            h13 = torch.einsum("sih,sh->si", self.w13[flat], xs)
        else:
            order = torch.argsort(flat)
            counts = torch.histc(flat.float(), bins=self.E, min=0, max=self.E - 1)
            offs = torch.cumsum(counts, 0, dtype=torch.int32)
            h13 = torch._grouped_mm(x[order // k], self.w13.transpose(1, 2), offs=offs)
        g, u = h13.chunk(2, dim=-1)
        h = (F.relu(g).square() if self.act == "relu2" else F.silu(g)) * u
        if w is not None:
            h = h * (w.reshape(-1, 1) if self.via != "grouped_mm" else w.reshape(-1)[order, None])
        if self.via == "bmm":
            y = torch.bmm(self.w2[flat], h.unsqueeze(-1)).squeeze(-1)
        elif self.via == "einsum":
            y = torch.einsum("shi,si->sh", self.w2[flat], h)
        else:
            y = torch._grouped_mm(h, self.w2.transpose(1, 2), offs=offs)
            y = y[torch.argsort(order)]
        return y

    def forward(self, x):
        w, ids = self.router(x)
        rows = self.experts(x, ids, w if self.weigh == "before_down" else None)
        y = rows.view(x.shape[0], self.k, x.shape[1])
        if self.weigh == "before_down":
            out = y.sum(1)
        elif self.combine == "weighted_sum":
            out = (y * w.unsqueeze(-1)).sum(1)
        elif self.combine == "max":  # a max over the top-k: not a weighted sum
            out = (y * w.unsqueeze(-1)).amax(1)
        else:  # "unweighted": the routing weights never reach the output
            out = y.sum(1)
        out = out + self.shared(x) if self.shared is not None else out
        return (out, rows) if self.leak else out  # leak: the experts' rows are also a model output


# ---------------------------------------------------------------------------------- checks


def rel_err(out, ref) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (NaN never passes: it propagates into the result)."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def experts_golden_eager_compiled(experts, k: int, dtype, tokens: int = 24):
    """One HF experts module on random routing three ways: a float64 copy on the eager loop (its
    grouped_mm / bmm kernels have no float64), as it is, and compiled with our backend.  Returns
    (golden, eager, compiled, report of the compile)."""
    import copy

    import inductor_moe

    golden = copy.deepcopy(experts).double()
    golden.config = copy.deepcopy(experts.config)
    golden.config._experts_implementation = "eager"
    g = torch.Generator().manual_seed(5)
    x = torch.randn(tokens, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(tokens)])
    w = torch.rand(tokens, k, generator=g)
    with torch.no_grad(), inductor_moe.report() as r:
        gold = golden(x.double(), ids, w.double())
        eager = experts(x.to(dtype), ids, w.to(dtype))
        out = torch.compile(experts, backend="inductor_moe")(x.to(dtype), ids, w.to(dtype))
    return gold, eager, out, r


def moe_matches(report, pattern=None) -> list:
    return [m for m in report.matches if m.kind == "moe" and (pattern is None or m.pattern == pattern)]


def compile_counted(model, **compile_kwargs):
    """``torch.compile(model, backend=inductor_moe)`` and a list that grows by one per graph compiled."""
    from inductor_moe.backend import inductor_moe_backend

    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return inductor_moe_backend(gm, example_inputs)

    return torch.compile(model, backend=counting, **compile_kwargs), graphs


class TolistLoopMoE(LoopMoE):
    """Tokens sorted by expert, then a Python loop over ``counts.tolist()``: a data-dependent trip
    count, which Dynamo cannot keep in one graph."""

    def forward(self, x):
        w, ids = self.router(x)
        flat = ids.reshape(-1)
        order = flat.argsort()
        counts = torch.histc(flat.float(), bins=self.E, min=0, max=self.E - 1).int().tolist()
        xs, outs, start = x[order // ids.shape[1]], [], 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            outs.append(self.experts[e](xs[start:start + n]))
            start += n
        rows = torch.empty_like(xs)
        rows[order] = torch.cat(outs)
        return (rows.view(x.shape[0], -1, x.shape[1]) * w.unsqueeze(-1)).sum(1)
