"""Per-GPU memory plan of a fine-tuning run, from the model's config alone: what a launcher prints before submitting
a job, and refuses to submit when the job clearly cannot fit.

    config, reason = load_model_config(args.model_name_or_path, args.model_revision)
    plan = plan_memory(args, config, count_parameters(config), world_size=64, ds_config=json.load(open(conf)))
    print(plan.format(80)); plan.fits(80)

Every figure is an estimate of the peak, in bytes per GPU. What the trainer holds (see finetune.model_dtype):

- DeepSpeed with bf16 (the GPU recipe): bf16 weights (2 B/param) and bf16 gradients (2 B/param); the optimizer holds
  fp32 master weights and AdamW's two fp32 moments (12 B/param) plus, during its step, an fp32 copy of the gradient
  (4 B/param), as DeepSpeed's own estimate_zero2_model_states_mem_needs counts: 16 B/param of optimizer states.
  ZeRO stage 1 partitions the optimizer states over the processes, 2 also the gradients, 3 also the weights;
  offload_optimizer / offload_param (device cpu or nvme) move them off the GPU.
- No DeepSpeed (DDP, or one process) with bf16 mixed precision: fp32 weights (4), fp32 gradients (4) and AdamW's two
  fp32 moments (8), all replicated; autocast keeps a bf16 copy of every weight it casts (2) for the forward and
  backward, and DDP (accelerate's default, gradient_as_bucket_view off) a flat copy of the gradients in its
  all-reduce buckets (4).

LoRA (--use_lora): the frozen base in the training dtype (2 B/param with bf16, whether DeepSpeed's or mixed
precision's, else 4), or for QLoRA every linear layer but the output layer in 4-bit NF4 with double-quantized
scales (0.5 + 0.0159 B/param) and the rest in bf16; gradients, optimizer states, autocast copies and DDP buckets
only for the trainable parameters (the adapters, r x (in + out) per adapted layer, and --lora_modules_to_save).
Activations are counted as for full fine-tuning (the adapters' own small inputs and outputs are not added).

Activations and the loss's logits are estimates for one micro-batch (see `activation_bytes_per_token` and
`logits_bytes`); attention is assumed to be a flash-style kernel (no sequence x sequence scores) except with
--attn_implementation eager. The plan covers dense decoder-only transformers (Llama, OLMo, Qwen style); for a
mixture-of-experts model the activation figure is not meaningful.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from open_instruct.args import FinetuneArgs, global_batch_examples, uses_lora
from open_instruct.flops import FlopsModel

GiB = 2**30
# Kept free on top of the plan: the CUDA context and NCCL's buffers (~1-2 GiB), the caching allocator's fragmentation
# and the transients this plan does not count (a layer's gradients in the backward, attention workspaces).
DEFAULT_HEADROOM = 0.10
MIN_HEADROOM_BYTES = 2 * GiB
# DeepSpeed's defaults where a config leaves a key out, and accelerate's fill-ins for "auto" (from hidden_size h).
DS_DEFAULTS = {"reduce_bucket_size": 5e8, "allgather_bucket_size": 5e8, "stage3_prefetch_bucket_size": 5e7,
               "stage3_max_live_parameters": 1e9}
ACCELERATE_AUTO = {"reduce_bucket_size": lambda h: h * h, "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h)}
# DeepSpeed's guidance: with overlap_comm the gradient buckets take 4.5x their nominal size.
OVERLAP_COMM_FACTOR = 4.5
# The unfused loss: the fp32 log-softmax kept for the backward, the fp32 gradient coming into it and the fp32
# gradient of its input are alive together at the peak of the loss's backward: 3 x 4 bytes per (token, vocab entry).
UNFUSED_LOGITS_BYTES = 12
# bitsandbytes NF4 with double quantization: 4 bits per weight, an 8-bit scale per 64 weights and an fp32 scale per
# 256 of those: (4 + 8/64 + 32/(64*256)) / 8 bytes.
NF4_BYTES_PER_PARAM = (4 + 8 / 64 + 32 / (64 * 256)) / 8


# ----------------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------------
def _meta_model(config) -> torch.nn.Module:
    """The causal LM of `config` with every tensor on the meta device: shapes only, no memory, ~0.1 s even for 32B."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def count_parameters(config) -> int:
    """Exact parameter count of the causal LM described by `config` (tied embeddings counted once:
    `Module.parameters()` yields a shared tensor once)."""
    return sum(p.numel() for p in _meta_model(config).parameters())


def flops_model(config) -> FlopsModel:
    """The sizes that decide the model's training FLOPs (flops.FlopsModel), from its config: for the time plan."""
    return FlopsModel.of(_meta_model(config))


