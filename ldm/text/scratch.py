"""A small CLIP-style text transformer trained from scratch together with the diffusion model.

Token + learned positional embedding, pre-LayerNorm transformer blocks (causal by default, like CLIP), a final
LayerNorm; the pooled vector is the feature of the end-of-text token. Meant for toy data (the 32-px shapes set on a
couple of CPU cores), where a short ``context_length`` such as 24 keeps cross-attention cheap.

Token embeddings start at N(0, 1) (``token_embedding_std``), not CLIP's N(0, 0.02): trained jointly with a UNet for a
few hundred steps, the small init lets the blocks' residual outputs swamp each word's own embedding, and the UNet cannot
tell the position words apart (docs/text.md).
"""

from __future__ import annotations

import torch
from torch import nn

from ldm.nn.attention import attention
from ldm.text.base import TextEncoder
from ldm.text.tokenizer import OPEN_CLIP_PAD_ID, CLIPTokenizer


class _SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, causal: bool) -> None:
        super().__init__()
        self.heads = heads
        self.causal = causal
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if self.causal:
            # Padding follows the end token, so under a causal mask no real token ever sees it.
            mask = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        else:
            mask = key_mask[:, None, None, :]
        return self.out(attention(q, k, v, mask, backend="sdpa").transpose(1, 2).reshape(b, n, d))


class _Block(nn.Module):
    def __init__(self, width: int, heads: int, causal: bool, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = _SelfAttention(width, heads, causal)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), key_mask)
        return x + self.mlp(self.norm2(x))


class ScratchTextEncoder(TextEncoder):
    """Trainable CLIP-style text tower; uses the CLIP BPE vocabulary (pad id 0) so captions need no new tokenizer.

    ``train_token_embedding=False`` keeps the token embeddings at their random initialisation while the rest of the
    tower trains. The table (vocabulary x width) is most of the encoder's parameters, and training it costs a dense
    gradient, its share of the gradient norm and clipping, and an AdamW update of every row each step, though a small
    caption set uses a few dozen rows. Random unit-scale vectors are nearly orthogonal, so the blocks can still tell
    the words apart.
    """

    def __init__(
        self,
        vocab_size: int = 49408,
        width: int = 256,
        layers: int = 4,
        heads: int = 4,
        context_length: int = 77,
        causal: bool = True,
        frozen: bool = False,
        token_embedding_std: float = 1.0,
        train_token_embedding: bool = True,
    ) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width ({width}) must be divisible by heads ({heads})")
        self.tokenizer = CLIPTokenizer(context_length=context_length, pad_token_id=OPEN_CLIP_PAD_ID)
        if vocab_size < self.tokenizer.vocab_size:
            raise ValueError(
                f"vocab_size {vocab_size} is smaller than the CLIP BPE vocabulary ({self.tokenizer.vocab_size})"
            )
        self._width = width
        self.causal = causal
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.blocks = nn.ModuleList(_Block(width, heads, causal) for _ in range(layers))
        self.final_norm = nn.LayerNorm(width)
        self._init_weights(layers, token_embedding_std)
        self._train_token_embedding = train_token_embedding
        self.frozen = frozen

    def _init_weights(self, layers: int, token_embedding_std: float) -> None:
        nn.init.normal_(self.token_embedding.weight, std=token_embedding_std)
        nn.init.normal_(self.positional_embedding, std=0.01)
        for block in self.blocks:
            for linear in (block.attn.qkv, block.mlp[0]):
                nn.init.normal_(linear.weight, std=0.02)
                nn.init.zeros_(linear.bias)
            # Residual branches start small so the stack starts near the identity (GPT-2's depth scaling).
            for linear in (block.attn.out, block.mlp[2]):
                nn.init.normal_(linear.weight, std=0.02 / (2 * layers) ** 0.5)
                nn.init.zeros_(linear.bias)

    def _set_trainable(self, trainable: bool) -> None:
        super()._set_trainable(trainable)
        if not self._train_token_embedding:
            self.token_embedding.weight.requires_grad_(False)

    @property
    def train_token_embedding(self) -> bool:
        """Whether the token table trains with the rest (fixed at construction)."""
        return self._train_token_embedding

    @property
    def width(self) -> int:
        return self._width

    def encode_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # in the positional table's dtype: under FSDP's mixed precision a fixed token table, left out of the
        # sharding, stays float32 while the trained parameters compute in bf16
        pos = self.positional_embedding[: input_ids.shape[1]]
        x = self.token_embedding(input_ids).to(pos.dtype) + pos
        for block in self.blocks:
            x = block(x, attention_mask)
        hidden = self.final_norm(x)
        eot_index = attention_mask.long().sum(dim=1) - 1  # the mask covers start..end, so its last True is the end
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), eot_index]
        return hidden, pooled
