"""torchtitan's Llama attention, taking an explicit attention mask in either form the device runs.

torchtitan 0.2.2 fixes the kind of mask at construction (`attn_type`): its SDPA path is causal
only (it asserts that no mask is given), its FlexAttention path needs a BlockMask, which has no
backward on CPU. Document masking (train/document_mask.py) must train on both: FlexAttention on
CUDA, `scaled_dot_product_attention` with a boolean mask on CPU. This subclass keeps torchtitan's
projections, RoPE and parameter names (so its TP plan, init and checkpoints apply unchanged) and
picks the kernel from the mask it is given:
    None          -> torchtitan's own forward (causal SDPA), exactly as before;
    BlockMask     -> torchtitan's compiled FlexAttention wrapper;
    bool tensor   -> SDPA with that mask ([B, 1, S, S], heads share it; under TP each rank holds
                     some heads of every row, so the mask needs no sharding).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask
from torchtitan.models.attention import FlexAttentionWrapper
from torchtitan.models.llama3.model.model import Attention, apply_rotary_emb


class MaskedAttention(Attention):
    def __init__(self, model_args):
        super().__init__(model_args)
        self.flex_attention = FlexAttentionWrapper()  # no parameters: state dicts are unchanged

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, attention_masks=None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        if attention_masks is None:
            return super().forward(x, freqs_cis, None, positions)
        bs, seqlen, _ = x.shape
        # As torchtitan's forward: -1 heads, since TP may have sharded them.
        xq = self.wq(x).view(bs, seqlen, -1, self.head_dim)
        xk = self.wk(x).view(bs, seqlen, -1, self.head_dim)
        xv = self.wv(x).view(bs, seqlen, -1, self.head_dim)
        xq, xk = apply_rotary_emb(xq, xk, freqs_cis=freqs_cis, positions=positions)
        q, k, v = xq.transpose(1, 2), xk.transpose(1, 2), xv.transpose(1, 2)  # [B, heads, S, hd]
        if isinstance(attention_masks, BlockMask):
            out = self.flex_attention(q, k, v, block_mask=attention_masks, enable_gqa=self.enable_gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_masks, enable_gqa=self.enable_gqa)
        return self.wo(out.transpose(1, 2).contiguous().view(bs, seqlen, -1))
