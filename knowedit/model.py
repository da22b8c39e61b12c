"""A small decoder-only transformer whose configured layers use a product-key
memory layer instead of the FFN. Read top to bottom: leaf modules first, the
language model last."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from knowedit.config import ConfigError, ModelConfig
from knowedit.memory import MemoryTrace, ProductKeyMemory, RowPatch, ValuePool


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.d_model % cfg.n_heads:
            raise ConfigError("d_model must be divisible by n_heads")
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, cache: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """(B, T, C) -> (B, T, C). With ``cache`` (a dict, empty at first) the keys
        and values of earlier calls are attended to and this call's are added:
        a whole prompt first, then one token at a time (greedy decoding)."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=-1)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hd)
        causal = True
        if cache is not None:
            if "k" in cache:
                if T != 1:
                    raise ValueError("after the prompt, a cached forward takes one token at a time")
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
                causal = False  # one new query sees every cached position
            cache["k"], cache["v"] = k, v
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=causal, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        hidden = cfg.ffn_mult * cfg.d_model
        self.up = nn.Linear(cfg.d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, **_: object) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, pool: ValuePool | None) -> None:
        super().__init__()
        self.norm1 = nn.RMSNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.norm2 = nn.RMSNorm(cfg.d_model)
        self.ffn: nn.Module = (
            ProductKeyMemory(cfg.d_model, cfg.memory, pool, layer) if pool is not None else FeedForward(cfg)
        )

    def forward(
        self,
        x: torch.Tensor,
        trace: list[MemoryTrace] | None,
        patches: dict[str, RowPatch] | None,
        cache: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cache)
        h = self.norm2(x)
        if isinstance(self.ffn, ProductKeyMemory):
            patch = patches.get(self.ffn.pool.name) if patches else None
            return x + self.ffn(h, trace=trace, patch=patch)
        return x + self.ffn(h)


