"""Training throughput, MFU, peak memory (against the memory plan) and host syncs of a 1.2B-parameter Llama on one
CUDA GPU, one configuration per process, through the trainer's own set-up and step.

    python benchmarks/gpu_throughput.py                                       # benchmarks/gpu_check.py's matrix
    python benchmarks/gpu_throughput.py --rows zero3+liger@8192 single+liger@8192 --steps 10 --json out.json
    python benchmarks/gpu_throughput.py --tiny --device cpu --steps 1         # a seconds-long smoke run on CPU

A row is `<base>[+lever...]@<row tokens>`:
  base     single: one process without DeepSpeed (fp32 weights under bf16 autocast, fused AdamW on the GPU);
           zero3: DeepSpeed ZeRO-3 on one GPU as the recipes run it (configs/ds_configs/stage3_no_offloading_
           accelerate.conf, bf16 weights and gradients, fp32 master weights in DeepSpeed's optimizer)
  levers   liger: --use_liger_kernel (Liger's RMSNorm/RoPE/SwiGLU and our chunked loss, which only sends trained
           positions through the output layer); flce: Liger's own fused linear cross-entropy instead of our chunked
           loss (single only: it reads lm_head.weight outside the module, an empty shard under ZeRO-3);
           compile: --torch_compile; gc: --gradient_checkpointing; lora / qlora: --use_lora / --use_qlora (rank 64);
           padded: --no_padding_free (groups of 4 similar-length examples padded to their longest, SDPA)
  @N       padding-free: packed rows of at most N tokens (--max_tokens_per_micro_batch)

Model: the Llama-3.2-1B shape (hidden 2048, 16 layers, 32 query / 8 key-value heads, MLP 8192, vocab 128256, tied
embeddings; 1.24B parameters), random init. Data: the length distribution of benchmarks/packing.py (log-normal,
median 300, sigma 1.0, clipped to [32, 4096]) with random token ids; the first fifth of each example is an untrained
prompt. Every optimizer step trains the same global batch (`--global_batch_size` examples by the trainer's BatchPlan)
through `finetune.micro_batches` and `finetune.train_step`, after `finetune.build_accelerator` set up accelerate and
DeepSpeed exactly as for a run (a one-process launch: RANK/WORLD_SIZE set here).

Reported per row over `--steps` timed steps after `--warmup` untimed ones (wall time with CUDA synchronized,
collation included): effective tokens/s (real tokens), positions/s (with padding), MFU, peak allocated memory and the
memory plan's estimate for the same run (open_instruct/memory_plan.py; its error in %), and the host synchronisations
of one timed step (torch.cuda.set_sync_debug_mode, counted by the source line that caused them).
MFU = model FLOPs / (time x peak bf16 FLOP/s of the GPU), model FLOPs as the trainer counts them (open_instruct/
flops.py): useful work only, so padding, recomputation and logits of untrained positions count as overhead.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.packing import lengths as sft_lengths  # noqa: E402
from open_instruct.flops import PEAK_BF16_TFLOPS, FlopsModel  # noqa: E402

LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=16384,
                tie_word_embeddings=True, rope_theta=500000.0, rms_norm_eps=1e-5)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, vocab_size=1024, max_position_embeddings=16384, tie_word_embeddings=True)
MAX_SEQ_LENGTH = 4096
ZERO3_CONFIG = REPO / "configs/ds_configs/stage3_no_offloading_accelerate.conf"
BASES = ("single", "zero3")
LEVERS = ("liger", "flce", "compile", "gc", "lora", "qlora", "padded")
DEFAULT_ROWS = ("zero3+liger@8192", "single+liger@8192", "zero3@8192", "zero3+liger+compile@8192")


@dataclass(frozen=True)
class Row:
    """One benchmark configuration (see the module docstring for the spelling)."""

    name: str
    base: str
    levers: frozenset
    row_tokens: int

    @classmethod
    def parse(cls, spec: str) -> Row:
        head, _, tokens = spec.partition("@")
        base, *levers = head.split("+")
        unknown = [lever for lever in levers if lever not in LEVERS]
        if base not in BASES or unknown or not tokens.isdigit() or int(tokens) < MAX_SEQ_LENGTH:
            raise ValueError(f"row {spec!r}: expected <{'|'.join(BASES)}>[+{'|+'.join(LEVERS)}]@<tokens >= "
                             f"{MAX_SEQ_LENGTH}>")
        row = cls(spec, base, frozenset(levers), int(tokens))
        if "flce" in row.levers and row.base == "zero3":
            raise ValueError(f"row {spec!r}: Liger's fused linear cross-entropy cannot read a ZeRO-3 shard (use single)")
        return row

    @property
    def config(self) -> str:
        """The throughput table's key (open_instruct/assets/gpu_throughput.json): the row less its budget."""
        from open_instruct.time_plan import config_key

        return config_key(self.base, self.levers)

    @property
    def deepspeed(self) -> bool:
        return self.base == "zero3"

    def needs(self) -> list[str]:
        """Packages the row needs beyond the trainer's own (to skip it with a reason where they are missing)."""
        return (["liger_kernel"] if self.levers & {"liger", "flce"} and torch.cuda.is_available() else []) + \
            (["bitsandbytes"] if "qlora" in self.levers else []) + (["deepspeed"] if self.deepspeed else [])


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
    """A random-init Llama of `shape` saved in bf16 (each row loads it in the dtype its set-up uses)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(LlamaConfig(**shape)).to(torch.bfloat16)
    model.save_pretrained(directory)
    del model
    return directory


def trainer_args(row: Row, model_dir: Path, cli):
    from open_instruct.args import FinetuneArgs

    layout = (dict(padding_free=False, gradient_accumulation_steps=cli.global_batch_size // cli.padded_batch_size)
              if "padded" in row.levers else dict(max_tokens_per_micro_batch=row.row_tokens))
    adapter = {"lora": "use_lora", "qlora": "use_qlora"}
    adapters = {flag: True for lever, flag in adapter.items() if lever in row.levers}
    adapters.update(dict(lora_rank=64, lora_alpha=128) if adapters else {})
    compile_flag = dict(torch_compile=True) if "compile" in row.levers else {}
    return FinetuneArgs(model_name_or_path=str(model_dir), dataset_mixer_list=["synthetic", "1.0"],
                        max_seq_length=MAX_SEQ_LENGTH, global_batch_size=cli.global_batch_size, learning_rate=1e-5,
                        clip_grad_norm=1.0, use_liger_kernel=bool(row.levers & {"liger", "flce"}),
                        gradient_checkpointing="gc" in row.levers, output_dir=cli.work_dir, **compile_flag,
                        **adapters, **layout)


def one_process_launch(row: Row, device: str) -> None:
    """The environment `accelerate launch --num_processes 1 [--use_deepspeed ...]` would give this process."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), ACCELERATE_MIXED_PRECISION="bf16" if device == "cuda" else "no")
    if row.deepspeed:
        os.environ.update(ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_CONFIG_FILE=str(ZERO3_CONFIG))
    if device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "true"


