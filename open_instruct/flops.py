"""Model FLOPs of a training step and the device's peak, for MFU (model FLOPs utilization).

Model FLOPs count the work the model needs, not what the hardware did (recomputation under gradient checkpointing
and padding are not counted), for one optimizer step over examples of lengths s_i with T = sum(s_i) real tokens:

    6 * N_blocks * T                           every weight of the transformer blocks: 2 FLOPs per multiply-add,
                                               x3 for forward + backward (input and weight gradients); a frozen
                                               weight (a LoRA base) needs no weight gradient: x2 instead of x3
  + 6 * vocab * hidden * trained_tokens         the output layer, where the loss needs logits (4 when frozen)
  + 6 * layers * heads * head_dim * sum(s_i^2)  causal attention (QK^T and AV: 4 s^2 d per head forward, halved by the
                                               causal mask, x3 for the backward); each example attends only to itself

MFU = model FLOPs per second per device / the device's peak dense bf16 FLOP/s (a table of datasheet figures for
NVIDIA GPUs; on a CPU, a matrix-multiply measurement of this machine in the training dtype; or --peak_tflops).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, TFLOP/s, matched against the device name.
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.4, "H200": 989.4, "A100": 312.0,
                    "L40S": 362.05}


def parameter_numel(parameter: torch.nn.Parameter) -> int:
    quantized = getattr(parameter, "quant_state", None)  # bitsandbytes 4-bit: two weights per stored byte
    if quantized is not None:
        return int(np.prod(quantized.shape))
    return int(getattr(parameter, "ds_numel", parameter.numel()))  # ZeRO-3 partitions leave numel() at 0


@dataclass(frozen=True)
class FlopsModel:
    """The sizes that decide a causal LM's training FLOPs."""

    block_params: int  # parameters of the transformer blocks (not the embedding, final norm or output layer)
    vocab_size: int
    hidden_size: int
    num_layers: int
    attention_width: int  # heads x head_dim (the query width)
    frozen_block_params: int = 0  # of block_params, those without a gradient (a LoRA run's base)
    output_layer_frozen: bool = False

    @classmethod
    def of(cls, model: torch.nn.Module) -> FlopsModel:
        """From a Hugging Face causal LM, or a wrapper of one (ChunkedLossModel's `.lm`, a peft model)."""
        model = getattr(model, "lm", model)
        config = model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        blocks = list(model.get_decoder().layers.parameters())
        output = model.get_output_embeddings()
        return cls(block_params=sum(parameter_numel(p) for p in blocks), vocab_size=config.vocab_size,
                   hidden_size=config.hidden_size, num_layers=config.num_hidden_layers,
                   attention_width=config.num_attention_heads * head_dim,
                   frozen_block_params=sum(parameter_numel(p) for p in blocks if not p.requires_grad),
                   output_layer_frozen=not any(p.requires_grad for p in output.parameters()))

    def step_flops(self, lengths: np.ndarray, trained_tokens: int) -> float:
        """Model FLOPs of one optimizer step over examples of these lengths (see the module docstring)."""
        lengths = np.asarray(lengths, dtype=np.float64)
        return self.flops(lengths.sum(), trained_tokens, (lengths ** 2).sum())

    def flops(self, tokens: float, trained_tokens: float, sum_squared_lengths: float) -> float:
        """Model FLOPs of `tokens` tokens in examples whose squared lengths sum to `sum_squared_lengths`: the totals
        the formula needs, so a plan can price a whole run from its data's counts (time_plan.py)."""
        trainable = self.block_params - self.frozen_block_params
        dense = (6.0 * trainable + 4.0 * self.frozen_block_params) * tokens
        output_layer = (4.0 if self.output_layer_frozen else 6.0) * self.vocab_size * self.hidden_size * trained_tokens
        attention = 6.0 * self.num_layers * self.attention_width * sum_squared_lengths
        return dense + output_layer + attention


def measured_cpu_peak_flops(dtype: torch.dtype = torch.float32, size: int = 1024, trials: int = 5,
                            seconds: float = 0.1) -> float:
    """FLOP/s of square matrix multiplies on this CPU in `dtype`: the practical peak a CPU run can reach. The best
    of several short timings, so a brief interruption lowers one timing, not the figure. Sustained load from other
    programs lowers it (on a 2-core VM, 0.07 instead of 0.20 TFLOP/s, which inflates MFU about 3x): --peak_tflops
    pins the figure."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    torch.mm(a, b)  # warm-up: thread pool and caches
    best = 0.0
    for _ in range(trials):
        runs, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            torch.mm(a, b)
            runs += 1
        best = max(best, 2.0 * size ** 3 * runs / (time.perf_counter() - start))
    return best


def peak_flops(device: torch.device, declared_tflops: float | None, dtype: torch.dtype) -> tuple[float | None, str]:
    """(peak FLOP/s of one device, where the figure comes from); None where no figure is known."""
    if declared_tflops:
        return declared_tflops * 1e12, "declared (--peak_tflops)"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        tflops = next((value for key, value in PEAK_BF16_TFLOPS.items() if key in name), None)
        if tflops is None:
            return None, f"unknown GPU {name!r}: pass --peak_tflops for MFU"
        return tflops * 1e12, f"{name} datasheet, dense bf16"
    if device.type == "cpu":
        return measured_cpu_peak_flops(dtype), f"measured {str(dtype).replace('torch.', '')} matmul on this CPU"
    return None, f"no peak figure for {device.type}: pass --peak_tflops for MFU"
