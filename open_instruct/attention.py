"""`packed_sdpa`: variable-length causal attention from PyTorch's SDPA, for padding-free rows without flash-attention.

flash-attention's varlen kernels (CUDA only) attend within each packed example, costing sum(L_i^2). SDPA with the
block-diagonal mask that transformers builds for packed rows still computes the whole (sum L_i)^2 score matrix and
masks most of it away, which makes packing slower than padding on a CPU. This implementation finds the examples
from the position_ids that restart at 0, runs causal SDPA on each one (no mask tensor at all) and concatenates the
results: the same values as flash-attention varlen, on any device. Short rows (up to SHORT_ROW tokens), where one
call beats a call per example, take a single SDPA call with a block-diagonal causal mask built from position_ids.
On CUDA in bf16/fp16, where PyTorch ships flash-attention's varlen kernel (`torch.nn.attention.varlen`, PyTorch >=
2.10), every row takes one varlen call with the examples' cumulative lengths instead: no flash-attn package needed.
Anything else (padded batches with an attention mask, decoding with a KV cache) goes to transformers' own SDPA path
unchanged. Under --torch_compile (open_instruct/compile.py) the short-row path traces into the decoder layer's graph;
the per-example loop and the varlen call read example boundaries on the host and are excluded (torch.compiler.disable).

Registered with transformers' AttentionInterface on import, so `attn_implementation="packed_sdpa"` works in
`from_pretrained` like a built-in kernel. The saved config records `sdpa`, so a trained model loads anywhere.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "packed_sdpa"
# Up to this many tokens a row takes one SDPA call with a block-diagonal causal mask (cheap at this size, and one call
# instead of one per example); longer rows run SDPA per example, where the (sum L_i)^2 score matrix would dominate.
SHORT_ROW = 1024

try:  # PyTorch >= 2.10: flash-attention's varlen forward and backward, CUDA only
    from torch.nn.attention.varlen import varlen_attn
except ImportError:
    varlen_attn = None


def example_starts(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: where an example starts (the position does not continue the previous one)."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return starts


def example_bounds(position_ids: torch.Tensor) -> list[list[int]]:
    """Per row, the start of every example and the row's end."""
    length = position_ids.shape[1]
    return [row.nonzero().flatten().tolist() + [length] for row in example_starts(position_ids)]


