"""Sequence parallelism (DeepSpeed Ulysses): every packed row is split across the N ranks of a sequence-parallel group,
and attention gathers the whole sequence for a share of the heads through DeepSpeed's all-to-all.

    --sequence_parallel_size N     (open-instruct's flag name; 1 = off)

How a row is trained exactly:
- Targets are shifted once, per example, before anything is split (batching.targets_for). A rank's piece of the row
  then carries the targets of its own positions: the last token of one rank's piece predicts the first token of the
  next rank's piece of the same example, and an example that straddles the cut trains every token exactly once.
- The row is padded to a multiple of N with pad tokens that train nothing and count nowhere; their position_ids
  restart at 0, so they form an example of their own and no real token attends to them.
- Attention: DeepSpeed's UlyssesSPAttentionHF (set up by accelerate's ParallelismConfig, sp_backend "deepspeed")
  wraps the model's attention function. It all-gathers the position_ids, exchanges sequence pieces for head groups
  (all-to-all), runs the wrapped kernel on the whole row for H/N heads and exchanges back. The wrapped kernel must find
  the packed examples from position_ids (packed_sdpa, flash-attention varlen): DeepSpeed drops the attention mask.
- The loss: each rank sums the token losses of its piece; the trained-token count of the global batch is the sum of
  every rank's pieces, so each token is counted once (not N times). Gradients are summed over all ranks.

Evaluation runs whole rows on every rank (accelerate turns Ulysses off in eval mode).
"""

from __future__ import annotations

import os

import torch

from open_instruct.batching import IGNORE_INDEX
from open_instruct.parallel_dims import ParallelDims, ParallelLayoutError

# Attention kernels that separate packed examples by their position_ids, the only boundary Ulysses passes on.
VARLEN_KERNELS = ("packed_sdpa", "flash_attention_2", "flash_attention_3")


def shard_row(batch: dict, parts: int, index: int, pad_token_id: int) -> dict:
    """Piece `index` of `parts` of a packed micro-batch (one row from batching.collate): the row padded to a multiple
    of `parts`, then cut into equal consecutive pieces. The counts are the piece's own."""
    if batch["input_ids"].shape[0] != 1:
        raise ValueError("sequence parallelism shards packed rows: one row per micro-batch (padding-free)")
    length = batch["input_ids"].shape[1]
    extra = -length % parts
    size = (length + extra) // parts
    start, end = index * size, (index + 1) * size

    def padded(tensor: torch.Tensor, filler: torch.Tensor) -> torch.Tensor:
        return torch.cat([tensor, filler.to(tensor.dtype)[None]], dim=1)[:, start:end]

    targets = padded(batch["target_ids"], torch.full((extra,), IGNORE_INDEX))
    real_tokens = batch["num_tokens"]  # a packed row holds its real tokens first (an empty one holds one pad token)
    return {
        "input_ids": padded(batch["input_ids"], torch.full((extra,), pad_token_id)),
        "position_ids": padded(batch["position_ids"], torch.arange(extra)),  # the pads: an example of their own
        "target_ids": targets,
        "num_tokens": max(0, min(end, real_tokens) - start),
        "num_tokens_with_padding": size,
        "num_trained_tokens": int((targets != IGNORE_INDEX).sum()),
    }


def launched_dims(args) -> ParallelDims:
    """The layout the launcher started (from its environment), checked with the model's config before the
    Accelerator, the data or the model exist."""
    dims = ParallelDims(int(os.environ.get("WORLD_SIZE", "1")), args.sequence_parallel_size,
                        int(os.environ.get("RANK", "0")))
    if dims.sp_enabled:
        from transformers import AutoConfig

        from open_instruct.model_utils import attention_implementation, loading

        with loading("--model_name_or_path", args.model_name_or_path, "the model's config"):
            config = AutoConfig.from_pretrained(args.model_name_or_path, revision=args.model_revision)
        check_sequence_parallel(dims, config, attention_implementation(args.attn_implementation),
                                launched_zero_stage(), args.padding_free)
    return dims


def launched_zero_stage() -> int | None:
    """The ZeRO stage accelerate launch hands the workers (its DeepSpeed config file, else --zero_stage); None
    without DeepSpeed."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return None
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if path != "none":
        from open_instruct.launch import read_deepspeed_config

        return int(read_deepspeed_config(path).get("zero_optimization", {}).get("stage", 0))
    return int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))  # accelerate's own default


def check_sequence_parallel(dims: ParallelDims, model_config, attn_implementation: str, zero_stage: int | None,
                            padding_free: bool) -> None:
    """Start-up errors, before the model loads: each says which flag to change. `zero_stage`: None without
    DeepSpeed."""
    if not dims.sp_enabled:
        return
    n = dims.sequence_parallel
    if zero_stage is None:
        raise ParallelLayoutError(f"--sequence_parallel_size {n} runs through DeepSpeed's Ulysses: launch with "
                                  "--use_deepspeed and a ZeRO-3 config (configs/ds_configs/stage3_*).")
    if zero_stage != 3:
        # Measured: under ZeRO-2 the gradients came out twice too large with N=2 (the logged gradient norm doubled;
        # Adam's scale invariance hid it in the loss), so only ZeRO-3, whose sums are exact, is allowed.
        raise ParallelLayoutError(f"--sequence_parallel_size {n} needs DeepSpeed ZeRO-3; this launch uses ZeRO stage "
                                  f"{zero_stage}, which scales sequence-parallel gradients wrongly. Use "
                                  "configs/ds_configs/stage3_no_offloading_accelerate.conf.")
    if not padding_free:
        raise ParallelLayoutError(f"--sequence_parallel_size {n} splits packed rows; padded batches are not supported: "
                                  "drop --no_padding_free.")
    if attn_implementation not in VARLEN_KERNELS:
        raise ParallelLayoutError(
            f"--attn_implementation {attn_implementation} cannot run under --sequence_parallel_size {n}: Ulysses drops "
            f"the attention mask, so packed examples would attend to each other. Use one of {', '.join(VARLEN_KERNELS)}.")
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    heads, kv_heads = text.num_attention_heads, getattr(text, "num_key_value_heads", text.num_attention_heads)
    if heads % n:
        raise ParallelLayoutError(f"--sequence_parallel_size {n} must divide the model's {heads} attention heads.")
    if kv_heads % n and n % kv_heads:
        raise ParallelLayoutError(f"--sequence_parallel_size {n} and the model's {kv_heads} key/value heads: one must "
                                  "divide the other (DeepSpeed replicates key/value heads only by whole factors).")


def parallelism_config(dims: ParallelDims, attn_implementation: str):
    """accelerate's ParallelismConfig for Ulysses (None without sequence parallelism)."""
    if not dims.sp_enabled:
        return None
    from accelerate.parallelism_config import ParallelismConfig
    from accelerate.utils import DeepSpeedSequenceParallelConfig

    handler = DeepSpeedSequenceParallelConfig(sp_seq_length_is_variable=True, sp_attn_implementation="sdpa")
    # accelerate's config accepts only sdpa and flash-attention names; DeepSpeed wraps any registered attention
    # function (packed_sdpa is registered with transformers' AttentionInterface). sdpa itself would be wrong here:
    # without a mask it attends across packed examples.
    handler.sp_attn_implementation = attn_implementation
    # accelerate sizes DeepSpeed's train_batch_size from the data-parallel size it is given (ZeRO shards over it)
    return ParallelismConfig(sp_backend="deepspeed", sp_size=dims.sequence_parallel, sp_handler=handler,
                             dp_shard_size=dims.data_parallel)