def largest_module_parameters(config) -> int:
    """The most parameters any one module owns directly (usually the embedding or the output layer): what ZeRO-3
    gathers at once, since it fetches a module's own parameters just before that module runs."""
    return max(sum(p.numel() for p in module.parameters(recurse=False)) for module in _meta_model(config).modules())


def _adapted_linears(model: torch.nn.Module, targets: list[str]) -> list[torch.nn.Linear]:
    """The linear layers LoRA adapts: every one but the output layer (peft's all-linear), or those whose name
    ends with a target."""
    output = model.get_output_embeddings()
    return [module for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)
            and module is not output and (not targets or any(name == t or name.endswith("." + t) for t in targets))]


def lora_parameter_counts(config, args: FinetuneArgs) -> tuple[int, int]:
    """(trainable parameters: adapters r x (in + out) per adapted linear plus --lora_modules_to_save copies,
    parameters of the linear layers QLoRA quantizes: all but the output layer)."""
    model = _meta_model(config)
    adapters = sum(args.lora_rank * (m.in_features + m.out_features)
                   for m in _adapted_linears(model, list(args.lora_target_modules)))
    saved = sum(p.numel() for name, module in model.named_modules()
                if any(name == t or name.endswith("." + t) for t in args.lora_modules_to_save)
                for p in module.parameters())
    quantizable = sum(m.weight.numel() for m in _adapted_linears(model, []))
    return adapters + saved, quantizable


