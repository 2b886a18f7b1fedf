"""Loading the tokenizer and the model, choosing the attention backend, applying Liger kernels."""

from __future__ import annotations

import contextlib
import importlib.util
import logging

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from open_instruct import attention  # registers packed_sdpa with transformers
from open_instruct.chat_templates import get_chat_template
from open_instruct.hub import error_reason

logger = logging.getLogger(__name__)


class ModelSetupError(ValueError):
    """The model or tokenizer cannot be used as asked; the message says what to change."""


def load_tokenizer(args):
    """The tokenizer with the chat template the run will train with; fails early if there is none."""
    name = args.tokenizer_name_or_path or args.model_name_or_path
    revision = args.tokenizer_revision if args.tokenizer_name_or_path else args.model_revision
    flag = "--tokenizer_name_or_path" if args.tokenizer_name_or_path else "--model_name_or_path"
    with loading(flag, name, "the tokenizer"):
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


@contextlib.contextmanager
def loading(flag: str, name: str, what: str):
    """transformers reports a missing file or an unreachable hub as OSError (after the start-up check, e.g. weights
    missing from the cache, or the network gone since); make it one line naming the flag."""
    try:
        yield
    except OSError as exc:
        raise ModelSetupError(f"{flag} {name}: cannot load {what} ({error_reason(exc)}).") from None


def pad_token_id(tokenizer) -> int:
    # Padding positions are never attended to nor trained, so eos serves where a tokenizer has no pad token.
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def attention_implementation(requested: str = "auto") -> str:
    """The attention kernel: the requested one, or for auto the fastest available (FA3, then FA2 on CUDA, else
    packed_sdpa: per-example causal SDPA, open_instruct/attention.py).

    Packed examples stay apart because example boundaries come from position_ids that restart at 0 (varlen kernels
    for flash-attention and packed_sdpa; a block-diagonal causal mask that transformers builds for sdpa, eager and
    flex); `packed_examples_stay_apart` checks it on the real model at start-up.
    """
    cuda = torch.cuda.is_available()
    installed = {"flash_attention_3": importlib.util.find_spec("flash_attn_interface") is not None,
                 "flash_attention_2": importlib.util.find_spec("flash_attn") is not None}
    if requested == "auto":
        return next((name for name, ok in installed.items() if ok and cuda), attention.NAME)
    if requested in installed and not (cuda and installed[requested]):
        raise ModelSetupError(f"--attn_implementation {requested} needs CUDA and its package "
                              f"({'flash-attn 3' if requested.endswith('3') else 'flash-attn'}); use sdpa here.")
    return requested


def packed_examples_stay_apart(model, device, vocab_size: int) -> bool:
    """Forward two short examples packed in one row and each alone: equal logits mean no cross-example attention.

    Every process must call it (under ZeRO-3 the forward gathers weights collectively).
    """
    from open_instruct.batching import collate_packed

    generator = torch.Generator().manual_seed(0)
    examples = [torch.randint(1, vocab_size, (n,), generator=generator).numpy() for n in (7, 5)]
    packed = collate_packed(examples, examples)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        together = model(input_ids=packed["input_ids"].to(device), position_ids=packed["position_ids"].to(device),
                         use_cache=False).logits[0].float()
        alone = [model(input_ids=torch.as_tensor(x, dtype=torch.long)[None].to(device), use_cache=False).logits[0].float()
                 for x in examples]
    model.train(was_training)
    separate = torch.cat(alone)
    tolerance = 1e-3 if next(model.parameters()).dtype == torch.float32 else 3e-2  # bf16 kernels differ by noise
    return bool((together - separate).abs().max() <= tolerance * max(1.0, separate.abs().max().item()))


def load_model(args, dtype: torch.dtype, attn_implementation: str, quantization=None):
    """The base model, with Liger's kernels and gradient checkpointing as asked; `quantization` (QLoRA's 4-bit config)
    loads the weights onto this process's GPU. LoRA adapters come on top: open_instruct/lora.load_with_adapters."""
    placement = {"quantization_config": quantization, "device_map": {"": torch.cuda.current_device()}} if quantization else {}
    with loading("--model_name_or_path", args.model_name_or_path, "the model"):
        model = AutoModelForCausalLM.from_pretrained(
            args.model_name_or_path, revision=args.model_revision, dtype=dtype, attn_implementation=attn_implementation,
            **placement,
        )
    if args.use_liger_kernel:
        apply_liger_kernel(model)
    if args.gradient_checkpointing:
        # Non-reentrant: gradients reach the adapters of a frozen LoRA base without inputs that require grad.
        enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.2x; older: the old name
        if enable:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def apply_liger_kernel(model) -> bool:
    """Patch the model with Liger's fused RMSNorm, RoPE and SwiGLU on CUDA; elsewhere keep PyTorch's ops.

    The loss side of --use_liger_kernel is ChunkedLossModel on every device: Liger's fused linear cross-entropy reads
    lm_head.weight outside the module's forward, which under ZeRO-3 is an empty shard; our chunked loss calls the
    module, so ZeRO-3 gathers the weight.
    """
    if not torch.cuda.is_available():
        logger.warning("--use_liger_kernel: Liger needs CUDA; using PyTorch's RMSNorm, RoPE and SwiGLU (the same math) "
                       "and the chunked linear cross-entropy.")
        return False
    if importlib.util.find_spec("liger_kernel") is None:
        raise ModelSetupError("--use_liger_kernel needs the liger-kernel package: pip install liger-kernel")
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)
    return True


class ChunkedLossModel(torch.nn.Module):
    """Wraps a causal LM so the training forward returns the token-loss sum from hidden states, chunk by chunk,
    never holding the full [tokens x vocab] logits (open_instruct.loss.chunked_linear_cross_entropy_sum).

    It is what accelerate/DeepSpeed prepare, so the loss runs inside the engine's forward: ZeRO-3 gathers the output
    layer through its module hooks each time a chunk calls it. Without target_ids it behaves like the wrapped model.
    """

    def __init__(self, lm, chunk_size: int = 1024):
        super().__init__()
        self.lm, self.chunk_size = lm, chunk_size

    @property
    def config(self):
        return self.lm.config

    def forward(self, target_ids=None, num_chunks=None, **inputs):
        """num_chunks: the same on every process under ZeRO-3 (each output-layer call is a collective gather)."""
        from open_instruct.loss import chunked_linear_cross_entropy_sum

        if target_ids is None:
            return self.lm(**inputs)
        hidden = self.lm.get_decoder()(**inputs).last_hidden_state
        return chunked_linear_cross_entropy_sum(hidden, self.lm.get_output_embeddings(), target_ids, self.chunk_size,
                                                num_chunks=num_chunks)


