"""Wall-time plan of a fine-tuning run, printed by mason before a job is submitted: step time, tokens/s per GPU, the
whole run's wall time and which term dominates, so a user learns before paying for the GPUs whether the job is
bound by compute (MFU is the lever) or by communication (fewer, fuller micro-steps are). Every figure
is an estimate.

    work = workload(args, DataCounts.of_lengths(mixture.lengths, mixture.trained_lengths, "cache"), world_size=64)
    rate = compute_rate("H100", configuration(args, zero_stage=3), num_params, assumed_mfu=0.35, rows=load_table())
    plan = plan_time(flops_model(config), num_params, work, world_size=64, stage=3, rate=rate,
                     link=link_bandwidth("H100", num_nodes=8, network_gbps=400))
    print(plan.format())

Compute: the run's model FLOPs (flops.FlopsModel: 6 x block parameters x tokens + 6 x vocab x hidden x trained tokens
+ 6 x layers x attention width x the sum of squared example lengths; recomputation and padding not counted) over the
world's GPUs at a per-GPU rate: the datasheet peak (flops.PEAK_BF16_TFLOPS) times the MFU measured for this GPU and
trainer configuration on the nearest model size (assets/gpu_throughput.json, within MAX_SHAPE_RATIO of the
parameter count), else times an assumed MFU (mason's --assumed_mfu).

Communication: bytes one GPU sends per optimizer step, for P parameters on n GPUs; a ring collective moves (n-1)/n
of its volume through each GPU, and a value is 2 B (bf16 under DeepSpeed) or 4 B (DDP's fp32 gradients):
  ZeRO-3  every micro-step all-gathers the weights twice (forward, backward) and reduce-scatters the gradients once:
          micro_steps x 3 x 2 B x P x (n-1)/n. Gradient checkpointing's recomputed forward is assumed to reuse the
          backward's gather (it runs just before that module's backward, while the weights are gathered).
  ZeRO-2  a reduce-scatter of the gradients every micro-step (its backward hooks reduce as gradients are ready) and
          one all-gather of the updated weights: (micro_steps + 1) x 2 B x P x (n-1)/n
  ZeRO-1  one reduce-scatter and one all-gather per step: 2 x 2 B x P x (n-1)/n
  DDP     one all-reduce (a reduce-scatter and an all-gather) of the gradients per step: 2 x 4 B x P x (n-1)/n
through the slowest link a collective crosses: NVLink (or PCIe) within one node; with several nodes each GPU's
network port (mason's --network_gbps), which every ring spanning the nodes crosses.

Step time: from max(compute, communication), with all communication hidden behind compute (DeepSpeed's overlap_comm
and prefetching at their best), to compute + communication, with none hidden. Not counted: start-up, checkpoint
saves, evaluation, data loading, the optimizer's own step, stragglers; link bandwidths are nominal (NCCL reaches
less), so the communication term leans low.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from open_instruct.args import FinetuneArgs, global_batch_examples
from open_instruct.flops import PEAK_BF16_TFLOPS, FlopsModel

TABLE_PATH = Path(__file__).parent / "assets" / "gpu_throughput.json"
# A measured row stands for a model at most this many times larger or smaller: MFU grows with the matrices' sizes.
MAX_SHAPE_RATIO = 2.0
# Assumed MFU where nothing was measured: torchtitan's Llama-3.1-8B on H100 reaches 33-39%; ours measured 19-28% on a
# 1.2B model on one H100 (docs/benchmarks.md). Stated in every plan that uses it.
DEFAULT_ASSUMED_MFU = 0.35
# One GPU's bandwidth to the other GPUs of its node, one direction, GB/s, nominal (datasheets), and the link's name.
# NVLink 4 (H100/H200 SXM): 900 GB/s both directions together; NVLink 3 (A100 SXM): 600. Without an NVLink switch
# the GPUs of a node talk over PCIe: Gen5 x16 ~64 GB/s (H100 PCIe; H100 NVL's bridge joins pairs only), Gen4 ~32.
INTRA_NODE = {"H100 PCIe": (64.0, "PCIe 5"), "H100 NVL": (64.0, "PCIe 5"), "H100": (450.0, "NVLink 4"),
              "H200": (450.0, "NVLink 4"), "A100": (300.0, "NVLink 3"), "L40S": (32.0, "PCIe 4")}
# Between nodes: one 400 Gb/s InfiniBand NDR (or RoCE) port per GPU, the usual H100 cluster: 50 GB/s per GPU.
DEFAULT_NETWORK_GBPS = 400.0


# ----------------------------------------------------------------------------------------------------------------
# What the run trains on
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DataCounts:
    """One epoch of training data: examples, tokens, trained tokens (positions with a loss: the output layer's
    FLOPs), the sum of squared example lengths (attention's FLOPs), and where the figures come from."""

    examples: int
    tokens: float
    trained_tokens: float
    sum_squares: float
    source: str

    @classmethod
    def of_lengths(cls, lengths, trained_lengths, source: str) -> DataCounts:
        lengths = np.asarray(lengths, dtype=np.float64)
        return cls(len(lengths), float(lengths.sum()), float(np.sum(trained_lengths)), float((lengths ** 2).sum()),
                   source)

    @classmethod
    def assumed(cls, examples: int, tokens_per_example: float, source: str) -> DataCounts:
        """Only a count and a mean length: every token is counted as trained (the output layer's FLOPs: an upper
        bound) and every example as of the mean length (attention's sum of squares: a lower bound)."""
        tokens = examples * tokens_per_example
        return cls(examples, tokens, tokens, examples * tokens_per_example ** 2, source)


@dataclass(frozen=True)
class Workload:
    """One optimizer step of the run, on average, and how many there are."""

    steps: int
    tokens: float  # per step, all GPUs
    trained_tokens: float
    sum_squares: float
    micro_steps: int  # forward and backward passes per GPU per step: ZeRO-3 gathers the weights in each
    description: str


def workload(args: FinetuneArgs, counts: DataCounts, world_size: int) -> Workload:
    """The steps a run of `args` on `world_size` processes takes over `counts` (as finetune.make_plan: whole global
    batches per epoch, or --max_train_steps), each an average global batch of the data."""
    mean_length = counts.tokens / counts.examples
    batch = global_batch_examples(args, world_size) or args.global_batch_tokens / mean_length
    examples = counts.examples * (1.0 - (args.eval_fraction or 0.0))  # --eval_fraction holds out about that share
    steps = args.max_train_steps or args.num_train_epochs * int(examples // batch)
    if steps == 0:
        raise ValueError(f"{examples:,.0f} training examples make less than one global batch ({batch:,.0f})")
    per_step = [total * batch / counts.examples for total in (counts.tokens, counts.trained_tokens,
                                                               counts.sum_squares)]  # an average global batch
    span = (f"--max_train_steps {steps:,}" if args.max_train_steps
            else f"{args.num_train_epochs} epoch(s) of {examples:,.0f} examples")
    description = (f"{steps:,} steps of {batch:,.0f} examples, {steps * per_step[0] / 1e9:.3g}B tokens in all "
                   f"({span}, {mean_length:,.0f} tokens each on average; {counts.source})")
    return Workload(steps, *per_step, micro_steps(args, per_step[0], world_size), description)


def micro_steps(args: FinetuneArgs, tokens_per_step: float, world_size: int) -> int:
    """Micro-steps per optimizer step: --gradient_accumulation_steps, or with --max_tokens_per_micro_batch as many
    packed rows as a replica's share of the tokens fills (best-fit-decreasing packs them nearly full)."""
    if args.padding_free and args.max_tokens_per_micro_batch:
        replicas = world_size // args.sequence_parallel_size
        return max(1, math.ceil(tokens_per_step / replicas / args.max_tokens_per_micro_batch))
    return args.gradient_accumulation_steps


# ----------------------------------------------------------------------------------------------------------------
# Compute rate and links
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rate:
    flops_per_s: float  # model FLOPs per second of one GPU
    description: str


@dataclass(frozen=True)
class Link:
    bytes_per_s: float  # one GPU's share of a collective, one direction
    description: str


# The levers of a configuration, in the order benchmarks/gpu_throughput.py spells its rows (zero3+liger+compile@N).
CONFIG_LEVERS = ("liger", "flce", "compile", "gc", "lora", "qlora", "padded")


def config_key(base: str, levers) -> str:
    """A throughput-table key: `base` (zero3: DeepSpeed ZeRO-3; single: no DeepSpeed) and its levers in order."""
    return "+".join([base, *(lever for lever in CONFIG_LEVERS if lever in levers)])


def configuration(args: FinetuneArgs, zero_stage: int | None) -> str:
    """The trainer configuration as benchmarks/gpu_throughput.py names its rows, less the row budget (the table's
    key). ZeRO stages 1-2 have no measured rows: their key matches none, so the plan assumes an MFU."""
    base = "single" if zero_stage is None else f"zero{zero_stage}"
    flags = {"liger": args.use_liger_kernel, "compile": getattr(args, "torch_compile", False),
             "gc": args.gradient_checkpointing, "lora": args.use_lora and not args.use_qlora,
             "qlora": args.use_qlora, "padded": not args.padding_free}
    return config_key(base, [lever for lever, on in flags.items() if on])


def load_table(path: str | Path = TABLE_PATH) -> list[dict]:
    """The measured rows (gpu, shape, params, config, mfu, source) of a throughput table."""
    return json.loads(Path(path).read_text())["rows"]


def nearest_measured(rows: list[dict], gpu_kind: str, config: str, params: int) -> dict | None:
    """The row of this GPU and configuration whose model size is nearest to `params` (by ratio), if within
    MAX_SHAPE_RATIO."""
    ratio = lambda row: max(row["params"], params) / min(row["params"], params)  # noqa: E731
    fits = [r for r in rows if r["gpu"] == gpu_kind and r["config"] == config and ratio(r) <= MAX_SHAPE_RATIO]
    return min(fits, key=ratio, default=None)


def compute_rate(gpu_kind: str, config: str, params: int, assumed_mfu: float, rows: list[dict]) -> Rate:
    """The datasheet peak times a measured MFU (the nearest row of the table), else times the assumed one."""
    tflops = PEAK_BF16_TFLOPS[gpu_kind]
    peak = f"{gpu_kind} datasheet {tflops:g} TFLOP/s dense bf16"
    row = nearest_measured(rows, gpu_kind, config, params)
    if row is not None:
        return Rate(tflops * 1e12 * row["mfu"], f"MFU {row['mfu']:.1%} measured on {row['shape']} ({config}) x "
                                                f"{peak}; {row['source']}")
    return Rate(tflops * 1e12 * assumed_mfu,
                f"MFU {assumed_mfu:.0%} assumed (--assumed_mfu; no measured {gpu_kind} row for {config} within "
                f"{MAX_SHAPE_RATIO:g}x of {params / 1e9:.2f}B parameters) x {peak}")


def link_bandwidth(gpu_kind: str, num_nodes: int, network_gbps: float) -> Link:
    """The slowest link a collective over the job crosses: the node's NVLink/PCIe, or with several nodes the
    network port of each GPU when that is slower."""
    gbytes, name = INTRA_NODE[gpu_kind]
    if num_nodes == 1:
        return Link(gbytes * 1e9, f"{name} within the node, {gbytes:g} GB/s")
    network = network_gbps / 8
    if network >= gbytes:
        return Link(gbytes * 1e9, f"{name}, {gbytes:g} GB/s (slower than the network's {network:g} GB/s per GPU)")
    return Link(network * 1e9, f"the network between nodes, {network_gbps:g} Gb/s = {network:g} GB/s per GPU "
                               f"(--network_gbps; {name} {gbytes:g} GB/s within a node)")


def transfers(stage: int | None, micro_steps: int) -> tuple[int, str]:
    """Parameter-sized collectives per optimizer step under ZeRO `stage` (None: DDP), and what they are."""
    if stage == 3:
        return 3 * micro_steps, (f"ZeRO-3, {micro_steps} micro-step(s) x (2 weight all-gathers + 1 gradient "
                                 "reduce-scatter)")
    if stage == 2:
        return micro_steps + 1, f"ZeRO-2, {micro_steps} gradient reduce-scatter(s) + 1 weight all-gather"
    if stage == 1:
        return 2, "ZeRO-1, 1 gradient reduce-scatter + 1 weight all-gather"
    return 2, f"{'DDP' if stage is None else 'ZeRO-0'}, 1 gradient all-reduce (a reduce-scatter + an all-gather)"


def comm_bytes_per_step(params: int, world_size: int, stage: int | None, micro_steps: int, value_bytes: int) -> float:
    """Bytes one GPU sends per optimizer step (see the module docstring)."""
    count, _ = transfers(stage, micro_steps)
    return count * value_bytes * params * (world_size - 1) / world_size


# ----------------------------------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PublishedRun:
    """A run someone published the wall time of, and the settings that make a job the same one."""

    name: str
    model: str  # the model's name: a hub repo's last part, or a local copy's folder
    dataset: str  # trained once whole (--dataset_mixer_list <dataset> 1.0)
    epochs: int
    max_seq_length: int
    global_batch: int  # examples
    gpus: int
    gpu_kind: str
    hours: float


PUBLISHED_RUNS = (
    # ../shared/research/peers.md: open-instruct's recipe, 8 nodes x 8 H100, ZeRO-3, 939,343 rows, ~8.8 h wall.
    PublishedRun("open-instruct's published Tulu-3 8B SFT", "Llama-3.1-8B", "allenai/tulu-3-sft-mixture", 2, 4096,
                 128, 64, "H100", 8.8),
)


def published_run(args: FinetuneArgs, world_size: int, gpu_kind: str) -> PublishedRun | None:
    """The published run this job repeats (model, whole dataset, epochs, length, global batch, GPUs), if any."""
    for run in PUBLISHED_RUNS:
        if (Path(args.model_name_or_path).name == run.model and args.dataset_mixer_list == [run.dataset, "1.0"]
                and args.max_train_steps is None and args.num_train_epochs == run.epochs
                and args.max_seq_length == run.max_seq_length and world_size == run.gpus
                and global_batch_examples(args, world_size) == run.global_batch and gpu_kind == run.gpu_kind):
            return run
    return None


@dataclass
class TimePlan:
    """Seconds per optimizer step of compute and of communication, and what the figures assume."""

    steps: int
    tokens_per_step: float
    world_size: int
    compute_seconds: float
    comm_seconds: float
    data: str
    compute: str
    communication: str
    reference: PublishedRun | None = None

    @property
    def step_seconds(self) -> tuple[float, float]:
        """(all communication hidden behind compute, none hidden)."""
        return max(self.compute_seconds, self.comm_seconds), self.compute_seconds + self.comm_seconds

    @property
    def wall_seconds(self) -> tuple[float, float]:
        return tuple(self.steps * s for s in self.step_seconds)

    @property
    def tokens_per_second_per_gpu(self) -> tuple[float, float]:
        """(at the slower step, at the faster one)."""
        return tuple(self.tokens_per_step / self.world_size / s for s in reversed(self.step_seconds))

    @property
    def dominant(self) -> str:
        return "communication" if self.comm_seconds > self.compute_seconds else "compute"

    def format(self) -> str:
        (fast, slow), (low, high) = self.step_seconds, self.wall_seconds
        lines = [
            ("data", self.data),
            ("compute", f"{self.compute_seconds:.3g} s/step: {self.compute}"),
            ("communication", f"{self.comm_seconds:.3g} s/step: {self.communication}"),
            ("step", f"{fast:.3g} s (communication all hidden behind compute) to {slow:.3g} s (none hidden)"),
            ("tokens/s/GPU", "{:,.0f} to {:,.0f}".format(*self.tokens_per_second_per_gpu)),
            ("wall time", f"{duration(low)} to {duration(high)} for {self.steps:,} steps (start-up, checkpoint saves "
                          "and evaluation not counted)"),
            ("dominant", f"{self.dominant}: {max(self.compute_seconds, self.comm_seconds):.3g} s/step against "
                         f"{min(self.compute_seconds, self.comm_seconds):.3g} s of {self._other}; {self._lever}"),
        ]
        text = [f"  {name:<13}  estimate: {value}" for name, value in lines]
        if self.reference:
            run = self.reference
            text.append(f"  {'published':<13}  {run.name}: about {run.hours:g} h on {run.gpus} {run.gpu_kind}; our "
                        f"estimate for the same job: {duration(low)} to {duration(high)}")
        return "time plan (an estimate, like every figure in it):\n" + "\n".join(text)

    @property
    def _other(self) -> str:
        return "compute" if self.dominant == "communication" else "communication"

    @property
    def _lever(self) -> str:
        if self.dominant == "compute":
            return "MFU is the lever (padding-free rows, --use_liger_kernel)"
        return ("fewer, fuller micro-steps (--max_tokens_per_micro_batch) or fewer steps (a larger global batch) "
                "shorten it")


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def plan_time(flops: FlopsModel, params: int, work: Workload, *, world_size: int, stage: int | None, rate: Rate,
              link: Link, value_bytes: int = 2) -> TimePlan:
    """The time plan of `work` on `world_size` GPUs at `rate` each, with collectives of ZeRO `stage` (None: DDP)
    over `link` (see the module docstring for the formulas)."""
    step_flops = flops.flops(work.tokens, work.trained_tokens, work.sum_squares)
    compute = step_flops / (world_size * rate.flops_per_s)
    volume = comm_bytes_per_step(params, world_size, stage, work.micro_steps, value_bytes)
    _, what = transfers(stage, work.micro_steps)
    communication = (f"{volume / 1e9:.3g} GB sent per GPU per step ({what}; {value_bytes} B x "
                     f"{params / 1e9:.2f}B parameters x {world_size - 1}/{world_size}) over {link.description}"
                     if world_size > 1 else "none (one GPU)")
    return TimePlan(work.steps, work.tokens, world_size, compute, volume / link.bytes_per_s, work.description,
                    f"{step_flops:.3g} model FLOPs per step at {rate.flops_per_s / 1e12:.0f} TFLOP/s per GPU "
                    f"({rate.description})", communication)
