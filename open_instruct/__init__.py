"""open-instruct-style SFT: the trainer (open_instruct.finetune) and what it is made of; `open-instruct-sft --help`."""

import os
from pathlib import Path


def _no_gpu_driver() -> bool:
    """Neither NVIDIA's nor AMD's driver is loaded, or CUDA_VISIBLE_DEVICES hides every GPU (no torch import: this
    runs on every import of the package)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return True
    nvidia = Path("/proc/driver/nvidia/gpus")
    return not (nvidia.is_dir() and any(nvidia.iterdir())) and not Path("/dev/kfd").exists()


# Without a GPU, DeepSpeed (imported by accelerate) guesses the CPU and warns "Setting accelerator to CPU. If you
# have GPU ..." on every import, in every process: say it instead. An explicit DS_ACCELERATOR is kept.
if "DS_ACCELERATOR" not in os.environ and _no_gpu_driver():
    os.environ["DS_ACCELERATOR"] = "cpu"
