"""Saving: training-state checkpoints (all ranks, crash-safe rename) and the final Hugging Face model."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

COMPLETED_MARKER = "COMPLETED"


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step_{step}"


def save_training_state(accelerator, output_dir: str | Path, step: int) -> Path:
    """accelerator.save_state into a temporary folder, renamed into place once every rank has written its part.

    A crash mid-save leaves only `step_N.tmp`, never a `step_N` that looks complete.
    """
    final = checkpoint_dir(output_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / COMPLETED_MARKER).write_text(json.dumps({"step": step}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final


def save_final_model(accelerator, model, tokenizer, output_dir: str | Path) -> None:
    """Write config, safetensors weights (gathered from ZeRO-3 shards), tokenizer and generation config.

    Files are written to a temporary folder first and moved next to the run's logs only when complete.
    """
    from open_instruct.model_utils import ChunkedLossModel

    output = Path(output_dir)
    state_dict = accelerator.get_state_dict(model)  # a collective under ZeRO-3: every rank must call it
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        if isinstance(unwrapped, ChunkedLossModel):  # save the Hugging Face model, not the training wrapper
            unwrapped = unwrapped.lm
            state_dict = {key.removeprefix("lm."): value for key, value in state_dict.items()}
        unwrapped.config.use_cache = True  # gradient checkpointing turned it off for training only
        generation = unwrapped.generation_config
        if generation.eos_token_id is None:
            generation.eos_token_id = tokenizer.eos_token_id
        if generation.pad_token_id is None:
            generation.pad_token_id = tokenizer.pad_token_id
        tmp = output / ".final_model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True, max_shard_size="5GB")
        tokenizer.save_pretrained(tmp)
        for file in tmp.iterdir():
            os.replace(file, output / file.name)
        tmp.rmdir()
    accelerator.wait_for_everyone()