def block_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, T] bool: a token attends to earlier tokens of its own example (always itself: no empty row)."""
    example = example_starts(position_ids).cumsum(-1)
    length = position_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    return ((example[:, :, None] == example[:, None, :]) & causal)[:, None]


def packed_sdpa_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                        position_ids=None, **kwargs):
    """query [B, H, T, D], key/value [B, H_kv, T, D] -> ([B, T, H, D], None), attending within each example."""
    if attention_mask is not None or position_ids is None or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    dtype = varlen_dtype(query)
    if dtype is not None and dropout == 0.0:
        return varlen_forward(*(x.to(dtype) for x in (query, key, value)), position_ids, scaling), None
    position_ids = position_ids.expand(query.shape[0], -1)
    gqa = bool(key.shape[1] != query.shape[1])  # a plain bool also where torch.compile makes the head counts symbols
    if query.shape[2] <= SHORT_ROW:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=block_causal_mask(position_ids),
                                             dropout_p=dropout, scale=scaling, enable_gqa=gqa)
        return out.transpose(1, 2).contiguous(), None
    return per_example_sdpa(query, key, value, position_ids, dropout, scaling, gqa), None


@torch.compiler.disable  # example boundaries are read on the host: under --torch_compile, a graph break (compile.py)
def per_example_sdpa(query, key, value, position_ids, dropout: float, scaling, gqa: bool) -> torch.Tensor:
    """Causal SDPA on each example of each row: [B, H, T, D] inputs -> [B, T, H, D]."""
    rows = []
    for row, bounds in enumerate(example_bounds(position_ids)):
        pieces = [
            F.scaled_dot_product_attention(
                query[row : row + 1, :, start:end], key[row : row + 1, :, start:end], value[row : row + 1, :, start:end],
                is_causal=True, dropout_p=dropout, scale=scaling, enable_gqa=gqa,
            )
            for start, end in zip(bounds, bounds[1:])
        ]
        rows.append(torch.cat(pieces, dim=2))
    return torch.cat(rows, dim=0).transpose(1, 2).contiguous()


def varlen_dtype(query: torch.Tensor) -> torch.dtype | None:
    """The half-precision dtype to run the varlen kernel in, or None where it cannot run.

    Under autocast that is autocast's dtype, whatever the query's: with fp32 weights (accelerate's bf16 mixed
    precision) Llama's RoPE multiplies the bf16 projections by fp32 cos/sin and hands us fp32 queries and keys.
    Testing the query's own dtype sent every such forward to the per-example fp32 path: measured about 13x slower on
    an H100 (docs/benchmarks.md). SDPA itself casts to autocast's dtype, so this computes what SDPA would.
    """
    if varlen_attn is None or not query.is_cuda:
        return None
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else query.dtype
    return dtype if dtype in (torch.bfloat16, torch.float16) else None


_cu_seq_lens_cache: list = [None, None, 0]  # (position_ids, cu_seq_lens, max_length): every layer gets the same tensor


def cu_seq_lens(position_ids: torch.Tensor, rows: int) -> tuple[torch.Tensor, int]:
    """Cumulative example lengths over all `rows` rows flattened ([0, l1, l1 + l2, ...], int32) and the longest
    example. A new row always starts a new example."""
    if _cu_seq_lens_cache[0] is position_ids:
        return _cu_seq_lens_cache[1], _cu_seq_lens_cache[2]
    flat = example_starts(position_ids.expand(rows, -1)).reshape(-1)  # every row's first token starts an example
    bounds = torch.cat([flat.nonzero().flatten(), torch.tensor([flat.numel()], device=flat.device)])
    cu = bounds.to(torch.int32)
    longest = int((bounds[1:] - bounds[:-1]).max())  # one host sync per forward, not per layer (cached)
    _cu_seq_lens_cache[:] = [position_ids, cu, longest]
    return cu, longest


@torch.compiler.disable  # reads the longest example on the host: under --torch_compile, a graph break (compile.py)
def varlen_forward(query, key, value, position_ids, scaling) -> torch.Tensor:
    """[B, H, T, D] inputs -> [B, T, H, D], causal within each example, one flash-attention varlen call."""
    batch, heads, length, dim = query.shape
    if key.shape[1] != heads and "enable_gqa" not in _VARLEN_PARAMS:
        key = key.repeat_interleave(heads // key.shape[1], dim=1)
        value = value.repeat_interleave(heads // value.shape[1], dim=1)
    q, k, v = (x.transpose(1, 2).reshape(batch * length, x.shape[1], dim) for x in (query, key, value))
    cu, longest = cu_seq_lens(position_ids, batch)
    options = {"scale": scaling}
    if "enable_gqa" in _VARLEN_PARAMS:
        options["enable_gqa"] = k.shape[1] != heads
    if "is_causal" in _VARLEN_PARAMS:
        options["is_causal"] = True
    else:
        options["window_size"] = (-1, 0)  # newer API: causal is a window with nothing to the right
    out = varlen_attn(q, k, v, cu, cu, longest, longest, **options)
    return out.reshape(batch, length, heads, dim)


_VARLEN_PARAMS = frozenset(inspect.signature(varlen_attn).parameters) if varlen_attn else frozenset()


def packed_sdpa_mask(*args, **kwargs):
    """No [T x T] mask for rows without padding (the attention finds the examples itself); SDPA's mask otherwise."""
    q_length = kwargs.get("q_length", args[1] if len(args) > 1 else None)
    kv_length = kwargs.get("kv_length", args[2] if len(args) > 2 else None)
    if kwargs.get("attention_mask") is None and q_length == kv_length:
        return None
    return sdpa_mask(*args, **kwargs)


AttentionInterface.register(NAME, packed_sdpa_forward)
AttentionMaskInterface.register(NAME, packed_sdpa_mask)
