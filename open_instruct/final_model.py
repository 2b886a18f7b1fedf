"""The run's final model in Hugging Face format: the full model, or with LoRA the adapter (and the merged model).

Files are written to a temporary folder and moved next to the run's logs only when complete. Free space for them
is checked before training starts and again just before the save (`check_room`); a write that fails anyway (a full
disk, a quota) is a StorageError on every rank, naming the folder, the free space and the newest intact checkpoint,
and leaves no temporary folder behind.
"""

from __future__ import annotations

from pathlib import Path

from open_instruct.args import uses_lora
from open_instruct.chat_templates import set_generation_stops
from open_instruct.checkpointing import newest_intact_description
from open_instruct.flops import parameter_numel
from open_instruct.lora import save_adapter, save_merged
from open_instruct.model_utils import ChunkedLossModel
from open_instruct.ranks import main_process_work
from open_instruct.storage import StorageError, failed_write, free_space_problem, move_files_into, remove

FINAL_TMP = ".final_model.tmp"
SPACE_MARGIN = 1.05  # config, tokenizer and safetensors headers on top of the tensors' bytes


def final_model_bytes(args, model) -> int:
    """About how many bytes the final save writes: the weights in the dtype they are saved in (16-bit under
    DeepSpeed bf16, else the training dtype); with LoRA the fp32 adapters, plus the merged model in the base's
    dtype with --merge_lora_on_save."""
    parameters = list(model.parameters())
    if not uses_lora(args):
        return int(sum(parameter_numel(p) * p.element_size() for p in parameters) * SPACE_MARGIN)
    adapters = sum(parameter_numel(p) * 4 for p in parameters if p.requires_grad)
    merged = sum(parameter_numel(p) * 2 for p in parameters) if args.merge_lora_on_save else 0  # bf16 bases
    return int((adapters + merged) * SPACE_MARGIN)


def check_room(accelerator, args, model, output: Path) -> None:
    """Refuse to go on when the disk of the output directory cannot hold the final model (every rank calls it)."""
    needed = final_model_bytes(args, model)

    def check() -> None:
        problem = free_space_problem(output, needed, "the final model")
        if problem:
            raise StorageError(f"{problem}. {newest_intact_description(output)}. Free space (or choose another "
                               "--output_dir for a new run) and run the same command again.")

    main_process_work(accelerator, check, (StorageError,), lambda: StorageError("The main process found too little "
                                                                                "disk space for the final model."))


def save_final(args, accelerator, model, tokenizer, output: Path) -> None:
    """The full model in Hugging Face format; with LoRA the adapter instead, and the merged model when asked."""
    if not uses_lora(args):
        save_final_model(accelerator, model, tokenizer, output)
        return
    save_adapter(accelerator, model, tokenizer, output)
    if args.merge_lora_on_save:
        main_process_work(accelerator, lambda: save_merged(args, tokenizer, output), (StorageError,),
                          lambda: StorageError("The main process could not write the merged model."))


def save_final_model(accelerator, model, tokenizer, output_dir: str | Path, max_shard_size: str = "5GB") -> None:
    """Write config, safetensors weights (gathered from ZeRO-3 shards), tokenizer and generation config."""
    output = Path(output_dir)
    state_dict = accelerator.get_state_dict(model)  # a collective under ZeRO-3: every rank must call it

    def write() -> None:
        unwrapped = accelerator.unwrap_model(model)
        weights = state_dict
        if isinstance(unwrapped, ChunkedLossModel):  # save the Hugging Face model, not the training wrapper
            unwrapped = unwrapped.lm
            weights = {key.removeprefix("lm."): value for key, value in state_dict.items()}
        unwrapped.config.use_cache = True  # gradient checkpointing turned it off for training only
        set_generation_stops(unwrapped.generation_config, tokenizer)
        tmp = output / FINAL_TMP
        remove(tmp)
        with failed_write("the final model", output, lambda: newest_intact_description(output), cleanup=tmp):
            unwrapped.save_pretrained(tmp, state_dict=weights, safe_serialization=True, max_shard_size=max_shard_size)
            tokenizer.save_pretrained(tmp)
            move_files_into(tmp, output)

    main_process_work(accelerator, write, (StorageError,),
                      lambda: StorageError(f"The main process could not write the final model to {output}."))
