"""What resuming on another layout costs: a 2-process ZeRO-3 checkpoint resumed on 1 process, for the tiny model
and a wider one, with the conversion's time, the checkpoint's and the conversion's sizes and the universal load's
time, as the trainer logs them.

    python benchmarks/elastic_resume.py --work_dir /tmp/elastic-bench            (tiny model, then ~100M parameters)
    python benchmarks/elastic_resume.py --work_dir /tmp/elastic-bench --sizes 128x4

Sizes are HIDDENxLAYERS of the embedded Llama config (intermediate = 3 x hidden, head_dim 32, vocab 272). Each size
trains 1 step on 2 processes (fp32 ZeRO-3, gloo on CPU) with a checkpoint, then resumes it on 1 process for 1 more
step. The last lines extrapolate the measured conversion throughput (checkpoint bytes per second) to an 8B model:
an estimate, not a measurement (see docs/benchmarks.md for what it leaves out).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ZERO3 = REPO / "configs" / "ds_configs" / "stage3_no_offloading_accelerate.conf"
LLAMA_8B_PARAMETERS = 8.03e9


def build_model(work: Path, hidden: int, layers: int) -> Path:
    config = json.loads((REPO / "open_instruct" / "assets" / "tiny_llama.json").read_text())
    config.update(hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                  num_attention_heads=hidden // 32, num_key_value_heads=max(1, hidden // 64))
    config_path = work / f"config-{hidden}x{layers}.json"
    config_path.write_text(json.dumps(config))
    model_dir = work / f"model-{hidden}x{layers}"
    subprocess.run([sys.executable, "-m", "open_instruct.tiny_model", str(model_dir), "--config",
                    str(config_path)], check=True, capture_output=True)
    return model_dir


def train(model_dir: Path, output: Path, processes: int, steps: int) -> str:
    launcher = [str(Path(sys.executable).parent / "accelerate"), "launch", "--num_processes", str(processes),
                "--use_deepspeed", "--deepspeed_config_file", str(ZERO3), "-m", "open_instruct.finetune"]
    args = ["--model_name_or_path", str(model_dir), "--output_dir", str(output), "--dataset_mixer_list",
            "synthetic:spelling", "64", "--global_batch_size", "8", "--max_train_steps", str(steps),
            "--checkpointing_steps", "1", "--keep_last_n_checkpoints", "2", "--seed", "1",
            "--dataset_local_cache_dir", str(output.parent / "cache")]
    result = subprocess.run([*launcher, *args], cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"training failed:\n{result.stderr[-3000:]}")
    return result.stderr


def measure(work: Path, hidden: int, layers: int) -> dict:
    model_dir = build_model(work, hidden, layers)
    output = work / f"run-{hidden}x{layers}"
    train(model_dir, output, processes=2, steps=1)
    log = train(model_dir, output, processes=1, steps=2)  # resumes step_1 on another layout
    converted = re.search(r"Converted step_1 \(.*?, ([\d.]+ [KMGT]?B)\) to a universal checkpoint in ([\d.]+) s: .*? "
                          r"\(([\d.]+ [KMGT]?B)\)", log)
    loaded = re.search(r"loaded its universal conversion in ([\d.]+) s", log)
    if not converted or not loaded:
        sys.exit(f"the resumed run did not log a conversion:\n{log[-3000:]}")
    checkpoint_bytes = sum(p.stat().st_size for p in (output / "checkpoints" / "step_1").rglob("*") if p.is_file())
    parameters = json.loads((output / "summary.json").read_text())["trainable_parameters"]
    return {"size": f"{hidden}x{layers}", "parameters": parameters, "checkpoint_bytes": checkpoint_bytes,
            "checkpoint": converted.group(1), "universal": converted.group(3),
            "convert_s": float(converted.group(2)), "load_s": float(loaded.group(1))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", required=True)
    parser.add_argument("--sizes", nargs="+", default=["128x4", "1024x8"])
    args = parser.parse_args()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in args.sizes:
        hidden, layers = (int(part) for part in size.split("x"))
        row = measure(work, hidden, layers)
        rows.append(row)
        print(f"{row['size']:>8}  {row['parameters'] / 1e6:8.2f}M parameters  checkpoint {row['checkpoint']:>9}  "
              f"conversion {row['universal']:>9} in {row['convert_s']:6.1f} s  universal load {row['load_s']:5.1f} s",
              flush=True)
    largest = max(rows, key=lambda row: row["checkpoint_bytes"])
    rate = largest["checkpoint_bytes"] / largest["convert_s"]
    per_parameter = largest["checkpoint_bytes"] / largest["parameters"]
    estimate_bytes = LLAMA_8B_PARAMETERS * per_parameter
    print(f"conversion throughput at {largest['size']}: {rate / 1e6:.0f} MB/s of checkpoint "
          f"({per_parameter:.1f} bytes per parameter in an fp32 ZeRO-3 checkpoint)")
    print(f"estimate for 8B parameters at that rate: checkpoint {estimate_bytes / 1e9:.0f} GB, conversion "
          f"{estimate_bytes / rate / 60:.0f} min (an extrapolation, not a measurement)")


if __name__ == "__main__":
    main()
