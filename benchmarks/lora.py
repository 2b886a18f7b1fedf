"""LoRA against full fine-tuning on the same model and data: trainable parameters, peak memory and step time, side by
side in one run of this script.

    .venv/bin/python benchmarks/lora.py                          # the tiny model and a 25M-parameter one (CPU: ~3 min)
    .venv/bin/python benchmarks/lora.py --models small --steps 40 --json output/lora.json

Each configuration is one `python -m open_instruct.finetune` process (a fresh process, so peak memory is its own):
`--max_train_steps --steps` on `synthetic:spelling`, 16 examples per step, padding-free, lr 1e-3, no checkpoints.
Configurations: full (every weight); lora (rank 64, alpha 16, dropout 0.1 on every linear projection: the
trainer's defaults, a large rank for these small models: 64 of hidden 128 or 512); lora-r8 (rank 8); lora-r8-p0
(rank 8, no dropout: dropout keeps a dropped copy of each adapted layer's input for the backward); lora-r8+gc
(with --gradient_checkpointing); and on CUDA qlora (rank 16, 4-bit NF4 base).
Reported from each run's summary.json: trainable parameters, peak memory (CUDA: max allocated; CPU: the process's
peak resident set, which includes Python and torch themselves, about 0.5 GB), seconds per optimizer step (training
time / steps, the first steps included) and the last train loss; and each configuration's ratio to full.

Models: `tiny` is the embedded test model (0.9M parameters); `small` is the same architecture at hidden 512,
8 layers, 8 heads (4 key-value), MLP 1536 (25.4M parameters), built from a config here with random weights.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from open_instruct.tiny_model import build_tiny_model, default_config_path  # noqa: E402

SMALL = {"hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 4,
         "intermediate_size": 1536, "head_dim": 64}
CONFIGS = {
    "full": [],
    "lora": ["--use_lora"],  # the defaults: rank 64, alpha 16, dropout 0.1
    "lora-r8": ["--use_lora", "--lora_rank", "8"],
    "lora-r8-p0": ["--use_lora", "--lora_rank", "8", "--lora_dropout", "0"],
    "lora-r8+gc": ["--use_lora", "--lora_rank", "8", "--gradient_checkpointing"],
    "qlora": ["--use_qlora", "--lora_rank", "16"],  # CUDA only
}


def build_model(name: str, root: Path) -> Path:
    if name == "tiny":
        return build_tiny_model(root / "tiny")
    config = {**json.loads(default_config_path().read_text()), **SMALL}
    path = root / "small.json"
    path.write_text(json.dumps(config))
    return build_tiny_model(root / "small", config_path=path)


def run(model_dir: Path, flags: list[str], steps: int, output: Path, cache: Path) -> dict:
    command = [sys.executable, "-m", "open_instruct.finetune", "--model_name_or_path", str(model_dir),
               "--dataset_mixer_list", "synthetic:spelling", "2000", "--per_device_train_batch_size", "16",
               "--max_train_steps", str(steps), "--learning_rate", "1e-3", "--warmup_ratio", "0", "--seed", "1",
               "--logging_steps", str(steps), "--output_dir", str(output), "--dataset_local_cache_dir", str(cache),
               *flags]
    env = {key: value for key, value in os.environ.items() if key not in ("HF_TOKEN", "WANDB_API_KEY")}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    summary = json.loads((output / "summary.json").read_text())
    return {"trainable_parameters": summary["trainable_parameters"], "peak_memory_gb": summary["peak_memory_gb"],
            "seconds_per_step": summary["train_seconds"] / summary["steps"], "last_train_loss": summary["last_train_loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--models", nargs="+", default=["tiny", "small"], choices=["tiny", "small"])
    parser.add_argument("--configs", nargs="+", default=None, choices=list(CONFIGS))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--json", default=None, help="Also write the figures here.")
    args = parser.parse_args()
    configs = args.configs or [c for c in CONFIGS if c != "qlora" or torch.cuda.is_available()]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{platform.machine()} CPU, {os.cpu_count()} cores"
    print(f"device: {device}; torch {torch.__version__}; {args.steps} steps of 16 examples each")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for model in args.models:
            model_dir = build_model(model, root)
            for config in configs:
                results[(model, config)] = run(model_dir, CONFIGS[config], args.steps, root / f"{model}-{config}",
                                               root / "cache")
            full = results.get((model, "full"))
            print(f"\n{model} model")
            print(f"  {'config':<11} {'trainable':>12} {'peak GB':>8} {'s/step':>8} {'last loss':>9}  vs full: "
                  "trainable, memory, step time")
            for config in configs:
                r = results[(model, config)]
                ratios = "" if not full else (
                    f"  {r['trainable_parameters'] / full['trainable_parameters']:.3f}x, "
                    f"{r['peak_memory_gb'] / full['peak_memory_gb']:.2f}x, {r['seconds_per_step'] / full['seconds_per_step']:.2f}x")
                print(f"  {config:<11} {r['trainable_parameters']:>12,} {r['peak_memory_gb']:>8.2f} "
                      f"{r['seconds_per_step']:>8.3f} {r['last_train_loss']:>9.3f}{ratios}")
    if args.json:
        Path(args.json).write_text(json.dumps({f"{m}/{c}": r for (m, c), r in results.items()}, indent=2))


if __name__ == "__main__":
    main()
