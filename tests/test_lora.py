"""LoRA and QLoRA (open_instruct/lora.py): flags, adapters on the tiny model, optimizer groups, model FLOPs, gradient
checkpointing, the checkpoint identity; then tiny-model runs (the loss falls, the base stays bitwise unchanged, the
merged model equals base + adapter, packed equals padded) and a 2-process ZeRO-2/ZeRO-3 run against one process.

The kill-and-resume test with --use_lora is tests/test_checkpointing.py::test_a_killed_run_resumes_bitwise[lora].
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import accelerate_launch, finetune, read_metrics
from open_instruct.args import parse_args, uses_lora
from open_instruct.checkpointing import resume_problems, run_identity
from open_instruct.flops import FlopsModel
from open_instruct.lora import check_lora_setup, load_with_adapters
from open_instruct.model_utils import ModelSetupError
from open_instruct.optim import build_optimizer

BASE = ["--model_name_or_path", "m", "--dataset_mixer_list", "synthetic:spelling", "1.0"]
# The tiny model (hidden 128, 4 heads of 32, 2 KV heads, MLP 384, 4 layers): r x (in + out) per adapted projection
# at rank 8: q 8x(128+128) + k 8x(128+64) + v 8x(128+64) + o 8x(128+128) + gate, up, down 8x(128+384) each
# = 2048 + 1536 + 1536 + 2048 + 3 x 4096 = 19,456 per layer, x 4 layers.
RANK_8_ALL_LINEAR = 77_824
BASE_BLOCK_PARAMS = 787_456  # tests/test_flops.py: 4 x (2 x 16384 + 2 x 8192 + 3 x 49152 + 2 x 128)


def tiny_lora(tiny_model_dir, *flags, seed: int = 0):
    args = parse_args(["--model_name_or_path", str(tiny_model_dir), "--dataset_mixer_list", "synthetic:spelling",
                       "1.0", "--use_lora", "--lora_rank", "8", *flags])
    torch.manual_seed(seed)  # lora_A's initialisation
    return load_with_adapters(args, torch.float32, "packed_sdpa"), args  # the attention the trainer packs with


# ----------------------------------------------------------------------------------------------------------------
# Flags
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, message", [
    (["--lora_rank", "8"], "--lora_rank has no effect without --use_lora"),
    (["--lora_target_modules", "q_proj"], "--lora_target_modules has no effect without --use_lora"),
    (["--merge_lora_on_save"], "--merge_lora_on_save has no effect without --use_lora"),
    (["--lora_learning_rate", "1e-4"], "--lora_learning_rate has no effect without --use_lora"),
    (["--use_lora", "--lora_rank", "0"], "--lora_rank must be at least 1"),
    (["--use_lora", "--lora_alpha", "0"], "--lora_alpha must be positive"),
    (["--use_lora", "--lora_dropout", "1.0"], "--lora_dropout must be in [0, 1)"),
    (["--use_lora", "--lora_learning_rate", "1e-4", "--learning_rate", "1e-5"],
     "--learning_rate has no effect with --lora_learning_rate and no --lora_modules_to_save"),
])
def test_lora_flag_errors(flags, message, capsys):
    with pytest.raises(SystemExit):
        parse_args([*BASE, *flags])
    assert message in capsys.readouterr().err


def test_qlora_implies_lora_and_says_what_it_needs():
    args = parse_args([*BASE, "--use_qlora", "--lora_rank", "16"])
    assert uses_lora(args) and args.lora_rank == 16
    check_lora_setup(parse_args([*BASE, "--use_lora"]), deepspeed=True)  # plain LoRA: nothing to check
    if torch.cuda.is_available():
        pytest.skip("the no-CUDA error needs a machine without CUDA")
    with pytest.raises(ModelSetupError, match="--use_qlora needs a CUDA GPU.*use --use_lora"):
        check_lora_setup(args, deepspeed=False)


def test_lora_settings_are_part_of_the_checkpoint_identity():
    def identity(*flags):
        return run_identity(parse_args([*BASE, *flags]), "data", "8 examples", 1, None)

    full, lora = identity(), identity("--use_lora")
    assert resume_problems(full, full) == ([], [])
    assert any("--use_lora" in line for line in resume_problems(full, lora)[0])
    assert any("--lora_rank" in line for line in resume_problems(lora, identity("--use_lora", "--lora_rank", "8"))[0])
    different, optimization = resume_problems(lora, identity("--use_lora", "--lora_dropout", "0"))
    assert different == [] and "--lora_dropout" in optimization[0]
    # a checkpoint written before these settings existed had their defaults: it resumes as a full fine-tune
    old = {**full, "settings": {k: v for k, v in full["settings"].items() if "lora" not in k}}
    assert resume_problems(old, full) == ([], [])


# ----------------------------------------------------------------------------------------------------------------
# Adapters on the tiny model
# ----------------------------------------------------------------------------------------------------------------
def test_adapters_go_on_every_linear_projection_by_default(tiny_model_dir):
    model, _ = tiny_lora(tiny_model_dir)
    trainable = {name: p.numel() for name, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_A." in name or ".lora_B." in name for name in trainable)
    assert sum(trainable.values()) == RANK_8_ALL_LINEAR
    adapted = {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in trainable}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}  # not lm_head


def test_alpha_and_dropout_reach_the_adapters(tiny_model_dir):
    model, _ = tiny_lora(tiny_model_dir, "--lora_alpha", "32", "--lora_dropout", "0.25")
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q_proj.scaling["default"] == 32 / 8  # alpha / rank
    assert q_proj.lora_dropout["default"].p == 0.25


def test_named_targets_and_an_unknown_target(tiny_model_dir):
    model, _ = tiny_lora(tiny_model_dir, "--lora_target_modules", "q_proj", "v_proj")
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 4 * (2048 + 1536)
    with pytest.raises(ModelSetupError, match="qkv_proj.*linear layers: down_proj gate_proj k_proj lm_head o_proj "
                                              "q_proj up_proj v_proj"):
        tiny_lora(tiny_model_dir, "--lora_target_modules", "qkv_proj")


def test_adapters_take_their_own_lr_and_modules_to_save_the_base_lr(tiny_model_dir):
    model, args = tiny_lora(tiny_model_dir, "--lora_modules_to_save", "lm_head", "--lora_learning_rate", "1e-3",
                            "--learning_rate", "1e-5")
    optimizer = build_optimizer(model, args.learning_rate, args.weight_decay, args.lora_learning_rate)
    names = {id(p): name for name, p in model.named_parameters()}
    by_lr = {}
    for group in optimizer.param_groups:
        by_lr.setdefault(group["lr"], []).extend(names[id(p)] for p in group["params"])
    assert optimizer.param_groups[0]["lr"] == 1e-3  # the logged LR is the adapters'
    assert len(by_lr[1e-3]) == 2 * 7 * 4 and all(".lora_" in name for name in by_lr[1e-3])
    assert by_lr[1e-5] == ["base_model.model.lm_head.modules_to_save.default.weight"]


def test_model_flops_of_a_lora_run_skip_the_frozen_weights_gradients(tiny_model_dir):
    """Hand count for lengths 10 and 20 with 12 trained tokens (the full-model count is tests/test_flops.py's):
    blocks (6 x 77,824 trainable + 4 x 787,456 frozen) x 30 = 108,503,040; frozen output layer 4 x 272 x 128 x 12
    = 1,671,168; attention 6 x 4 layers x 128 x (10^2 + 20^2) = 1,536,000; total 111,710,208."""
    model, _ = tiny_lora(tiny_model_dir)
    flops = FlopsModel.of(model)
    assert (flops.block_params, flops.frozen_block_params) == (BASE_BLOCK_PARAMS + RANK_8_ALL_LINEAR, BASE_BLOCK_PARAMS)
    assert flops.output_layer_frozen
    assert flops.step_flops([10, 20], 12) == 111_710_208


def test_gradient_checkpointing_gives_the_adapters_the_same_gradients(tiny_model_dir):
    """Packed rows (two examples, position_ids restarting) through a frozen base: with non-reentrant checkpointing the
    adapters get the gradients they get without it (nothing in the frozen input requires grad)."""
    grads = []
    for flags in ([], ["--gradient_checkpointing"]):
        model, _ = tiny_lora(tiny_model_dir, "--lora_dropout", "0", *flags)
        torch.manual_seed(1)
        for name, p in model.named_parameters():
            if ".lora_B." in name:  # nonzero B, so lora_A's gradient is not trivially zero
                p.data.normal_(0, 0.02)
        model.train()
        ids = torch.randint(0, 256, (1, 24))
        position_ids = torch.cat([torch.arange(10), torch.arange(14)]).unsqueeze(0)
        model(input_ids=ids, position_ids=position_ids, labels=ids).loss.backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad})
    plain, checkpointed = grads
    assert plain.keys() == checkpointed.keys() and all(g.abs().sum() > 0 for g in plain.values())
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


# ----------------------------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------------------------
def run_args(model_dir, output_dir, *extra):
    batch = [] if "--global_batch_size" in extra else ["--per_device_train_batch_size", "8"]
    return ["--model_name_or_path", str(model_dir), "--output_dir", str(output_dir),
            "--dataset_mixer_list", "synthetic:spelling", "128", *batch,
            "--learning_rate", "5e-3", "--warmup_ratio", "0", "--seed", "4", "--use_lora", "--lora_rank", "8", *extra]


def base_key(adapted_key: str) -> str:
    """A PeftModel state-dict key of a base weight -> the base model's own key."""
    return adapted_key.removeprefix("base_model.model.").replace(".base_layer.", ".")


@pytest.mark.integration
def test_a_lora_run_trains_only_the_adapters_and_merges_exactly(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    finetune(run_args(tiny_model_dir, out, "--max_train_steps", "16", "--checkpointing_steps", "16",
                      "--merge_lora_on_save"))
    losses = [row["train_loss"] for row in read_metrics(out)]
    assert sum(losses[-4:]) / 4 < losses[0] - 0.75, losses  # 5.65 -> about 4.45 nats; untrained adapters stay at 5.65

    # The final save is the adapter and the tokenizer; no full weights, no placeholder card.
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert not (out / "model.safetensors").exists() and not (out / "README.md").exists()
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["base_model_name_or_path"] == str(tiny_model_dir)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trainable_parameters"] == RANK_8_ALL_LINEAR and summary["fine_tune"].startswith("LoRA, rank 8, alpha 16")

    # Only the adapters changed: every base weight in the last checkpoint is the tiny model's, bitwise.
    trained = load_file(out / "checkpoints" / "step_16" / "model.safetensors")
    original = load_file(tiny_model_dir / "model.safetensors")
    base = {base_key(k): v for k, v in trained.items() if ".lora_" not in k}
    assert base.keys() == original.keys()
    assert all(torch.equal(base[k], original[k]) for k in original)
    lora_b = [v for k, v in trained.items() if ".lora_B." in k]
    assert len(lora_b) == 28 and all(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: every one trained

    # The merged model computes what base + adapter computes; the adapter moved the output.
    from peft import PeftModel

    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
        plain = base_model(ids).logits
        adapted = PeftModel.from_pretrained(base_model, out).eval()(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()(ids).logits
    torch.testing.assert_close(merged, adapted, rtol=0, atol=1e-5)
    assert (adapted - plain).abs().max() > 1e-2
    assert (out / "merged" / "generation_config.json").exists() and (out / "merged" / "tokenizer.json").exists()


@pytest.mark.integration
def test_packed_and_padded_lora_runs_train_identically(tiny_model_dir, tmp_path):
    """The exact loss with padding-free packing holds for adapters too (dropout off: its masks follow positions)."""
    for name, extra in (("packed", []), ("padded", ["--no_padding_free"])):
        finetune(run_args(tiny_model_dir, tmp_path / name, "--max_train_steps", "4", "--lora_dropout", "0",
                          "--clip_grad_norm", "1e9", *extra))
    for packed, padded in zip(read_metrics(tmp_path / "packed"), read_metrics(tmp_path / "padded"), strict=True):
        assert packed["train_loss"] == pytest.approx(padded["train_loss"], abs=1e-5)
        assert packed["grad_norm"] == pytest.approx(padded["grad_norm"], rel=1e-5)


@pytest.mark.multiprocess
@pytest.mark.parametrize("ds_config", ["configs/ds_configs/stage2_no_offloading_accelerate.conf",
                                       "configs/ds_configs/stage3_no_offloading_accelerate.conf"],
                         ids=["zero2", "zero3"])
def test_two_process_zero_lora_matches_one_process(tiny_model_dir, tmp_path, ds_config):
    """The same global batches (8 examples): 1 process x 4 accumulation steps against 2 processes x 2 under ZeRO.
    Tolerances as tests/test_distributed.py (summation order only). The adapter saved from ZeRO-3 shards is whole."""
    args = ["--global_batch_size", "8", "--max_train_steps", "5", "--lora_dropout", "0", "--clip_grad_norm", "1.0",
            "--logging_steps", "1"]
    one, two = tmp_path / "one", tmp_path / "two"
    finetune(run_args(tiny_model_dir, one, *args, "--gradient_accumulation_steps", "4"))
    accelerate_launch(2, run_args(tiny_model_dir, two, *args, "--gradient_accumulation_steps", "2"), ds_config)
    for a, b in zip(read_metrics(one), read_metrics(two), strict=True):
        assert a["total_tokens"] == b["total_tokens"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    single, double = load_file(one / "adapter_model.safetensors"), load_file(two / "adapter_model.safetensors")
    assert single.keys() == double.keys() and len(single) == 56
    for name, tensor in single.items():
        torch.testing.assert_close(double[name], tensor, atol=1e-4, rtol=0, msg=name)


@pytest.mark.gpu
def test_qlora_run_on_cuda_trains_a_4bit_base_and_merges(tiny_model_dir, tmp_path):
    """QLoRA end to end on a GPU: the base's linear layers in 4 bits, the loss falls, the adapter saves, and the
    merged model (full-precision base + adapter) loads."""
    pytest.importorskip("bitsandbytes")
    from conftest import clean_env

    out = tmp_path / "qlora"
    result = finetune(run_args(tiny_model_dir, out, "--use_qlora", "--max_train_steps", "16", "--merge_lora_on_save",
                               "--gradient_checkpointing"), env=clean_env(ACCELERATE_MIXED_PRECISION="bf16"))
    assert "QLoRA" in json.loads((out / "summary.json").read_text())["fine_tune"], result.stderr[-2000:]
    losses = [row["train_loss"] for row in read_metrics(out)]
    assert sum(losses[-4:]) / 4 < losses[0] - 0.5, losses
    assert (out / "adapter_model.safetensors").exists()
    AutoModelForCausalLM.from_pretrained(out / "merged")
