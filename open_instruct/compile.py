"""--torch_compile: regional compilation of the decoder layers with torch.compile (inductor).

What is compiled: the forward of every decoder layer, i.e. every entry of the model's ModuleList of repeated blocks
(the class its `_no_split_modules` names: LlamaDecoderLayer, Qwen2DecoderLayer, ...), found through ChunkedLossModel,
peft and DeepSpeed wrappers. The forward is replaced on each layer instance, so module names, parameter names and
state-dict keys stay as they were: checkpoints, DeepSpeed ZeRO-3's hooks (registered on the modules, run around the
forward) and LoRA adapters see the same model. The layers are instances of one class and torch.compile passes their
parameters to the graph as inputs, so all layers share one compiled graph: one compilation, not one per layer.

Row lengths: packed rows change length every micro-step. The layers are compiled with dynamic=True: the sequence
length is a symbol in the graph from the first trace, so a new row length reuses the compiled graph instead of
recompiling. What can still add a graph is bounded and independent of how many lengths the data has: a row of one
token (PyTorch specializes sizes 0 and 1; the filler row of a process that has fewer rows than micro-steps is one pad
token), rows longer than attention.SHORT_ROW (packed_sdpa's per-example branch), and for padded batches
(--no_padding_free) a batch of one row against several. tests/test_compile.py counts the graphs over many lengths. No
row is padded for the compiler: rows keep their tokens, so the losses, the token counts and the throughput figures are
those of the eager run.

Attention: packed_sdpa's short-row path (one SDPA call with a block-diagonal mask built from position_ids), and
transformers' sdpa and eager, trace into the layer's graph. packed_sdpa's long-row loop over examples and its CUDA
varlen path read example boundaries on the host; they are excluded with torch.compiler.disable in attention.py, so
such a layer runs as two graphs with the attention call between them (one graph break per layer, no recompiles). Every
other registered kernel (flash_attention_2/3, flex_attention, DeepSpeed Ulysses' wrapper under sequence parallelism)
is excluded the same way here: flash-attention's varlen wrapper computes cu_seqlens and the longest example on the host.

Under ZeRO-3 each decoder layer is one unit of DeepSpeed's parameter gathering (gather_whole_layers_under_zero3), so
DeepSpeed's hooks run around the compiled forward instead of inside it.

Only training forwards are compiled (layer in train mode, gradients on); evaluation's loss forwards and generation
(KV cache, one-token steps) run the eager layers and never compile. Gradient checkpointing is traced as a checkpointed
region of the graph (tested). --use_liger_kernel's chunked loss runs outside the layers (tested); Liger's CUDA kernels
inside them are Triton autograd functions, not tested under compile here.
"""

from __future__ import annotations

import logging

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from open_instruct import attention
from open_instruct.model_utils import ModelSetupError

logger = logging.getLogger(__name__)
# Attention functions that trace into the layer's graph without host reads; every other registered one is excluded.
TRACEABLE_ATTENTION = (attention.packed_sdpa_forward, sdpa_attention_forward)


def check_compile_support(device: torch.device | str) -> None:
    """Build one small kernel with inductor on `device`, bypassing its caches: a machine without a C++ compiler (CPU)
    or triton (CUDA) fails here with one line, before the data and the model load, not at the first training step."""
    import torch._inductor.config as inductor_config

    def probe(x):
        return torch.nn.functional.silu(x) * 2 + 1

    try:
        with inductor_config.patch(force_disable_caches=True):
            torch.compile(probe, backend="inductor", dynamic=False)(torch.ones(8, device=device))
    except Exception as error:  # inductor reports a missing toolchain as several exception types
        reason = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
        needs = "triton" if torch.device(device).type == "cuda" else "a C++ compiler (g++; or set CXX)"
        raise ModelSetupError(f"--torch_compile: torch.compile cannot build kernels on this machine ({reason[:200]}); "
                              f"it needs {needs}. Install it or drop --torch_compile.") from None


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a Hugging Face model, wrapped or not: entries of a ModuleList whose class one of the
    model's `_no_split_modules` names (transformers' unit of sharding and of device placement)."""
    block_classes = {name for module in model.modules() for name in (getattr(module, "_no_split_modules", None) or [])}
    return [child for module in model.modules() if isinstance(module, torch.nn.ModuleList)
            for child in module if type(child).__name__ in block_classes]


def _layers_or_error(model: torch.nn.Module) -> list[torch.nn.Module]:
    layers = decoder_layers(model)
    if not layers:
        raise ModelSetupError(f"--torch_compile: found no decoder layers in {type(model).__name__} (a ModuleList of "
                              "the blocks its _no_split_modules names); this model cannot be compiled by layer.")
    return layers


def gather_whole_layers_under_zero3(model: torch.nn.Module) -> None:
    """Make each decoder layer one unit of ZeRO-3's parameter gathering (DeepSpeed's z3 leaf modules). Call it before
    accelerator.prepare, where DeepSpeed registers its hooks.

    ZeRO-3 otherwise hooks every Linear and norm inside the layer; torch.compile then traces DeepSpeed's Python hooks,
    breaking the graph at each one and recompiling them module by module (measured on the 4-layer tiny model, 2
    processes: 46 recompiles, 14 graph breaks, 2m10s against 31 s eager). As leaves, the layers carry the only hooks,
    which run around the compiled forward: the graph is the single-process one. The cost: a layer's weights are
    gathered together, as FSDP does per layer, rather than one projection at a time.
    """
    from deepspeed.utils import set_z3_leaf_modules

    set_z3_leaf_modules(model, list({type(layer): None for layer in _layers_or_error(model)}))


def compile_decoder_layers(model: torch.nn.Module, backend: str = "inductor") -> int:
    """Compile each decoder layer's training forward in place; returns how many layers. Idempotent. Call it after
    accelerator.prepare: sequence parallelism replaces the attention function there, and that one is excluded."""
    layers = _layers_or_error(model)
    for layer in layers:
        if getattr(layer.forward, "compiled_for_training", False):
            continue
        # fallback_random: dropout (e.g. --lora_dropout) draws eager's random numbers, so the masks are the eager run's
        options = {"fallback_random": True} if backend == "inductor" else None
        compiled = torch.compile(layer.forward, backend=backend, dynamic=True, options=options)
        layer.forward = _training_forward(layer, layer.forward, compiled)
    for implementation in {getattr(getattr(module, "config", None), "_attn_implementation", None)
                           for module in model.modules()}:
        exclude_attention(implementation)
    return len(layers)


def _training_forward(layer: torch.nn.Module, eager, compiled):
    def forward(*args, **kwargs):
        run = compiled if layer.training and torch.is_grad_enabled() else eager
        return run(*args, **kwargs)

    forward.compiled_for_training = True
    return forward


def exclude_attention(implementation: str | None) -> None:
    """Run the registered attention function `implementation` outside the compiled graphs (torch.compiler.disable),
    unless it is one that traces cleanly (TRACEABLE_ATTENTION) or the layers' own eager attention."""
    if implementation is None or implementation == "eager" or implementation not in ALL_ATTENTION_FUNCTIONS:
        return
    function = ALL_ATTENTION_FUNCTIONS[implementation]
    if function in TRACEABLE_ATTENTION or getattr(function, "excluded_from_compile", False):
        return
    excluded = torch.compiler.disable(function)
    excluded.excluded_from_compile = True
    ALL_ATTENTION_FUNCTIONS[implementation] = excluded  # this process's registry, as DeepSpeed's Ulysses does
    logger.info("--torch_compile: attention %s runs outside the compiled layers (a graph break per layer).",
                implementation)
