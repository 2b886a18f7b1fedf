"""--torch_compile (open_instruct/compile.py): compiled decoder layers compute what the eager ones do, packed rows of
new lengths do not recompile, and the trainer's losses with and without the flag are equal.

Tolerance: fp32 on CPU; inductor fuses the RMSNorm and MLP element-wise ops and may sum in another order, about 1e-6
relative on the gradients. We allow 1e-5 on losses and gradients (and on the trainer's losses after a few AdamW steps);
a wrong layer, mask or parameter would move them by far more.

Compile time: CPU inductor's first compile of the tiny model's layer (forward and backward) takes about a minute on a
busy 2-core machine; inductor caches it on disk (/tmp/torchinductor_<user>), so the later inductor compiles of the same
graph, in this test or in the trainer runs, take seconds. The inductor tests are therefore marked integration. The
recompile count uses the eager backend (dynamo alone decides what to recompile, and it skips the kernel builds); the
trainer test checks with inductor that a real run logs no recompile.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import clean_env, finetune, read_metrics
from open_instruct import attention
from open_instruct.batching import collate_packed
from open_instruct.compile import (check_compile_support, compile_decoder_layers, decoder_layers,
                                   gather_whole_layers_under_zero3)
from open_instruct.loss import token_loss_sum
from open_instruct.model_utils import ChunkedLossModel, ModelSetupError


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def load(tiny_model_dir, gradient_checkpointing=False):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attention.NAME)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def packed_rows(lengths_per_row, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for lengths in lengths_per_row:
        ids = [rng.integers(1, 250, size=n) for n in lengths]
        rows.append(collate_packed(ids, ids))
    return rows


def loss_and_grads(model, batch):
    model.zero_grad()
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    if isinstance(model, ChunkedLossModel):
        loss = model(**inputs, target_ids=batch["target_ids"])
    else:
        loss = token_loss_sum(model(**inputs).logits, batch["target_ids"])
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backend, checkpointing, chunked", [
    pytest.param("inductor", False, False, marks=pytest.mark.integration),  # the kernel builds: a minute without cache
    ("aot_eager", True, True),
], ids=["inductor", "aot_eager-checkpointing-chunked_loss"])
def test_compiled_layers_give_the_eager_loss_and_gradients(tiny_model_dir, backend, checkpointing, chunked):
    eager, compiled = load(tiny_model_dir, checkpointing), load(tiny_model_dir, checkpointing)
    if chunked:  # what --use_liger_kernel trains (the chunked loss on the decoder's hidden states)
        eager, compiled = ChunkedLossModel(eager, 16), ChunkedLossModel(compiled, 16)
    assert compile_decoder_layers(compiled, backend=backend) == 4
    names = [name for name, _ in eager.named_parameters()]
    assert [name for name, _ in compiled.named_parameters()] == names  # in place: checkpoints keep their keys
    assert list(compiled.state_dict()) == list(eager.state_dict())
    for batch in packed_rows([(37, 5, 60), (12, 90), (3, 44, 20, 8)]):
        loss, grads = loss_and_grads(eager, batch)
        compiled_loss, compiled_grads = loss_and_grads(compiled, batch)
        torch.testing.assert_close(compiled_loss, loss, rtol=1e-5, atol=0)
        assert compiled_grads.keys() == grads.keys() and len(grads) == len(names)
        for name, grad in grads.items():
            torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-5, atol=1e-5 * grad.abs().max().item(),
                                       msg=name)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # one graph for all 4 layers and 3 lengths


def test_new_row_lengths_do_not_recompile(tiny_model_dir, monkeypatch):
    """Training micro-batches of over 20 distinct lengths, among them one-token filler rows and rows past SHORT_ROW
    (lowered to 128 so that packed_sdpa's per-example branch, a graph break, runs): the graphs are those that each kind
    of row needs once, and a second pass over new lengths of every kind compiles nothing."""
    monkeypatch.setattr(attention, "SHORT_ROW", 128)
    model = load(tiny_model_dir)
    compile_decoder_layers(model, backend="eager")

    def rows_of_every_kind(seed):
        rng = np.random.default_rng(seed)
        short = [tuple(rng.integers(3, 40, size=rng.integers(1, 4))) for _ in range(8)]  # 3..117 tokens
        long = [tuple(rng.integers(40, 90, size=rng.integers(4, 6))) for _ in range(3)]  # 160..445 tokens
        return packed_rows([*short[:5], (1,), *long, *short[5:], (2,)], seed)

    def graphs():
        return torch._dynamo.utils.counters["stats"]["unique_graphs"]

    first, second = rows_of_every_kind(1), rows_of_every_kind(2)
    lengths = {row["input_ids"].shape[1] for row in first + second}
    assert len(lengths) >= 20
    for row in first[:5]:
        loss_and_grads(model, row)
    assert graphs() == 1  # short rows of 5 lengths: one graph
    for row in first[5:]:
        loss_and_grads(model, row)
    # 1 and 2 tokens: a graph each (sizes 0 and 1 are specialized, and packed_sdpa's mask slices need 2); long rows:
    # the layer broken at the attention call, its attention module's frames and packed_sdpa's (both branches).
    seen = graphs()
    assert seen <= 12
    for row in second:
        loss_and_grads(model, row)
    assert graphs() == seen, f"{graphs() - seen} graphs compiled again for {len(lengths)} lengths"
    model.eval()
    with torch.no_grad():  # evaluation runs the eager layers: nothing compiles
        model(input_ids=first[0]["input_ids"], position_ids=first[0]["position_ids"], use_cache=False)
    assert graphs() == seen
    print(f"{graphs()} graphs for {len(lengths)} row lengths")


def test_layers_are_found_through_wrappers(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    model = load(tiny_model_dir)
    layers = list(model.model.layers)
    assert decoder_layers(ChunkedLossModel(model)) == layers
    lora = get_peft_model(load(tiny_model_dir), LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    assert decoder_layers(lora) == list(lora.get_base_model().model.layers)
    names = [name for name, _ in lora.named_parameters()]
    compile_decoder_layers(lora, backend="aot_eager")
    compile_decoder_layers(lora, backend="aot_eager")  # idempotent
    assert [name for name, _ in lora.named_parameters()] == names
    with pytest.raises(ModelSetupError, match="found no decoder layers"):
        compile_decoder_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_zero3_gathers_each_compiled_layer_whole(tiny_model_dir):
    """DeepSpeed then hooks the layer (around the compiled forward), not the Linears and norms inside it."""
    from deepspeed.utils import z3_leaf_module

    model = ChunkedLossModel(load(tiny_model_dir))
    gather_whole_layers_under_zero3(model)
    assert [module for module in model.modules() if z3_leaf_module(module)] == decoder_layers(model)


def test_a_machine_without_a_compiler_fails_with_one_line(monkeypatch):
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config.cpp, "cxx", ("/nonexistent/c++",))
    with pytest.raises(ModelSetupError, match=r"--torch_compile: .*needs a C\+\+ compiler") as failure:
        check_compile_support("cpu")
    assert "\n" not in str(failure.value)


@pytest.mark.integration
def test_trainer_losses_with_and_without_compile_are_equal(tiny_model_dir, tmp_path):
    """Packed rows of up to 160 tokens, a different number and length of rows in each step."""
    args = ["--model_name_or_path", str(tiny_model_dir), "--dataset_mixer_list", "synthetic:spelling", "48",
            "synthetic:arithmetic", "16", "--global_batch_size", "8", "--max_tokens_per_micro_batch", "160",
            "--max_seq_length", "160", "--learning_rate", "2e-3", "--max_train_steps", "3", "--seed", "1"]
    finetune([*args, "--output_dir", str(tmp_path / "eager")])
    result = finetune([*args, "--output_dir", str(tmp_path / "compiled"), "--torch_compile"],
                      env=clean_env(TORCH_LOGS="recompiles"))
    eager, compiled = read_metrics(tmp_path / "eager"), read_metrics(tmp_path / "compiled")
    assert [m["train_loss"] for m in compiled] == pytest.approx([m["train_loss"] for m in eager], rel=1e-5)
    assert [m["grad_norm"] for m in compiled] == pytest.approx([m["grad_norm"] for m in eager], rel=1e-5)
    assert "4 decoder layers compiled" in result.stderr
    assert result.stderr.count("Recompiling function") == 0, result.stderr[-3000:]
