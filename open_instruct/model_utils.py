"""Loading the tokenizer and the model, choosing the attention backend, applying Liger kernels."""

from __future__ import annotations

import importlib.util
import logging

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from open_instruct.chat_templates import get_chat_template

logger = logging.getLogger(__name__)


class ModelSetupError(ValueError):
    """The model or tokenizer cannot be used as asked; the message says what to change."""


def load_tokenizer(args):
    """The tokenizer with the chat template the run will train with; fails early if there is none."""
    name = args.tokenizer_name_or_path or args.model_name_or_path
    revision = args.tokenizer_revision if args.tokenizer_name_or_path else args.model_revision
    tokenizer = AutoTokenizer.from_pretrained(name, revision=revision)
    if args.chat_template_name:
        tokenizer.chat_template = get_chat_template(args.chat_template_name)
    elif not tokenizer.chat_template:
        raise ModelSetupError(
            f"The tokenizer of {name} has no chat template. Pass --chat_template_name (e.g. tulu) to choose one."
        )
    if tokenizer.eos_token_id is None:
        raise ModelSetupError(f"The tokenizer of {name} has no eos token; the end of an assistant turn cannot be trained.")
    return tokenizer


def pad_token_id(tokenizer) -> int:
    # Padding positions are never attended to nor trained, so eos serves where a tokenizer has no pad token.
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def attention_implementation() -> str:
    """flash_attention_2 on CUDA when installed, else PyTorch SDPA.

    Both keep packed examples apart: transformers derives per-example boundaries from position_ids that restart
    at 0 (varlen kernels for flash-attention, a block-diagonal causal mask for SDPA).
    """
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_model(args, dtype: torch.dtype, attn_implementation: str):
    model = AutoModelForCausalLM.from_pretrained(
        args.model_name_or_path, revision=args.model_revision, dtype=dtype, attn_implementation=attn_implementation
    )
    if args.use_liger_kernel:
        apply_liger_kernel(model)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def apply_liger_kernel(model) -> bool:
    """Patch the model with Liger's fused RMSNorm, RoPE and SwiGLU on CUDA; elsewhere keep PyTorch's ops.

    The loss is computed by open_instruct.loss from the logits, so Liger's own fused cross-entropy is not used.
    """
    if not torch.cuda.is_available():
        logger.warning("--use_liger_kernel: Liger needs CUDA; using the PyTorch implementations of the same ops.")
        return False
    if importlib.util.find_spec("liger_kernel") is None:
        raise ModelSetupError("--use_liger_kernel needs the liger-kernel package: pip install liger-kernel")
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)
    return True