class LigerLossModel(torch.nn.Module):
    """ChunkedLossModel's interface with Liger's fused linear cross-entropy as the loss (the `flce` lever)."""

    def __init__(self, lm):
        super().__init__()
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        self.lm, self.loss = lm, LigerFusedLinearCrossEntropyLoss(ignore_index=-100, reduction="sum")

    @property
    def config(self):
        return self.lm.config

    def forward(self, target_ids=None, num_chunks=None, **inputs):
        hidden = self.lm.get_decoder()(**inputs).last_hidden_state
        weight = self.lm.get_output_embeddings().weight
        return self.loss(weight, hidden.reshape(-1, hidden.shape[-1]), target_ids.reshape(-1).to(hidden.device))


def build_model(row: Row, args, accelerator):
    from open_instruct.finetune import model_dtype
    from open_instruct.lora import load_with_adapters
    from open_instruct.model_utils import ChunkedLossModel, attention_implementation

    attn = attention_implementation(args.attn_implementation) if args.padding_free else "sdpa"
    dtype = model_dtype(accelerator, args)
    model = load_with_adapters(args, dtype, attn)
    if "flce" in row.levers:
        model = LigerLossModel(model)
    elif args.use_liger_kernel:
        model = ChunkedLossModel(model, args.loss_chunk_size)
    return model, attn, dtype


def memory_plan_bytes(row: Row, args, model_dir: Path) -> int:
    from open_instruct.launch import read_deepspeed_config
    from open_instruct.memory_plan import count_parameters, load_model_config, plan_memory

    config, _ = load_model_config(str(model_dir))
    ds_config = read_deepspeed_config(str(ZERO3_CONFIG)) if row.deepspeed else None
    return plan_memory(args, config, count_parameters(config), world_size=1, ds_config=ds_config).total_bytes


def count_host_syncs(step) -> tuple[int, list[str]]:
    """Run `step()` with CUDA's sync debug mode on: (synchronizing operations, the five commonest source lines)."""
    where = collections.Counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for warning in caught:
        if "synchroniz" in str(warning.message):
            where[f"{Path(warning.filename).name}:{warning.lineno}"] += 1
    return sum(where.values()), [f"{place} x{n}" for place, n in where.most_common(5)]