def load_model_config(model_name_or_path: str, revision: str | None = None, trust_remote_code: bool = False):
    """(config, None), or (None, a one-line reason) when it cannot be loaded (no network, unknown model, gated
    repo...), so the launcher can say "memory plan: skipped (<reason>)" and go on."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    except Exception as error:  # noqa: BLE001 - any failure only skips the plan
        first_line = (str(error).strip().splitlines() or [""])[0]
        return None, f"{type(error).__name__}: {first_line}"[:300]
    return config, None


def _dims(config) -> dict:
    h, heads = config.hidden_size, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return {"h": h, "heads": heads, "q": heads * head_dim, "kv": kv_heads * head_dim,
            "i": getattr(config, "intermediate_size", None) or 4 * h, "layers": config.num_hidden_layers,
            "vocab": config.vocab_size}


# ----------------------------------------------------------------------------------------------------------------
# Activations and logits
# ----------------------------------------------------------------------------------------------------------------
def tokens_per_micro_batch(args: FinetuneArgs, world_size: int) -> int:
    """Tokens of the largest micro-batch one GPU runs (see batching.split_global_batch).

    Padding-free with --max_tokens_per_micro_batch: that budget. A --global_batch_tokens budget: its share per
    micro-step, plus one example for the imbalance of the greedy split. A --global_batch_size: its share of examples
    per micro-step at --max_seq_length each. Otherwise --per_device_train_batch_size x --max_seq_length (a padded
    micro-batch is padded to its longest example).
    """
    micro_steps = world_size * args.gradient_accumulation_steps
    if args.padding_free and args.max_tokens_per_micro_batch:
        return args.max_tokens_per_micro_batch
    if args.global_batch_tokens:
        return math.ceil(args.global_batch_tokens / micro_steps) + args.max_seq_length
    if args.global_batch_size:
        return math.ceil(args.global_batch_size / micro_steps) * args.max_seq_length
    return args.per_device_train_batch_size * args.max_seq_length


def activation_bytes_per_token(config, args: FinetuneArgs, act_bytes: int, row_tokens: int) -> int:
    """Bytes one decoder layer keeps for the backward, per token (all of them, as without gradient checkpointing).

    Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models") count 34·h bytes per
    token for a GPT layer (plus 5·heads·seq for the attention scores); adapted here to a pre-norm RMSNorm, GQA,
    SwiGLU block without dropout and with flash attention, counting the tensors autograd saves (a = act_bytes):

        2 norms        HF RMSNorm: fp32 copy of the input (4h) + normalized (a·h) + output (a·h), the projection's
                       input; Liger's: input + output (2·a·h)
        attention      q, k, v for flash attention (a·(q + 2kv)) + its output, o_proj's input (a·q)
        SwiGLU MLP     gate and up outputs, silu(gate), their product (4·a·i); Liger's fused SwiGLU recomputes
                       silu (3·a·i)
        eager only     fp32 softmax + its bf16 copy: (4 + a)·heads·row_tokens

    Llama-3.1-8B in bf16 without Liger: 16h + 5h + 28h = 49h = 200,704 bytes per token per layer.
    """
    d = _dims(config)
    norm = 2 * act_bytes * d["h"] + (0 if args.use_liger_kernel else 4 * d["h"])
    attention = act_bytes * (2 * d["q"] + 2 * d["kv"])
    mlp = (3 if args.use_liger_kernel else 4) * act_bytes * d["i"]
    scores = (4 + act_bytes) * d["heads"] * row_tokens if args.attn_implementation == "eager" else 0
    return 2 * norm + attention + mlp + scores


def activations_bytes(config, args: FinetuneArgs, tokens: int, act_bytes: int, hidden_bytes: int) -> int:
    """Activations of one micro-batch of `tokens` tokens.

    With gradient checkpointing (each decoder layer a checkpoint): every layer's input hidden states
    (layers x tokens x h x hidden_bytes, the residual stream's dtype) plus one layer's full activations while it is
    recomputed in the backward. Without: every layer's full activations. Either way plus the final norm's.
    """
    d = _dims(config)
    row_tokens = tokens if args.padding_free else args.max_seq_length  # eager attention is quadratic in a row
    per_layer = tokens * activation_bytes_per_token(config, args, act_bytes, row_tokens)
    final_norm = tokens * d["h"] * (2 * act_bytes + (0 if args.use_liger_kernel else 4))
    if args.gradient_checkpointing:
        return d["layers"] * tokens * d["h"] * hidden_bytes + per_layer + final_norm
    return d["layers"] * per_layer + final_norm


def logits_bytes(config, args: FinetuneArgs, tokens: int, act_bytes: int) -> int:
    """The loss's logits for one micro-batch.

    Unfused (finetune.token_loss_sum on model(...).logits): three fp32 [tokens x vocab] tensors at the peak of the
    backward (UNFUSED_LOGITS_BYTES). With --use_liger_kernel, the chunked loss (loss.chunked_linear_cross_entropy_sum):
    one chunk of at most --loss_chunk_size rows, the output layer's logits plus their fp32 copy, and the gradient of
    the hidden states (tokens x h), which lives from the forward to the backward. (Its weight-sized gradient buffer is
    the output layer's gradient, counted with the gradients or, under ZeRO-3, the gathered-module buffers.)
    """
    d = _dims(config)
    if not args.use_liger_kernel:
        return UNFUSED_LOGITS_BYTES * tokens * d["vocab"]
    chunk = min(args.loss_chunk_size, tokens)
    chunk_logits = (act_bytes + 4 if act_bytes < 4 else 4) * chunk * d["vocab"]
    return chunk_logits + act_bytes * tokens * d["h"]


# ----------------------------------------------------------------------------------------------------------------
# DeepSpeed settings
# ----------------------------------------------------------------------------------------------------------------
def _ds_value(zero: dict, key: str, hidden_size: int) -> float:
    value = zero.get(key, DS_DEFAULTS[key])
    if value == "auto":
        return ACCELERATE_AUTO[key](hidden_size) if key in ACCELERATE_AUTO else DS_DEFAULTS[key]
    return float(value)


def _offloaded(zero: dict, key: str) -> str | None:
    """'cpu' or 'nvme' when `key` (offload_optimizer / offload_param) moves those tensors off the GPU."""
    device = (zero.get(key) or {}).get("device", "none")
    return device if device in ("cpu", "nvme") else None


def half_precision(ds_config: dict | None, mixed_precision: str) -> bool:
    """Whether the run trains in 16 bits. DeepSpeed's "auto" follows accelerate's --mixed_precision."""
    if ds_config is None:
        return mixed_precision in ("bf16", "fp16")
    for key in ("bf16", "fp16"):
        enabled = (ds_config.get(key) or {}).get("enabled", False)
        if enabled is True or (enabled == "auto" and mixed_precision == key):
            return True
    return False


# ----------------------------------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class MemoryPlan:
    """Bytes per GPU by component (in the order printed), bytes moved to CPU per GPU process, and the settings the
    figures assume (printed under the table)."""

    components: dict[str, int]
    cpu_bytes_per_gpu: int = 0
    gpus_per_node: int = 8
    assumptions: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(self.components.values())

    @property
    def cpu_bytes_per_node(self) -> int:
        return self.cpu_bytes_per_gpu * self.gpus_per_node

    @staticmethod
    def headroom_bytes(gpu_memory_gb: float, headroom: float = DEFAULT_HEADROOM) -> int:
        """Memory kept free: `headroom` of the GPU, at least MIN_HEADROOM_BYTES (2 GiB)."""
        return max(int(headroom * gpu_memory_gb * GiB), MIN_HEADROOM_BYTES)

    def fits(self, gpu_memory_gb: float, headroom: float = DEFAULT_HEADROOM) -> bool:
        """Whether the plan plus the headroom fits in a GPU of `gpu_memory_gb` GiB (as nvidia-smi reports it)."""
        return self.total_bytes + self.headroom_bytes(gpu_memory_gb, headroom) <= gpu_memory_gb * GiB

    def rows(self) -> list[tuple[str, float]]:
        """(component, GiB per GPU), then the total."""
        return [(name, value / GiB) for name, value in self.components.items()] + [("total", self.total_bytes / GiB)]

    def format(self, gpu_memory_gb: float | None = None, headroom: float = DEFAULT_HEADROOM) -> str:
        rows = self.rows()
        width = max(len(name) for name, _ in rows)
        lines = [f"  {'component':<{width}}  GiB/GPU"]
        lines += [f"  {name:<{width}}  {gib:7.2f}" for name, gib in rows]
        if self.cpu_bytes_per_gpu:
            lines.append(f"  offloaded to CPU: {self.cpu_bytes_per_gpu / GiB:.2f} GiB per GPU, "
                         f"{self.cpu_bytes_per_node / GiB:.1f} GiB per node of {self.gpus_per_node} GPUs")
        if gpu_memory_gb is not None:
            verdict = "fits" if self.fits(gpu_memory_gb, headroom) else "does NOT fit"
            lines.append(f"  {verdict} in {gpu_memory_gb:g} GiB, keeping "
                         f"{self.headroom_bytes(gpu_memory_gb, headroom) / GiB:.1f} GiB free")
        lines += [f"  ({note})" for note in self.assumptions]
        return "\n".join(lines)


def plan_memory(args: FinetuneArgs, config, num_params: int, world_size: int, ds_config: dict | None, *,
                mixed_precision: str = "bf16", gpus_per_node: int = 8) -> MemoryPlan:
    """Per-GPU memory of a run of `args` on `world_size` GPUs (see the module docstring for the bytes per parameter).

    ds_config: the parsed DeepSpeed config the accelerate command names, or None for plain DDP (no ZeRO).
    mixed_precision: accelerate's --mixed_precision (the GPU recipe's bf16); DeepSpeed's "auto" bf16 follows it.
    gpus_per_node: only scales the CPU figure of offloaded states.
    """
    zero = (ds_config or {}).get("zero_optimization") or {}
    stage = int(zero.get("stage", 0)) if ds_config is not None else 0
    half = half_precision(ds_config, mixed_precision)
    deepspeed_half = ds_config is not None and half
    weight_bytes = 2 if deepspeed_half else 4  # without DeepSpeed, accelerate keeps fp32 weights and autocasts
    grad_bytes = weight_bytes
    optimizer_bytes = 16 if deepspeed_half else 8  # fp32 master + moments + step's fp32 gradient, or moments only
    act_bytes = 2 if half else 4

    trainable, frozen_bytes = num_params, 0.0
    if uses_lora(args):
        trainable, quantizable = lora_parameter_counts(config, args)
        frozen_bytes = (NF4_BYTES_PER_PARAM * quantizable + 2 * (num_params - quantizable) if args.use_qlora
                        else (2 if half else 4) * num_params)  # see finetune.model_dtype

    def share(per_param: float, partitioned: bool, count: int | None = None) -> int:
        return int(per_param * (trainable if count is None else count) / (world_size if partitioned else 1))

    params = share(frozen_bytes, stage >= 3, 1) + share(weight_bytes, stage >= 3)
    grads = share(grad_bytes, stage >= 2)
    optimizer = share(optimizer_bytes, stage >= 1)
    cpu = 0
    optimizer_device, param_device = _offloaded(zero, "offload_optimizer"), _offloaded(zero, "offload_param")
    if optimizer_device:  # the step runs on the CPU: the states live there, and from stage 2 the gradient
        # partitions go straight to its fp32 buffers (already counted in the 16 bytes per parameter)
        cpu += optimizer if optimizer_device == "cpu" else 0
        optimizer = 0
        grads = 0 if stage >= 2 else grads
    if param_device and stage >= 3:
        cpu += params if param_device == "cpu" else 0
        params = 0

    components = {"parameters": params, "gradients": grads, "optimizer states": optimizer}
    if ds_config is None and half:
        components["autocast bf16 weight copies"] = share(2, False)
    if ds_config is None and world_size > 1:
        components["DDP gradient buckets"] = share(grad_bytes, False)
    if stage >= 1:
        components["ZeRO buffers"] = _zero_buffers(zero, stage, config, weight_bytes, grad_bytes)
    # Sequence parallelism: a row is cut over N ranks, each keeping 1/N of its tokens (attention holds the whole row
    # for H/N heads: the same bytes). The rows come from the world / N data-parallel replicas' shares.
    n = args.sequence_parallel_size
    row_tokens = tokens_per_micro_batch(args, world_size // n)
    tokens = math.ceil(row_tokens / n)
    components["activations"] = activations_bytes(config, args, tokens, act_bytes, hidden_bytes=weight_bytes)
    components["loss logits"] = logits_bytes(config, args, tokens, act_bytes)

    setup = f"ZeRO stage {stage}" if ds_config is not None else "DDP (no DeepSpeed)"
    if uses_lora(args):
        setup += (f", {'QLoRA (4-bit base)' if args.use_qlora else 'LoRA'} rank {args.lora_rank}: "
                  f"{trainable / 1e6:.1f}M trainable parameters")
    loss = f"chunked loss, {args.loss_chunk_size} rows" if args.use_liger_kernel else "unfused loss"
    note = (f"{num_params / 1e9:.2f}B parameters, {world_size} GPUs, {setup}, {'bf16' if half else 'fp32'}; "
            + (f"{tokens} of each {row_tokens}-token row per GPU (sequence parallel {n}), " if n > 1
               else f"{tokens} tokens per micro-batch, ")
            + f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, "
            f"{loss}")
    return MemoryPlan(components, cpu, gpus_per_node, [note])


def _zero_buffers(zero: dict, stage: int, config, weight_bytes: int, grad_bytes: int) -> int:
    """DeepSpeed's working buffers.

    Stages 1-2: the gradient reduce bucket and the parameter all-gather bucket, 4.5x their size with overlap_comm
    (DeepSpeed's guidance). Stage 3: the gathered parameters, i.e. the largest module plus the prefetch bucket, capped
    by stage3_max_live_parameters; that module's full gradient before it is reduce-scattered; and the reduce bucket
    (4.5x with overlap_comm).
    """
    h = config.hidden_size
    overlap = OVERLAP_COMM_FACTOR if zero.get("overlap_comm", False) else 1.0
    reduce_bucket = _ds_value(zero, "reduce_bucket_size", h)
    if stage < 3:
        return int(overlap * grad_bytes * (reduce_bucket + _ds_value(zero, "allgather_bucket_size", h)))
    largest = largest_module_parameters(config)
    gathered = min(_ds_value(zero, "stage3_max_live_parameters", h),
                   largest + _ds_value(zero, "stage3_prefetch_bucket_size", h))
    return int(weight_bytes * gathered + grad_bytes * largest + overlap * grad_bytes * reduce_bucket)


def largest_row_budget(args: FinetuneArgs, config, num_params: int, world_size: int, ds_config: dict | None,
                       gpu_memory_gb: float, *, mixed_precision: str = "bf16", ceiling: int = 131072) -> int | None:
    """The largest --max_tokens_per_micro_batch (a multiple of --max_seq_length, at most `ceiling` and at most one
    GPU's share of the global batch at --max_seq_length each) whose plan fits
    in `gpu_memory_gb` with the headroom: bigger packed rows mean fewer micro-steps, so less per-step overhead and,
    under ZeRO-3, fewer weight gathers per optimizer step. A per-device batch is taken as the --global_batch_size it
    adds up to (rows need one). None when padding-free rows are not in use or even one --max_seq_length row does not
    fit."""
    if not args.padding_free:
        return None
    examples = None if args.global_batch_tokens is not None else global_batch_examples(args, world_size)
    if examples:  # a row never holds more than one GPU's share of the global batch
        replicas = world_size // args.sequence_parallel_size
        ceiling = min(ceiling, -(-examples // replicas) * args.max_seq_length)

    def fits(rows: int) -> bool:  # a budget of `rows` x --max_seq_length tokens
        candidate = dataclasses.replace(args, max_tokens_per_micro_batch=rows * args.max_seq_length,
                                        gradient_accumulation_steps=1, per_device_train_batch_size=1,
                                        global_batch_size=examples)
        return plan_memory(candidate, config, num_params, world_size, ds_config,
                           mixed_precision=mixed_precision).fits(gpu_memory_gb)

    # The plan grows with the budget, so bisect: each plan builds the model on the meta device (~0.07 s for 8B),
    # which a scan of every multiple repeated up to 32 times.
    low, high = 0, ceiling // args.max_seq_length  # fits(low) holds (or low is 0); the answer is in [low, high]
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    return low * args.max_seq_length or None
