"""mason.py and the recipes: the launch spec, per-node commands, the sbatch script, pre-submit checks, and every
recipe's final command parsed by the real trainer parser. Slurm itself is exercised in tests/test_slurm.py."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, clean_env, run
from open_instruct.launch import (
    Layout, LaunchError, ShellVar, node_command, parse_env_assignments, parse_launch_command, shell_join,
)
from open_instruct.launch_checks import check_qlora_layout, check_sources, parse_trainer_flags

ZERO3 = "configs/ds_configs/stage3_no_offloading_accelerate.conf"
TRAINER = ["-m", "open_instruct.finetune", "--model_name_or_path", "m", "--dataset_mixer_list", "synthetic:spelling",
           "10"]
RECIPES = sorted(str(p.relative_to(REPO)) for p in (REPO / "scripts" / "train").glob("*/finetune*.sh")
                 if p.parent.name != "debug")


def layout(nodes=2, per_node=8) -> Layout:
    return Layout(num_nodes=nodes, processes_per_node=per_node, accelerate="accelerate")


# ---------------------------------------------------------------------------------------------------------------
# The launch spec
# ---------------------------------------------------------------------------------------------------------------
def test_launch_spec_keeps_the_users_options_and_replaces_the_layout():
    spec = parse_launch_command(["accelerate", "launch", "--num_processes", "8", "--main-process-port", "1234",
                                 "--mixed_precision", "bf16", "--use_deepspeed", "--deepspeed_config_file", ZERO3,
                                 *TRAINER, "--learning_rate", "1e-5"])
    assert spec.options == ["--mixed_precision", "bf16", "--use_deepspeed", "--deepspeed_config_file", ZERO3]
    assert spec.replaced == ["--num_processes", "8", "--main_process_port", "1234"]  # either spelling is found
    assert spec.module and spec.script == "open_instruct.finetune" and spec.use_deepspeed
    assert spec.script_args[-2:] == ["--learning_rate", "1e-5"] and spec.deepspeed_config_file == ZERO3


@pytest.mark.parametrize("command, message", [
    (["python", "-m", "open_instruct.finetune"], "must start with 'accelerate launch'"),
    (["accelerate", "launch", "--num_procs", "2", *TRAINER], "accelerate launch: "),
    (["accelerate", "launch", "train.py", "--lr", "1"], "mason launches the trainer"),
])
def test_bad_launch_commands_are_refused_with_the_reason(command, message):
    with pytest.raises(LaunchError, match=message):
        parse_launch_command(command)


def test_node_commands_carry_rank_rendezvous_and_world_size():
    spec = parse_launch_command(["accelerate", "launch", "--use_deepspeed", "--deepspeed_config_file", ZERO3, *TRAINER])
    command = node_command(spec, layout(4, 8), ShellVar("SLURM_NODEID"), ShellVar("MAIN_PROCESS_IP"))
    flags = dict(zip(command[2:18:2], command[3:19:2]))
    assert command[:2] == ["accelerate", "launch"]
    assert flags["--num_processes"] == "32" and flags["--num_machines"] == "4"
    assert flags["--machine_rank"] == ShellVar("SLURM_NODEID") and flags["--main_process_port"] == "29500"
    assert command[command.index("--deepspeed_multinode_launcher") + 1] == "standard"
    assert command[-len(TRAINER):] == TRAINER
    # One node: no machine flags; plain DDP over several processes needs --multi_gpu.
    single = node_command(parse_launch_command(["accelerate", "launch", *TRAINER]), layout(1, 8), 0, "x")
    assert "--num_machines" not in single and "--multi_gpu" in single and single[3] == "8"


def test_shell_join_quotes_values_and_leaves_node_variables_to_the_node():
    tokens = ["accelerate", "launch", "--machine_rank", ShellVar("SLURM_NODEID"), "--exp_name", "it's a run"]
    text = shell_join(tokens)
    assert '"$SLURM_NODEID"' in text
    assert shlex.split(text.replace('"$SLURM_NODEID"', "3")) == ["accelerate", "launch", "--machine_rank", "3",
                                                                  "--exp_name", "it's a run"]
    wrapped = shell_join(tokens, wrap=True)
    assert wrapped.count(" \\\n    --") == 2  # bash joins the continued lines; shlex needs them joined first
    assert shlex.split(wrapped.replace(" \\\n", " ")) == shlex.split(text)


def test_env_assignments_refuse_secrets_and_bad_syntax():
    assert parse_env_assignments(["NCCL_DEBUG=WARN", "A=b=c"]) == {"NCCL_DEBUG": "WARN", "A": "b=c"}
    with pytest.raises(LaunchError, match="--secret HF_TOKEN"):
        parse_env_assignments(["HF_TOKEN=hf_abc"])
    with pytest.raises(LaunchError, match="NAME=VALUE"):
        parse_env_assignments(["NCCL_DEBUG"])


# ---------------------------------------------------------------------------------------------------------------
# Pre-submit checks
# ---------------------------------------------------------------------------------------------------------------
def test_trainer_flags_go_through_the_trainers_parser():
    assert parse_trainer_flags(TRAINER[2:] + ["--learning_rate", "3e-5"]).learning_rate == 3e-5
    with pytest.raises(LaunchError, match="did you mean --learning_rate"):
        parse_trainer_flags(TRAINER[2:] + ["--learnin_rate", "3e-5"])
    with pytest.raises(LaunchError, match="--warmdown_ratio only applies"):
        parse_trainer_flags(TRAINER[2:] + ["--warmdown_ratio", "0.5"])


class FakeHub:
    """Answers repo_info like the hub: known repos exist, `missing` ones are 404, `down` raises a connection error."""

    def __init__(self, missing=(), down=False):
        self.missing, self.down, self.asked = set(missing), down, []

    def repo_info(self, repo_id, repo_type=None, revision=None, timeout=None):
        import httpx2
        from huggingface_hub.errors import RepositoryNotFoundError

        self.asked.append((repo_type, repo_id, revision))
        if self.down:
            raise ConnectionError("no route to host")
        if repo_id in self.missing:
            response = httpx2.Response(404, request=httpx2.Request("GET", f"https://huggingface.co/api/{repo_id}"))
            raise RepositoryNotFoundError(f"{repo_id} not found", response=response)


def hub_args(*mixture, model="org/model"):
    return parse_trainer_flags(["--model_name_or_path", model, "--dataset_mixer_list", *mixture])


def test_sources_are_checked_on_the_hub_and_on_disk(tmp_path):
    hub = FakeHub(missing={"org/typo-mixture"})
    args = hub_args("org/mixture@v2", "1.0", "org/typo-mixture", "0.5")
    with pytest.raises(LaunchError, match="dataset org/typo-mixture: neither a local file or folder .* nor a dataset on "
                                          "the Hugging Face Hub"):
        check_sources(args, api=hub)
    assert ("dataset", "org/mixture", "v2") in hub.asked and ("model", "org/model", None) in hub.asked
    with pytest.raises(LaunchError, match=r"Dataset file data/missing\.jsonl does not exist"):
        check_sources(hub_args("data/missing.jsonl", "10"), api=FakeHub())
    (tmp_path / "model").mkdir()
    with pytest.raises(LaunchError, match="has no config.json"):
        check_sources(hub_args("synthetic:spelling", "10", model=str(tmp_path / "model")), api=FakeHub())


def test_eval_sources_are_checked_like_training_sources(tmp_path):
    hub = FakeHub(missing={"org/typo-eval"})
    args = parse_trainer_flags(["--model_name_or_path", "org/model", "--dataset_mixer_list", "org/mixture", "1.0",
                                "--eval_dataset_mixer_list", "org/typo-eval", "1.0"])
    with pytest.raises(LaunchError, match="dataset org/typo-eval: neither a local file or folder .* nor a dataset on "
                                          "the Hugging Face Hub"):
        check_sources(args, api=hub)
    assert ("dataset", "org/typo-eval", None) in hub.asked
    missing = str(tmp_path / "arc.jsonl")
    args = parse_trainer_flags(["--model_name_or_path", "org/model", "--dataset_mixer_list", "org/mixture", "1.0",
                                "--eval_tasks", f"mc:{missing}"])
    with pytest.raises(LaunchError, match=f"--eval_tasks mc:{missing}: no such file"):
        check_sources(args, api=FakeHub())


def test_qlora_needs_gpus_and_no_deepspeed_before_submitting():
    qlora = parse_trainer_flags(TRAINER[2:] + ["--use_qlora"])
    check_qlora_layout(qlora, deepspeed=False, gpus_per_node=1)
    check_qlora_layout(parse_trainer_flags(TRAINER[2:] + ["--use_lora"]), deepspeed=True, gpus_per_node=0)
    with pytest.raises(LaunchError, match="--use_qlora needs CUDA GPUs"):
        check_qlora_layout(qlora, deepspeed=False, gpus_per_node=0)
    with pytest.raises(LaunchError, match="drop --use_deepspeed"):
        check_qlora_layout(qlora, deepspeed=True, gpus_per_node=8)
    result = mason("--backend", "print", "--gpus_per_node", "8", "--", "accelerate", "launch", "--use_deepspeed",
                   "--deepspeed_config_file", "configs/ds_configs/stage3_no_offloading_accelerate.conf", *TRAINER,
                   "--use_qlora", check=False)
    assert result.returncode == 2 and "drop --use_deepspeed" in result.stderr


def test_an_unreachable_hub_is_a_warning_not_an_error():
    warnings = check_sources(hub_args("org/mixture", "1.0"), api=FakeHub(down=True))
    assert len(warnings) == 2 and all("could not check" in w for w in warnings)
    hub = FakeHub(down=True)
    assert check_sources(hub_args("org/mixture", "1.0"), api=hub, ask_hub=False) == [] and hub.asked == []


def test_mason_prints_the_global_batch_with_its_factors():
    result = mason("--backend", "print", "--num_nodes", "8", "--gpus_per_node", "8", "--", "accelerate", "launch",
                   *TRAINER, "--gradient_accumulation_steps", "2")
    assert ("global batch: 1 per device x 2 accumulation steps x 64 processes = 128 examples per optimizer step"
            in result.stdout)


# ---------------------------------------------------------------------------------------------------------------
# mason end to end (print and dry-run backends) and the recipes
# ---------------------------------------------------------------------------------------------------------------
def mason(*argv, env=None, check=True) -> subprocess.CompletedProcess:
    return run([sys.executable, "mason.py", *argv], env=env or clean_env(), check=check)


def recipe(path: str, *argv, env=None) -> subprocess.CompletedProcess:
    return run(["bash", path, *argv], env=env or clean_env(PYTHON=sys.executable))


def printed_commands(stdout: str) -> list[list[str]]:
    """The per-node commands of --backend print, as argv lists (line continuations joined)."""
    blocks = stdout.split("# node ")[1:]
    return [shlex.split(block.split("\n", 1)[1].replace("\\\n", " ")) for block in blocks]


def final_trainer_args(recipe_path: str):
    result = recipe(recipe_path, "--backend", "print", "--skip_hub_checks")
    commands = printed_commands(result.stdout)
    assert len(commands) == 8 and [c[c.index("--machine_rank") + 1] for c in commands] == [str(r) for r in range(8)]
    spec = parse_launch_command(["accelerate", *commands[0][1:]])
    return spec, parse_trainer_flags(spec.script_args), result.stdout


# What the issue specifies for each recipe: model, data, lr, accumulation, gradient checkpointing.
RECIPE_SETTINGS = {
    "scripts/train/tulu3/finetune_8b.sh": ("meta-llama/Llama-3.1-8B", "allenai/tulu-3-sft-mixture", 5e-6, 2, True),
    "scripts/train/olmo2/finetune_7b.sh": ("allenai/OLMo-2-1124-7B", "allenai/tulu-3-sft-olmo-2-mixture-0225", 2e-5, 2,
                                           False),
    "scripts/train/olmo2/finetune_13b.sh": ("allenai/OLMo-2-1124-13B", "allenai/tulu-3-sft-olmo-2-mixture-0225", 5e-6,
                                            1, True),
    "scripts/train/olmo2/finetune_32b.sh": ("allenai/OLMo-2-0325-32B", "allenai/tulu-3-sft-olmo-2-mixture-0225", 4e-6,
                                            4, True),
}


# Long-context recipes: model, data, rows, sequence-parallel size.
LONG_RECIPES = {"scripts/train/olmo2/finetune_7b_32k.sh": ("allenai/OLMo-2-1124-7B",
                                                          "allenai/tulu-3-sft-olmo-2-mixture-0225", 32768, 2)}


def test_every_recipe_is_listed():
    assert RECIPES == sorted({**RECIPE_SETTINGS, **LONG_RECIPES})


@pytest.mark.parametrize("path", sorted(LONG_RECIPES))
def test_long_context_recipes_parse_and_plan_per_sequence_parallel_rank(path):
    model, data, rows, n = LONG_RECIPES[path]
    spec, args, stdout = final_trainer_args(path)
    assert spec.use_deepspeed and spec.deepspeed_config_file == ZERO3 and "bf16" in spec.options
    assert (args.model_name_or_path, args.dataset_mixer_list) == (model, [data, "1.0"])
    assert (args.max_seq_length, args.max_tokens_per_micro_batch, args.sequence_parallel_size) == (rows, rows, n)
    assert args.padding_free and args.global_batch_size == 64 and not args.gradient_checkpointing
    assert "global batch: 64 examples per optimizer step" in stdout
    # The plan's figures for this command (1/N of each row per GPU) need the model's config, which this offline
    # machine cannot fetch: tests/test_memory_plan.py computes them from OLMo-2 7B's published dimensions.


@pytest.mark.parametrize("path", sorted(RECIPE_SETTINGS))
def test_each_recipes_final_command_parses_with_the_real_parsers(path):
    model, data, lr, accumulation, checkpointing = RECIPE_SETTINGS[path]
    spec, args, stdout = final_trainer_args(path)
    assert spec.use_deepspeed and spec.deepspeed_config_file == ZERO3 and "bf16" in spec.options
    assert (args.model_name_or_path, args.dataset_mixer_list) == (model, [data, "1.0"])
    assert (args.learning_rate, args.gradient_accumulation_steps, args.gradient_checkpointing) == (
        lr, accumulation, checkpointing)
    assert (args.lr_scheduler_type, args.warmup_ratio, args.weight_decay, args.num_train_epochs) == (
        "linear", 0.03, 0.0, 2)
    assert (args.max_seq_length, args.per_device_train_batch_size, args.padding_free, args.use_liger_kernel) == (
        4096, 1, True, True)
    assert args.chat_template_name == "tulu" and args.add_bos == ("olmo2" in path)
    assert args.loss_reduction == ("sum" if "tulu3" in path else "mean")
    assert f"processes = {64 * accumulation} examples per optimizer step" in stdout


def test_trainer_overrides_after_the_double_dash_win():
    result = recipe("scripts/train/olmo2/finetune_7b.sh", "--backend", "print", "--skip_hub_checks", "--",
                    "--learning_rate", "1e-5", "--loss_reduction", "sum")
    command = printed_commands(result.stdout)[0]
    args = parse_trainer_flags(parse_launch_command(["accelerate", *command[1:]]).script_args)
    assert (args.learning_rate, args.loss_reduction) == (1e-5, "sum")


def test_a_typo_in_a_recipe_stops_mason_before_anything_runs(tmp_path):
    broken = tmp_path / "scripts" / "train" / "x" / "finetune.sh"
    broken.parent.mkdir(parents=True)
    text = (REPO / "scripts/train/tulu3/finetune_8b.sh").read_text().replace("--warmup_ratio", "--warmup_ration")
    broken.write_text(text.replace('cd "$(dirname "$0")/../../.."', f"cd {shlex.quote(str(REPO))}"))
    result = run(["bash", str(broken), "--backend", "print", "--skip_hub_checks"], check=False,
                 env=clean_env(PYTHON=sys.executable))
    assert result.returncode == 2
    assert "--warmup_ration: did you mean --warmup_ratio?" in result.stderr and "# node" not in result.stdout


def test_tulu_dry_run_prints_a_complete_sbatch_script_without_secret_values(tmp_path):
    sentinel = "hf_SentinelValueThatMustNotAppear123"
    result = recipe("scripts/train/tulu3/finetune_8b.sh", "--dry_run", "--skip_hub_checks", "--partition", "gpu",
                    "--account", "proj", "--time", "24:00:00", "--env", "NCCL_DEBUG=WARN",
                    env=clean_env(PYTHON=sys.executable, HF_TOKEN=sentinel))
    script = result.stdout[result.stdout.index("#!/bin/bash"):]
    for directive in ("--nodes=8", "--ntasks-per-node=1", "--gpus-per-node=8", "--exclusive", "--partition=gpu",
                      "--account=proj", "--time=24:00:00", "--export=ALL", f"--chdir={REPO}", "--open-mode=append",
                      "--signal=B:USR1@300", "--requeue"):
        assert f"#SBATCH {directive}\n" in script
    assert "trap stop_training USR1" in script and 'scontrol requeue "$SLURM_JOB_ID"' in script
    assert "export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=300" in script
    assert "output/tulu3_8b_sft/logs/tulu3_8b_sft-%j.out" in script and "export NCCL_DEBUG=WARN" in script
    assert ': "${HF_TOKEN:?' in script and sentinel not in result.stdout + result.stderr
    assert 'srun --nodes=8 --ntasks-per-node=1 --cpus-per-task="$SLURM_CPUS_ON_NODE"' in script
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0  # valid bash
    # The task's command, as the node's shell will see it, parses with the real parsers.
    task = shlex.split(script.split("bash -c ", 1)[1])[0].replace("\\\n", " ")
    assert task.startswith('trap "" USR1; exec ')  # the task and torch's launcher leave USR1 to the trainer
    task = task.removeprefix('trap "" USR1; exec ')
    argv = shlex.split(task.replace('"$SLURM_NODEID"', "5").replace('"$MAIN_PROCESS_IP"', "10.0.0.1"))
    assert argv[argv.index("--machine_rank") + 1] == "5" and argv[argv.index("--num_processes") + 1] == "64"
    assert parse_trainer_flags(parse_launch_command(["accelerate", *argv[1:]]).script_args).learning_rate == 5e-6
    assert not (REPO / "output" / "tulu3_8b_sft" / "logs" / "tulu3_8b_sft.sbatch").exists()  # dry run wrote nothing


@pytest.mark.parametrize("argv, message", [
    (["--backend", "print", "--dry_run", "--", "accelerate", "launch", *TRAINER], "--dry_run has no effect"),
    (["--backend", "local", "--partition", "gpu", "--", "accelerate", "launch", *TRAINER], "--partition only applies"),
    (["--backend", "local", "accelerate", "launch", *TRAINER], "after `--`"),
    (["--backend", "local", "--secret", "MASON_TEST_UNSET_SECRET", "--", "accelerate", "launch", *TRAINER],
     "MASON_TEST_UNSET_SECRET: not set"),
    (["--num_nodes", "0", "--", "accelerate", "launch", *TRAINER], "--num_nodes must be at least 1"),
])
def test_mason_refuses_bad_cluster_options_clearly(argv, message):
    result = mason(*argv, check=False)
    assert result.returncode == 2 and message in result.stderr


def test_unknown_mason_option_is_an_error():
    result = mason("--nodes", "2", "--", "accelerate", "launch", *TRAINER, check=False)
    assert result.returncode == 2 and "unrecognized arguments: --nodes" in result.stderr


def test_slurm_backend_without_sbatch_says_what_to_do(tiny_model_dir, tmp_path):
    env = clean_env(PATH=str(Path(sys.executable).parent) + ":/usr/bin:/bin")
    if subprocess.run(["which", "sbatch"], env=env, capture_output=True).returncode == 0:
        env["PATH"] = str(Path(sys.executable).parent)  # hide the cluster's sbatch
    result = mason("--gpus_per_node", "0", "--output_dir", str(tmp_path), "--", "accelerate", "launch", "-m",
                   "open_instruct.finetune", "--model_name_or_path", str(tiny_model_dir), "--dataset_mixer_list",
                   "synthetic:spelling", "10", env=env, check=False)
    assert result.returncode == 2 and "sbatch is not on PATH" in result.stderr


# ---------------------------------------------------------------------------------------------------------------
# --backend local: two "nodes" on this machine, rendezvous on 127.0.0.1 (the same commands Slurm would run)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.multiprocess
def test_local_backend_runs_a_two_node_zero3_job(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    env = clean_env(PYTHON=sys.executable, OUTPUT_DIR=str(out), TINY_MODEL_DIR=str(tiny_model_dir), BACKEND="local",
                    NUM_NODES="2", NUM_PROCESSES="1", DS_CONFIG=ZERO3, MASON_FLAGS="--main_process_port 29613",
                    EVAL="0")
    result = run(["bash", "scripts/train/debug/finetune.sh", "--max_train_steps", "3", "--logging_steps", "1",
                  "--dataset_local_cache_dir", str(tmp_path / "cache")], env=env)
    assert "job: 2 node(s) x 1 process(es) = 2 processes" in result.stdout
    import json

    environment = json.loads((out / "environment.json").read_text())
    assert environment["num_processes"] == 2 and len(environment["nodes"]) == 2
    assert (out / "model.safetensors").is_file() and "held-out exact match" in result.stdout


def llama_8b_shaped_config(directory: Path) -> Path:
    """A config.json shaped like Llama-3.1-8B (no weights): enough for the memory plan, which builds it on the meta
    device."""
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False).save_pretrained(directory)
    return directory


def test_memory_plan_refuses_a_job_that_cannot_fit_unless_forced(tmp_path):
    model = str(llama_8b_shaped_config(tmp_path / "llama-8b"))
    trainer = ["-m", "open_instruct.finetune", "--model_name_or_path", model, "--dataset_mixer_list",
               "synthetic:spelling", "10", "--max_seq_length", "4096", "--gradient_checkpointing"]
    ddp = ["--backend", "print", "--num_nodes", "1", "--gpus_per_node", "8", "--", "accelerate", "launch",
           "--mixed_precision", "bf16", *trainer]
    refused = mason(*ddp, check=False)
    assert refused.returncode == 2 and "does NOT fit" in refused.stdout
    assert "more than --gpu_memory_gb 80 allows" in refused.stderr and "# node" not in refused.stdout
    forced = mason("--force", *ddp)
    assert "launching anyway (--force)" in forced.stdout and "# node 0:" in forced.stdout
    zero3 = mason("--backend", "print", "--num_nodes", "8", "--gpus_per_node", "8", "--", "accelerate", "launch",
                  "--mixed_precision", "bf16", "--use_deepspeed", "--deepspeed_config_file", ZERO3, *trainer)
    assert "fits in 80" in zero3.stdout and "8.03B parameters" in zero3.stdout


@pytest.mark.integration
def test_prepare_data_fills_the_cache_the_nodes_will_read(tiny_model_dir, tmp_path):
    cache = tmp_path / "cache"
    trainer = ["-m", "open_instruct.finetune", "--model_name_or_path", str(tiny_model_dir), "--dataset_mixer_list",
               "synthetic:spelling", "40", "--dataset_local_cache_dir", str(cache)]
    result = mason("--backend", "print", "--gpus_per_node", "0", "--prepare_data", "--", "accelerate", "launch",
                   *trainer)
    assert "40 examples ready in" in result.stdout and "# node 0:" in result.stdout
    assert [p.name for p in cache.iterdir()]  # the trainer's cache key: a run with these flags reads it
    again = run([sys.executable, "-m", "open_instruct.prepare_data", *trainer[2:]])
    assert "Loading the tokenized mixture from" in again.stdout  # a hit, not a second tokenization


def test_every_cluster_option_reaches_the_script_or_the_commands(tmp_path):
    """Each option changes what is written; an option accepted and ignored would leave its mark out."""
    hub_model = ["-m", "open_instruct.finetune", "--model_name_or_path", "org/model", "--dataset_mixer_list",
                 "org/data", "1.0"]
    result = mason("--dry_run", "--num_nodes", "2", "--gpus_per_node", "8", "--processes_per_node", "4",
                   "--cpus_per_node", "16", "--qos", "high", "--job_name", "my-job", "--output_dir", str(tmp_path),
                   "--main_process_port", "1234", "--grace_seconds", "120", "--no_requeue", "--skip_hub_checks", "--",
                   "accelerate", "launch", *hub_model)
    script = result.stdout
    for directive in ("--cpus-per-task=16", "--qos=high", "--job-name=my-job",
                      f"--output={tmp_path}/logs/my-job-%j.out", "--signal=B:USR1@120"):
        assert f"#SBATCH {directive}\n" in script
    assert "export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=120" in script
    assert "#SBATCH --requeue" not in script and "scontrol requeue" not in script  # --no_requeue
    assert "#SBATCH --exclusive" not in script  # CPUs sized explicitly: no whole-node request
    assert "--num_processes 8 \\" in script and "--main_process_port 1234 \\" in script  # 2 nodes x 4 processes
    assert "could not check" not in result.stdout  # --skip_hub_checks: the hub was not asked
    asked = mason("--backend", "print", "--", "accelerate", "launch", *hub_model)  # offline here: a warning
    assert "warning: could not check the model org/model" in asked.stdout


def test_gpu_memory_gb_sets_the_limit_of_the_memory_plan(tmp_path):
    model = str(llama_8b_shaped_config(tmp_path / "llama-8b"))
    command = ["--backend", "print", "--num_nodes", "8", "--gpus_per_node", "8", "--", "accelerate", "launch",
               "--mixed_precision", "bf16", "--use_deepspeed", "--deepspeed_config_file", ZERO3, "-m",
               "open_instruct.finetune", "--model_name_or_path", model, "--dataset_mixer_list", "synthetic:spelling",
               "10", "--max_seq_length", "4096", "--gradient_checkpointing", "--use_liger_kernel"]
    assert "fits in 80" in mason(*command).stdout
    small = mason("--gpu_memory_gb", "8", *command, check=False)
    assert small.returncode == 2 and "more than --gpu_memory_gb 8 allows" in small.stderr


def test_a_job_resubmitted_on_fewer_nodes_shows_the_resume_in_its_plan(tmp_path):
    """The checkpoint of a 64-GPU ZeRO-3 run, resubmitted on 6 nodes: the plan says what the job will resume
    (the resharding itself: tests/test_elastic.py)."""
    checkpoint = tmp_path / "run" / "checkpoints" / "step_300"
    checkpoint.mkdir(parents=True)
    (checkpoint / "COMPLETED").write_text("{}")
    (checkpoint / "trainer_state.json").write_text(
        '{"step": 300, "total_steps": 1000, "identity": {"num_processes": 64, "zero_stage": 3, '
        '"global_batch": "128 examples"}}')
    command = ["--", "accelerate", "launch", "--use_deepspeed", "--deepspeed_config_file", ZERO3, *TRAINER,
               "--output_dir", str(tmp_path / "run"), "--gradient_accumulation_steps", "2"]  # 1 x 2 x 64 = 128
    per_device = mason("--backend", "print", "--num_nodes", "6", "--gpus_per_node", "8", "--skip_hub_checks", *command)
    assert ("refused when the job starts, its global batch is 96 examples, the checkpoint's 128 examples. Add "
            "`-- --global_batch_size 128` to keep the run's.") in per_device.stdout
    command += ["--global_batch_size", "128"]
    fewer = mason("--backend", "print", "--num_nodes", "6", "--gpus_per_node", "8", "--skip_hub_checks", *command)
    assert ("resume: resuming step 301 of 1000 from a 64-GPU checkpoint (step_300) on 48 GPUs (ZeRO-3 -> ZeRO-3: "
            "converted to a universal checkpoint when the job starts, then resharded)") in fewer.stdout
    same = mason("--backend", "print", "--num_nodes", "8", "--gpus_per_node", "8", "--skip_hub_checks", *command)
    assert "resume: resuming step 301 of 1000 from a 64-GPU checkpoint (step_300) on 64 GPUs\n" in same.stdout
    command[command.index("--output_dir") + 1] = str(tmp_path / "new_run")
    fresh = mason("--backend", "print", "--num_nodes", "8", "--gpus_per_node", "8", "--skip_hub_checks", *command)
    assert "resume:" not in fresh.stdout