def run_row(row: Row, model_dir: Path, mixture: SyntheticMixture, cli) -> dict:
    from open_instruct import finetune
    from open_instruct.batching import BatchPlan
    from open_instruct.compile import compile_decoder_layers, gather_whole_layers_under_zero3
    from open_instruct.optim import build_optimizer
    from open_instruct.parallel_dims import ParallelDims

    args = trainer_args(row, model_dir, cli)
    one_process_launch(row, cli.device)
    accelerator = finetune.build_accelerator(args)
    model, attn, dtype = build_model(row, args, accelerator)
    flops_model, params = FlopsModel.of(model), finetune.parameter_count(model)  # read before ZeRO-3 partitions
    optimizer = build_optimizer(model, args.learning_rate, args.weight_decay, args.lora_learning_rate)
    if args.torch_compile and row.deepspeed:  # as finetune.train does: before prepare, then compile after it
        gather_whole_layers_under_zero3(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    if args.torch_compile:
        compile_decoder_layers(accelerator.unwrap_model(model), backend=cli.compile_backend)
    plan, dims = BatchPlan(len(mixture), args.global_batch_size, seed=0), ParallelDims(1, 1, 0)
    record = {"row": row.name, "attention": attn, "weights_dtype": str(dtype).removeprefix("torch."),
              "steps": cli.steps, "params": params}
    cuda = cli.device == "cuda"
    try:
        record["plan_gb"] = memory_plan_bytes(row, args, model_dir) / 1e9
    except Exception as error:  # noqa: BLE001 - the plan is reported, never needed
        record["plan_error"] = f"{type(error).__name__}: {error}"[:200]
    seconds, tokens, positions, flops, micro_steps = 0.0, 0, 0, 0.0, 0
    for step in range(cli.warmup + cli.steps):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        holder = {}

        def one_step():
            batches, counts = finetune.micro_batches(mixture, plan, step, args, dims, pad_id=0)
            holder.update(finetune.train_step(accelerator, model, optimizer, batches, counts, args), micro=len(batches))

        if cuda and step == cli.warmup:  # the first timed step: count its host syncs (timed as usual)
            record["host_syncs"], record["host_sync_sources"] = count_host_syncs(one_step)
        else:
            one_step()
        if cuda:
            torch.cuda.synchronize()
        if step >= cli.warmup:
            seconds += time.perf_counter() - start
            tokens += holder["tokens"]
            positions += holder["tokens_with_padding"]
            flops += flops_model.step_flops(mixture.lengths[plan.global_batch(step)], holder["trained_tokens"])
            micro_steps += holder["micro"]
    record.update(tokens_per_s=tokens / seconds, positions_per_s=positions / seconds, non_pad=tokens / positions,
                  tflops=flops / seconds / 1e12, micro_steps_per_step=micro_steps / cli.steps,
                  last_loss=holder["train_loss"], seconds_per_step=seconds / cli.steps)
    if cli.peak_tflops:
        record["mfu"] = flops / seconds / (cli.peak_tflops * 1e12)
    if cuda:
        stats = torch.cuda.memory_stats()
        record.update(peak_gb=stats["allocated_bytes.all.peak"] / 1e9, reserved_gb=stats["reserved_bytes.all.peak"] / 1e9,
                      alloc_retries=stats["num_alloc_retries"])
        if "plan_gb" in record:
            record["plan_error_pct"] = 100 * (record["plan_gb"] - record["peak_gb"]) / record["peak_gb"]
    del model, optimizer
    accelerator.free_memory()
    gc.collect()
    return record


def run_single(row: Row, model_dir: Path, cli) -> dict:
    shape = TINY if cli.tiny else LLAMA_1B
    mixture = SyntheticMixture(cli.examples, shape["vocab_size"], MAX_SEQ_LENGTH)
    from open_instruct.finetune import configure_cuda_allocator

    configure_cuda_allocator()  # as the trainer does, before the first CUDA allocation
    if cli.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    try:
        return run_row(row, model_dir, mixture, cli)
    except torch.OutOfMemoryError:
        return {"row": row.name, "error": "out of memory",
                "peak_gb": torch.cuda.max_memory_allocated() / 1e9 if cli.device == "cuda" else None}


def row_command(row: str, model_dir: Path, cli) -> list[str]:
    """The command that measures one row in a fresh process (no allocator state, Liger patch or compiled kernel
    carries over); its last stdout line starting with `{` is the row's JSON record."""
    command = [sys.executable, str(Path(__file__).resolve()), "--single", row, "--model_dir", str(model_dir),
               "--steps", str(cli.steps), "--warmup", str(cli.warmup), "--global_batch_size",
               str(cli.global_batch_size), "--padded_batch_size", str(cli.padded_batch_size), "--examples", str(cli.examples),
               "--device", cli.device]
    command += ["--peak_tflops", str(cli.peak_tflops)] if cli.peak_tflops else []
    command += ["--compile_backend", cli.compile_backend]
    return command + (["--tiny"] if cli.tiny else [])


def last_json_line(stdout: str) -> dict | None:
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else None


def peak_tflops_of_device() -> float | None:
    name = torch.cuda.get_device_name()
    return next((value for key, value in PEAK_BF16_TFLOPS.items() if key in name), None)


def format_table(records: list[dict]) -> list[str]:
    """A markdown table of the rows (errors and skips in the notes column)."""
    lines = ["| row | tokens/s | positions/s | non-pad | MFU | TFLOP/s | peak GB | plan GB (error) | host syncs | "
             "micro/step | loss | notes |", "|" + " --- |" * 12]

    def fmt(value, pattern, missing="n/a"):
        return missing if value is None else format(value, pattern)

    for r in records:
        if "tokens_per_s" not in r:
            lines.append(f"| {r['row']} |" + " |" * 10 + f" {r.get('error', 'not run')} |")
            continue
        plan = (f"{r['plan_gb']:.1f} ({r['plan_error_pct']:+.0f}%)" if "plan_error_pct" in r
                else fmt(r.get("plan_gb"), ".2f"))
        lines.append(
            f"| {r['row']} | {r['tokens_per_s']:,.0f} | {r['positions_per_s']:,.0f} | {r['non_pad']:.1%} | "
            f"{fmt(r.get('mfu'), '.1%')} | {r['tflops']:.1f} | {fmt(r.get('peak_gb'), '.1f')} | {plan} | "
            f"{fmt(r.get('host_syncs'), 'd')} | {r['micro_steps_per_step']:.1f} | {r['last_loss']:.3f} | "
            f"{r.get('note', '')} |")
    return lines


def parse_cli(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--rows", dest="row_specs", nargs="+", default=list(DEFAULT_ROWS), metavar="ROW",
                        help="rows to measure, e.g. zero3+liger@8192 (see the module docstring)")
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps per row")
    parser.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first")
    parser.add_argument("--global_batch_size", type=int, default=128, help="examples per optimizer step")
    parser.add_argument("--padded_batch_size", type=int, default=4, help="examples per padded micro-batch")
    parser.add_argument("--examples", type=int, default=4000, help="examples generated")
    parser.add_argument("--peak_tflops", type=float, default=None, help="the GPU's dense bf16 peak (default: known GPUs)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a tiny model instead of the 1.2B one (smoke test)")
    parser.add_argument("--compile_backend", default="inductor",
                        help="torch.compile backend of the compile lever (aot_eager: traced, no kernels built)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--single", help=argparse.SUPPRESS)  # one row, in this process
    parser.add_argument("--model_dir", help=argparse.SUPPRESS)
    cli = parser.parse_args(argv)
    for spec in cli.row_specs + ([cli.single] if cli.single else []):
        try:
            Row.parse(spec)
        except ValueError as error:
            parser.error(str(error))
    if cli.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: this benchmark measures GPU training (use --tiny --device cpu to smoke-test it)")
    if cli.global_batch_size % cli.padded_batch_size:
        parser.error("--global_batch_size must be a multiple of --padded_batch_size")
    if cli.device == "cuda":
        cli.peak_tflops = cli.peak_tflops or peak_tflops_of_device()
    return cli


def main(argv: list[str] | None = None) -> None:
    cli = parse_cli(argv)
    if cli.single:
        with tempfile.TemporaryDirectory(prefix="bench-gpu-run-") as work:
            cli.work_dir = work
            print(json.dumps(run_single(Row.parse(cli.single), Path(cli.model_dir), cli)), flush=True)
        return
    records = []
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as work:
        model_dir = build_model_dir(Path(work) / "model", TINY if cli.tiny else LLAMA_1B)
        for spec in cli.row_specs:
            done = subprocess.run(row_command(spec, model_dir, cli), stdout=subprocess.PIPE, text=True)
            record = last_json_line(done.stdout) or {"row": spec, "error": f"exit {done.returncode}"}
            print(json.dumps(record), flush=True)
            records.append(record)
    print("\n".join(format_table(records)))
    if cli.json:
        Path(cli.json).write_text(json.dumps(records, indent=2))


if __name__ == "__main__":
    main()