class MemoryLM(nn.Module):
    """Decoder-only language model with product-key memory layers.

    Args:
        cfg: model settings; ``cfg.vocab_size`` must be set.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ConfigError("model.vocab_size must be set (from the tokenizer)")
        bad = [i for i in cfg.memory_layers if not 0 <= i < cfg.n_layers]
        if bad:
            raise ConfigError(f"memory_layers {bad} outside 0..{cfg.n_layers - 1}")
        self.cfg = cfg
        mem = cfg.memory
        value_dim = mem.value_dim or cfg.d_model
        n_slots = mem.n_keys**2
        self.pools = nn.ModuleDict()
        if cfg.memory_layers and mem.shared_values:
            self.pools["pool"] = ValuePool(n_slots, value_dim, name="pool")
        for i in cfg.memory_layers if not mem.shared_values else []:
            self.pools[f"mem{i}"] = ValuePool(n_slots, value_dim, name=f"mem{i}")
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(
            Block(cfg, i, self._pool_for(i) if i in cfg.memory_layers else None) for i in range(cfg.n_layers)
        )
        self.norm = nn.RMSNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init)
        if cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight

    def _pool_for(self, layer: int) -> ValuePool:
        return self.pools["pool"] if self.cfg.memory.shared_values else self.pools[f"mem{layer}"]

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def memory_layers(self) -> list[ProductKeyMemory]:
        return [b.ffn for b in self.blocks if isinstance(b.ffn, ProductKeyMemory)]

    def value_parameters(self) -> list[nn.Parameter]:
        """The memory value tables, for their own optimizer group and learning rate."""
        return [p.values for p in self.pools.values()]

    def other_parameters(self) -> list[nn.Parameter]:
        """Every parameter that is not a memory value table."""
        vals = {id(p) for p in self.value_parameters()}
        return [p for p in self.parameters() if id(p) not in vals]

    def forward(
        self,
        idx: torch.Tensor,
        trace: list[MemoryTrace] | None = None,
        patches: dict[str, RowPatch] | None = None,
        cache: list[dict[str, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """Token ids (B, T) -> logits (B, T, vocab): :attr:`head` of :meth:`final_hidden`.

        Args:
            idx: (B, T) token ids, T <= max_seq_len.
            trace: if a list, each memory layer appends what it read.
            patches: per pool name, rows that replace the stored ones (editing).
            cache: attention keys and values kept between calls (greedy decoding):
                ``[]`` before the prompt's call, then pass it with each next token;
                ``idx`` then continues the cached positions.
        """
        return self.head(self.final_hidden(idx, trace, patches, cache))  # (B, T, V)

    def final_hidden(
        self,
        idx: torch.Tensor,
        trace: list[MemoryTrace] | None = None,
        patches: dict[str, RowPatch] | None = None,
        cache: list[dict[str, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """Token ids (B, T) -> the final normed hidden states (B, T, C) that :attr:`head`
        turns into logits; the arguments are :meth:`forward`'s. Training scores only the
        positions that have a target, so it applies the head to those alone."""
        B, T = idx.shape
        start = 0
        if cache is not None:
            if not cache:
                cache.extend({} for _ in self.blocks)
            start = cache[0]["k"].shape[2] if "k" in cache[0] else 0
        if start + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds the context of {self.cfg.max_seq_len}")
        pos = torch.arange(start, start + T, device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(pos)  # (B, T, C)
        for i, block in enumerate(self.blocks):
            x = block(x, trace, patches, None if cache is None else cache[i])
        return self.norm(x)

    def target_logits(
        self, idx: torch.Tensor, targets: torch.Tensor, trace: list[MemoryTrace] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (N, V) at the N positions of ``idx`` (B, T) whose target is not -100,
        and those targets (N,): what a cross-entropy over ``targets`` (B, T) scores,
        without running the head at padding (or, with an answer-only loss, prompt)
        positions. Same loss and gradients as :meth:`forward`'s logits with
        ``ignore_index=-100``."""
        keep = targets != -100
        return self.head(self.final_hidden(idx, trace)[keep]), targets[keep]

    def final_memory(self) -> ProductKeyMemory | None:
        """The memory layer of the last block, if the last block has one."""
        ffn = self.blocks[-1].ffn
        return ffn if isinstance(ffn, ProductKeyMemory) else None

    def residual_before_final_ffn(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, C) residual stream after the last block's attention.

        With :meth:`logits_from_final_ffn` this splits :meth:`forward` in two, so an
        editor that only changes the last memory layer's values can run the
        frozen prefix once and the cheap, position-wise suffix many times.
        """
        T = idx.shape[1]
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(T, device=idx.device))
        for block in self.blocks[:-1]:
            x = block(x, None, None)
        last = self.blocks[-1]
        return x + last.attn(last.norm1(x))

    def final_select(self, x_mid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """What the last block's memory layer reads at residuals ``x_mid`` (R, C):
        slot ids (R, H*k), their weights (R, H*k, float32) and the value gate
        (R, d_v, float32), or None for an ungated layer.

        With :meth:`residual_before_final_ffn` and :meth:`final_readout` this is
        :meth:`forward` in three parts, for an editor that changes only that
        layer's value rows; ``tests/test_model.py`` checks they compose to it.
        """
        last = self.blocks[-1]
        mem = last.ffn
        if not isinstance(mem, ProductKeyMemory):
            raise ValueError("the last block has no memory layer")
        h = last.norm2(x_mid)
        _, ids, w = mem.select(h)
        gate = F.silu(mem.gate(h)).float() if mem.gate is not None else None
        return ids.flatten(-2), w.flatten(-2).float(), gate

    def final_residual(self, x_mid: torch.Tensor) -> torch.Tensor:
        """The part of the last block's output (R, C) at residuals ``x_mid`` (R, C) that
        the last memory layer's value rows do not change: here ``x_mid`` itself (a
        retrofitted model adds its block's MLP). An editor computes it once."""
        return x_mid

    def final_readout(
        self, x_mid: torch.Tensor, read: torch.Tensor, gate: torch.Tensor | None, resid: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Final normed hidden states (R, C) from the residuals ``x_mid`` (R, C) and the
        last memory layer's weighted value read ``read`` (R, d_v) (its
        :meth:`final_select` gate applied here); :attr:`head` makes them logits.
        ``resid``: :meth:`final_residual` of ``x_mid``, if already computed."""
        mem = self.blocks[-1].ffn
        assert isinstance(mem, ProductKeyMemory)
        y = read if gate is None else read * gate
        if mem.out is not None:
            y = mem.out(y)
        return self.norm((self.final_residual(x_mid) if resid is None else resid) + y)

    def logits_from_final_ffn(
        self, x_mid: torch.Tensor, patches: dict[str, RowPatch] | None = None
    ) -> torch.Tensor:
        """(..., C) residual after the last attention -> (..., V) logits (position-wise)."""
        last = self.blocks[-1]
        h = last.norm2(x_mid)
        if isinstance(last.ffn, ProductKeyMemory):
            patch = patches.get(last.ffn.pool.name) if patches else None
            y = last.ffn(h.unsqueeze(0), patch=patch).squeeze(0)
        else:
            y = last.ffn(h)
        return self.head(self.norm(x_mid + y))


def build_model(cfg: ModelConfig, seed: int | None = None) -> MemoryLM:
    """Build a :class:`MemoryLM`, deterministically when ``seed`` is given."""
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return MemoryLM(cfg)
    return MemoryLM(cfg)
