"""Training throughput, MFU and peak memory of a 1.2B-parameter Llama on one CUDA GPU, configurations side by side.

    python benchmarks/gpu_throughput.py                                  # every configuration below
    python benchmarks/gpu_throughput.py --configs padding-free+liger padded --steps 10 --json out.json
    python benchmarks/gpu_throughput.py --tiny --device cpu --steps 2    # a seconds-long smoke run of the script

Model: the Llama-3.2-1B shape (hidden 2048, 16 layers, 32 query / 8 key-value heads, MLP 8192, vocab 128256, tied
embeddings, 4,096 positions; 1.24B parameters), random init, saved once and loaded through the trainer's
`load_model` for each configuration (fp32 weights, bf16 autocast from accelerate, AdamW: the trainer's single-GPU
setup without DeepSpeed). Data: the length distribution of benchmarks/packing.py (log-normal, median 300, sigma 1.0,
clipped to [32, 4096]) with random token ids; the first fifth of each example is an untrained prompt.

Every optimizer step trains the same global batch (`--global_batch_size` examples drawn by the trainer's BatchPlan)
through the trainer's own `micro_batches` and `train_step`:
  padded        --no_padding_free: groups of similar length, `--padded_batch_size` examples each, padded to the
                group's longest (attention mask, SDPA)
  padding-free  one packed row of at most `--row_tokens` (4,096) tokens per micro-batch
                (--max_tokens_per_micro_batch, best-fit-decreasing), attention `auto` (flash varlen where available)
  +liger        --use_liger_kernel: Liger's RMSNorm/RoPE/SwiGLU and the chunked linear cross-entropy
  +gc           --gradient_checkpointing

Each configuration runs in a fresh process (no allocator state or Liger patch carries over). Reported per one, over `--steps` timed steps after `--warmup` untimed ones (wall time with CUDA
synchronized, collation included): effective tokens/s (real tokens), positions/s (tokens including padding), MFU,
and peak allocated memory (weights, gradients and AdamW state included: 16 bytes per parameter, 19.8 GB here), with
the CUDA allocator's expandable segments on, as the trainer sets them (`configure_cuda_allocator`).
MFU = model FLOPs / (time x peak bf16 FLOP/s of the GPU), model FLOPs per step = 6 x (transformer-block parameters)
x tokens + 6 x vocab x hidden x trained tokens + 6 x layers x hidden x sum(example length^2) (causal attention):
useful work only, so padding, recomputation and logits of untrained positions count as overhead.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.packing import lengths as sft_lengths  # noqa: E402
from open_instruct.flops import PEAK_BF16_TFLOPS, FlopsModel  # noqa: E402

LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=4096,
                tie_word_embeddings=True, rope_theta=500000.0, rms_norm_eps=1e-5)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, vocab_size=1024, max_position_embeddings=4096, tie_word_embeddings=True)
CONFIGS = ("padding-free+liger", "padding-free", "padded", "padded+liger", "padding-free+liger+gc", "padding-free+gc",
           "padded+gc", "padded+liger+gc")
MAX_SEQ_LENGTH = 4096


class SyntheticMixture:
    """What the trainer reads from a TokenizedMixture: lengths, trained lengths and examples by index."""

    def __init__(self, rows: int, vocab_size: int, max_length: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.lengths = sft_lengths(rows, max_length, seed).astype(np.int64)
        self.ids = [rng.integers(0, vocab_size, size=n, dtype=np.int32) for n in self.lengths]
        self.labels = [np.where(np.arange(n) < n // 5, -100, x).astype(np.int32) for n, x in zip(self.lengths, self.ids)]
        self.trained_lengths = np.array([(y[1:] != -100).sum() for y in self.labels], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.lengths)

    def examples(self, indices):
        return [self.ids[i] for i in indices], [self.labels[i] for i in indices]


def build_model_dir(directory: Path, shape: dict) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(LlamaConfig(**shape)).to(torch.bfloat16)
    model.save_pretrained(directory)
    del model
    return directory


def trainer_args(name: str, model_dir: Path, cli):
    from open_instruct.args import FinetuneArgs

    padding_free = name.startswith("padding-free")
    layout = (dict(max_tokens_per_micro_batch=cli.row_tokens) if padding_free else
              dict(padding_free=False, gradient_accumulation_steps=cli.global_batch_size // cli.padded_batch_size))
    return FinetuneArgs(model_name_or_path=str(model_dir), dataset_mixer_list=["synthetic", "1.0"],
                        max_seq_length=MAX_SEQ_LENGTH, global_batch_size=cli.global_batch_size, learning_rate=1e-5,
                        clip_grad_norm=1.0, use_liger_kernel="+liger" in name, gradient_checkpointing="+gc" in name,
                        **layout)


def model_flops(model, mixture: SyntheticMixture, batch: np.ndarray) -> float:
    """The trainer's definition (open_instruct/flops.py), on this step's examples."""
    return FlopsModel.of(model).step_flops(mixture.lengths[batch], int(mixture.trained_lengths[batch].sum()))


def run_config(name: str, model_dir: Path, mixture: SyntheticMixture, accelerator, cli) -> dict:
    from open_instruct import finetune
    from open_instruct.batching import BatchPlan
    from open_instruct.model_utils import ChunkedLossModel, attention_implementation, load_model
    from open_instruct.optim import build_optimizer

    args = trainer_args(name, model_dir, cli)
    attn = attention_implementation(args.attn_implementation) if args.padding_free else "sdpa"
    if cli.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = load_model(args, torch.float32, attn)
    inner = model
    if args.use_liger_kernel:
        model = ChunkedLossModel(model, args.loss_chunk_size)
    optimizer = build_optimizer(model, args.learning_rate, args.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    plan = BatchPlan(len(mixture), args.global_batch_size, seed=0)
    record = {"config": name, "attention": attn, "steps": cli.steps}
    if cli.device == "cuda":
        record["weights_gb"] = torch.cuda.memory_allocated() / 1e9  # fp32; gradients and AdamW state come later
    try:
        seconds, tokens, positions, flops, micro_steps = 0.0, 0, 0, 0.0, 0
        for step in range(cli.warmup + cli.steps):
            if cli.device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            batches = finetune.micro_batches(mixture, plan, step, args, accelerator, pad_id=0)
            with profiled(cli.profile and step == cli.warmup):
                result = finetune.train_step(accelerator, model, optimizer, batches, args)
            if cli.device == "cuda":
                torch.cuda.synchronize()
            if step >= cli.warmup:
                seconds += time.perf_counter() - start
                tokens += result["tokens"]
                positions += result["tokens_with_padding"]
                flops += model_flops(inner, mixture, plan.global_batch(step))
                micro_steps += len(batches)
        peak_tflops = cli.peak_tflops or 1.0
        record.update(tokens_per_s=tokens / seconds, positions_per_s=positions / seconds, non_pad=tokens / positions,
                      mfu=flops / seconds / (peak_tflops * 1e12), tflops=flops / seconds / 1e12,
                      micro_steps_per_step=micro_steps / cli.steps, last_loss=result["train_loss"],
                      seconds_per_step=seconds / cli.steps)
    except torch.OutOfMemoryError:
        record["error"] = "out of memory"
    if cli.device == "cuda":
        stats = torch.cuda.memory_stats()
        record.update(peak_gb=stats["allocated_bytes.all.peak"] / 1e9, reserved_gb=stats["reserved_bytes.all.peak"] / 1e9,
                      alloc_retries=stats["num_alloc_retries"], ooms=stats["num_ooms"])
    del model, optimizer, inner
    accelerator.free_memory()
    gc.collect()
    return record


class profiled:
    """torch.profiler around one step when asked: prints the 25 costliest GPU kernels and operators."""

    def __init__(self, enabled: bool):
        self.profiler = None
        if enabled:
            from torch.profiler import ProfilerActivity, profile

            self.profiler = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])

    def __enter__(self):
        if self.profiler:
            self.profiler.__enter__()

    def __exit__(self, *exc):
        if self.profiler:
            self.profiler.__exit__(*exc)
            print(self.profiler.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60),
                  file=sys.stderr, flush=True)


def run_isolated(name: str, model_dir: Path, cli) -> dict:
    """One configuration in a fresh process: no allocator state, Liger patch or compiled kernel carries over."""
    command = [sys.executable, __file__, "--single", name, "--model_dir", str(model_dir), "--steps", str(cli.steps),
               "--warmup", str(cli.warmup), "--global_batch_size", str(cli.global_batch_size), "--padded_batch_size",
               str(cli.padded_batch_size), "--rows", str(cli.rows), "--device", cli.device, "--row_tokens",
               str(cli.row_tokens)]
    command += ["--peak_tflops", str(cli.peak_tflops)] if cli.peak_tflops else []
    command += ["--tiny"] if cli.tiny else []
    command += ["--profile"] if cli.profile else []
    result = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if result.returncode == 0 and lines else {"config": name, "error": f"exit {result.returncode}"}


def peak_tflops_of_device() -> float | None:
    name = torch.cuda.get_device_name()
    return next((value for key, value in PEAK_BF16_TFLOPS.items() if key in name), None)


def describe_environment(cli) -> None:
    import transformers

    from open_instruct import attention

    line = f"torch {torch.__version__}, transformers {transformers.__version__}"
    try:
        import liger_kernel  # noqa: F401
        from importlib.metadata import version

        line += f", liger-kernel {version('liger-kernel')}"
    except ImportError:
        line += ", liger-kernel not installed"
    if cli.device == "cuda":
        line = f"{torch.cuda.get_device_name()} ({cli.peak_tflops} TFLOP/s bf16 peak), " + line
    line += f"; packed attention: {'flash varlen (torch.nn.attention.varlen)' if attention.varlen_attn else 'SDPA per example'}"
    print(line, flush=True)


def print_table(records: list[dict]) -> None:
    print(f"\n{'config':<24}{'tokens/s':>10}{'positions/s':>13}{'non-pad':>9}{'MFU':>8}{'TFLOP/s':>9}{'peak GB':>9}"
          f"{'micro/step':>11}{'loss':>8}")
    for r in records:
        if "error" in r:
            print(f"{r['config']:<24}{r['error']:>10}   (peak {r.get('peak_gb', float('nan')):.1f} GB)")
            continue
        print(f"{r['config']:<24}{r['tokens_per_s']:>10.0f}{r['positions_per_s']:>13.0f}{r['non_pad']:>9.1%}"
              f"{r['mfu']:>8.1%}{r['tflops']:>9.1f}{r.get('peak_gb', float('nan')):>9.1f}"
              f"{r['micro_steps_per_step']:>11.1f}{r['last_loss']:>8.3f}")
    by_name = {r["config"]: r for r in records if "error" not in r}
    for a, b, what in [("padding-free", "padded", "effective tokens/s"),
                       ("padding-free+liger", "padded+liger", "effective tokens/s")]:
        if a in by_name and b in by_name:
            print(f"{a} / {b} {what}: {by_name[a]['tokens_per_s'] / by_name[b]['tokens_per_s']:.2f}x")
    for base in ("padding-free", "padded", "padding-free+gc", "padded+gc"):
        liger = base.replace("padding-free", "padding-free+liger") if base.startswith("padding-free") else \
            base.replace("padded", "padded+liger")
        if base in by_name and liger in by_name and "peak_gb" in by_name[base]:
            saved = 1 - by_name[liger]["peak_gb"] / by_name[base]["peak_gb"]
            print(f"{liger} vs {base}: peak memory {saved:.0%} lower, tokens/s "
                  f"{by_name[liger]['tokens_per_s'] / by_name[base]['tokens_per_s']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps per configuration")
    parser.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first")
    parser.add_argument("--global_batch_size", type=int, default=128, help="examples per optimizer step")
    parser.add_argument("--padded_batch_size", type=int, default=4, help="examples per padded micro-batch")
    parser.add_argument("--rows", type=int, default=4000, help="examples generated")
    parser.add_argument("--peak_tflops", type=float, default=None, help="the GPU's dense bf16 peak (default: known GPUs)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a tiny model instead of the 1.2B one (smoke test)")
    parser.add_argument("--row_tokens", type=int, default=4096, help="padding-free: tokens per packed row")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table of the first timed step")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--single", choices=CONFIGS, help=argparse.SUPPRESS)  # one configuration, in this process
    parser.add_argument("--model_dir", help=argparse.SUPPRESS)
    cli = parser.parse_args()
    if cli.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: this benchmark measures GPU training (use --tiny --device cpu to smoke-test it)")
    if cli.device == "cuda":
        cli.peak_tflops = cli.peak_tflops or peak_tflops_of_device()
        torch.backends.cuda.matmul.allow_tf32 = True
    if cli.global_batch_size % cli.padded_batch_size:
        sys.exit("--global_batch_size must be a multiple of --padded_batch_size")
    shape = TINY if cli.tiny else LLAMA_1B
    if cli.single:
        from accelerate import Accelerator

        from open_instruct.finetune import configure_cuda_allocator

        configure_cuda_allocator()  # as the trainer does, before the first CUDA allocation
        mixture = SyntheticMixture(cli.rows, shape["vocab_size"], MAX_SEQ_LENGTH)
        accelerator = Accelerator(mixed_precision="bf16" if cli.device == "cuda" else "no", cpu=cli.device == "cpu")
        print(json.dumps(run_config(cli.single, Path(cli.model_dir), mixture, accelerator, cli)), flush=True)
        return
    describe_environment(cli)
    mixture = SyntheticMixture(cli.rows, shape["vocab_size"], MAX_SEQ_LENGTH)
    print(f"{cli.rows} examples: mean {mixture.lengths.mean():.0f} tokens, p50 {np.median(mixture.lengths):.0f}, "
          f"p99 {np.percentile(mixture.lengths, 99):.0f}; global batch {cli.global_batch_size} examples; "
          f"{cli.warmup} + {cli.steps} steps per configuration; padding-free rows of {cli.row_tokens} tokens", flush=True)
    records = []
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as work:
        model_dir = build_model_dir(Path(work) / "model", shape)
        for name in cli.configs:
            record = run_isolated(name, model_dir, cli)
            print(json.dumps(record), flush=True)
            records.append(record)
    print_table(records)
    if cli.json:
        Path(cli.json).write_text(json.dumps(records, indent=2))


if __name__ == "__main__":
    main()
