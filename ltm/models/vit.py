"""The teacher's tiny ViT over CNN tokens (Sec. 3.1-3.2), with each block's per-head attention exposed."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Multi-head self-attention that returns its attention maps A_i (Eq. 1)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5  # 1 / sqrt(c / h)
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, need_attention: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if need_attention:
            # Eq. 1, (B, heads, N, N), in fp32 whatever the module's dtype: Eq. 2-4 rank these maps, and near-uniform
            # attention in bf16 takes a few distinct values over the cells, so the top-k of Eq. 4 would mostly be
            # decided by ties (broken differently on CUDA than on the CPU). N is small: the fp32 scores cost little.
            attn = (q.float() @ k.float().transpose(-2, -1) * self.scale).softmax(dim=-1)
            out = attn.to(v.dtype) @ v
        else:  # the fused kernel never materialises A_i, which is cheaper when nobody reads it
            attn, out = None, F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d)), attn


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, need_attention: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        y, attn = self.attn(self.norm1(x), need_attention)
        x = x + y
        x = x + self.mlp(self.norm2(x))
        return x, attn


class TokenViT(nn.Module):
    """ViT whose patch embedding is the CNN: tokens are the h*w feature vectors, projected C -> D."""

    def __init__(self, in_channels: int, grid: tuple[int, int], dim: int, heads: int, depth: int,
                 mlp_ratio: float):
        super().__init__()
        self.grid = grid
        self.proj = nn.Linear(in_channels, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid[0] * grid[1], dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, features: torch.Tensor, all_attentions: bool = False
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """features (B, C, h, w) -> (CLS output (B, D), attention maps (B, heads, 1+hw, 1+hw)).

        The maps are every block's with `all_attentions`, else only the last block's (all that Eq. 2-4 use).
        """
        tokens = self.proj(features.flatten(2).transpose(1, 2))
        x = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1) + self.pos_embed
        attentions = []
        for i, block in enumerate(self.blocks):
            x, attn = block(x, need_attention=all_attentions or i == len(self.blocks) - 1)
            if attn is not None:
                attentions.append(attn)
        return self.norm(x)[:, 0], attentions
