"""LoRA and QLoRA on the same trainer: peft adapters on a frozen base (4-bit NF4 through bitsandbytes for QLoRA).

    python -m open_instruct.finetune ... --use_lora --lora_rank 16 --lora_alpha 32 --merge_lora_on_save
    python -m open_instruct.finetune ... --use_qlora --lora_rank 16        # CUDA only

The trainer calls `check_lora_setup` before any work (QLoRA's hardware and packages), `load_with_adapters` to load the
base and add the adapters, `adapter_learning_rates` through optim.build_optimizer (the adapters' own LR), and at the end `save_adapter`
(and `save_merged` with --merge_lora_on_save) instead of the full-model save. Everything else (packing, the loss, ZeRO,
checkpoints, evaluation) sees an ordinary module whose trainable parameters are the adapters.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from pathlib import Path

import torch

from open_instruct.args import uses_lora
from open_instruct.chat_templates import set_generation_stops
from open_instruct.checkpointing import newest_intact_description
from open_instruct.model_utils import ModelSetupError, load_model
from open_instruct.ranks import main_process_work
from open_instruct.storage import StorageError, failed_write, move_files_into, remove, replace_folder

logger = logging.getLogger(__name__)
ALL_LINEAR = "all-linear"  # peft: every nn.Linear of the model except the output layer
MERGED_DIR = "merged"


# ----------------------------------------------------------------------------------------------------------------
# Checks before anything loads
# ----------------------------------------------------------------------------------------------------------------
def check_lora_setup(args, deepspeed: bool) -> None:
    """QLoRA needs CUDA and bitsandbytes, and runs without DeepSpeed: say so before data or the model load."""
    if not args.use_qlora:
        return
    if not torch.cuda.is_available():
        raise ModelSetupError("--use_qlora needs a CUDA GPU: bitsandbytes' 4-bit NF4 kernels run only there. On this "
                              "machine use --use_lora (LoRA on a full-precision base).")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelSetupError("--use_qlora needs the bitsandbytes package: pip install bitsandbytes")
    if deepspeed:
        raise ModelSetupError("--use_qlora runs on one process or under DDP, not under DeepSpeed (its 4-bit weights "
                              "are not partitioned by ZeRO here): launch without --use_deepspeed.")


def quantization_config(args):
    """from_pretrained's 4-bit config for QLoRA (the QLoRA paper's: NF4, double quantization, bf16 compute)."""
    if not args.use_qlora:
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


# ----------------------------------------------------------------------------------------------------------------
# Adapters
# ----------------------------------------------------------------------------------------------------------------
def lora_config(args):
    from peft import LoraConfig

    return LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules=list(args.lora_target_modules) or ALL_LINEAR,
                      modules_to_save=list(args.lora_modules_to_save) or None, bias="none", task_type="CAUSAL_LM")


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """The distinct short names of the model's linear layers (what --lora_target_modules may name)."""
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear)})


def load_with_adapters(args, dtype: torch.dtype, attn_implementation: str):
    """The base model (in 4 bits on this process's GPU for QLoRA), with LoRA adapters when --use_lora asks."""
    model = load_model(args, dtype, attn_implementation, quantization=quantization_config(args))
    return apply_lora(model, args) if uses_lora(args) else model


def apply_lora(model, args):
    """The base with adapters (a peft PeftModel): only the adapters (and --lora_modules_to_save) require grad."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if args.use_qlora:  # casts norms to fp32 and freezes the base, as the QLoRA recipe does
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        model = get_peft_model(model, lora_config(args))
    except ValueError as exc:  # a target or module to save that the model does not have
        raise ModelSetupError(f"--lora_target_modules / --lora_modules_to_save: {exc} The model's linear layers: "
                              f"{' '.join(linear_module_names(model))}.") from None
    trainable, total = model.get_nb_trainable_parameters()
    targets = sorted(model.peft_config["default"].target_modules)
    logger.info("LoRA rank %d, alpha %g, dropout %g on %s: %s of %s parameters train (%.3f%%).", args.lora_rank,
                args.lora_alpha, args.lora_dropout, " ".join(targets), f"{trainable:,}", f"{total:,}",
                100 * trainable / total)
    return model


def is_adapter_parameter(name: str) -> bool:
    return "lora_" in name  # lora_A, lora_B (and lora_embedding_* for embedding targets)


def adapter_learning_rates(named_parameters, learning_rate: float, lora_learning_rate: float | None):
    """(parameter, its peak LR) for every trainable parameter: adapters at --lora_learning_rate when given."""
    for name, parameter in named_parameters:
        if parameter.requires_grad:
            adapter = lora_learning_rate is not None and is_adapter_parameter(name)
            yield name, parameter, lora_learning_rate if adapter else learning_rate


# ----------------------------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------------------------
def peft_model_of(accelerator, model):
    unwrapped = accelerator.unwrap_model(model)
    return getattr(unwrapped, "lm", unwrapped)  # the PeftModel inside ChunkedLossModel


def trainable_state_dict(accelerator, model) -> dict[str, torch.Tensor]:
    """The trainable tensors (adapters, modules to save) on the CPU, whole: under ZeRO-3 only these are gathered
    (a collective: every rank calls this), never the frozen base."""
    peft_model = peft_model_of(accelerator, model)
    named = [(name, p) for name, p in peft_model.named_parameters() if p.requires_grad]
    gathered = contextlib.nullcontext()
    if getattr(named[0][1], "ds_id", None) is not None:  # ZeRO-3 partitioned
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None)
    with gathered:
        return {name: p.detach().cpu().clone() for name, p in named}


def save_adapter(accelerator, model, tokenizer, output_dir: str | Path) -> None:
    """adapter_config.json + adapter_model.safetensors + the tokenizer in output_dir, written to a temporary folder
    first and moved in only when complete (as the full-model save). A failed write is a StorageError on every rank."""
    state_dict = trainable_state_dict(accelerator, model)
    output = Path(output_dir)

    def write() -> None:
        tmp = output / ".adapter.tmp"
        remove(tmp)
        with failed_write("the LoRA adapter", output, lambda: newest_intact_description(output), cleanup=tmp):
            peft_model_of(accelerator, model).save_pretrained(tmp, state_dict=state_dict, safe_serialization=True,
                                                              save_embedding_layers=False)
            (tmp / "README.md").unlink(missing_ok=True)  # peft's blank card; the hub upload writes the real one
            tokenizer.save_pretrained(tmp)
            move_files_into(tmp, output)

    main_process_work(accelerator, write, (StorageError,),
                      lambda: StorageError(f"The main process could not write the LoRA adapter to {output}."))


def save_merged(args, tokenizer, output_dir: str | Path) -> Path:
    """OUTPUT_DIR/merged: the base, loaded again in its own dtype on the CPU, with the saved adapter merged in. A
    QLoRA adapter merges into the full-precision base (not the 4-bit one it trained on), as the QLoRA paper does.
    Main process only."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    output = Path(output_dir)
    base = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, revision=args.model_revision, dtype="auto")
    merged = PeftModel.from_pretrained(base, output).merge_and_unload()
    merged.config.use_cache = True
    set_generation_stops(merged.generation_config, tokenizer)
    final, tmp = output / MERGED_DIR, output / f".{MERGED_DIR}.tmp"
    remove(tmp)
    with failed_write("the merged model", final, f"the adapter in {output} is complete", cleanup=tmp):
        merged.save_pretrained(tmp, safe_serialization=True, max_shard_size="5GB")
        tokenizer.save_pretrained(tmp)
        replace_folder(tmp, final)
    logger.info("Merged model: %s", final)
    return final
