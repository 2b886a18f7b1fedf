"""Tiny-model training runs in one process, through the real entry point (python -m open_instruct.finetune)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import REPO, clean_env, copy_without_template, finetune, read_metrics, run, with_cache_dir

pytestmark = pytest.mark.integration

REQUIRED_METRICS = {"step", "epoch", "learning_rate", "train_loss", "total_tokens", "total_tokens_including_padding",
                    "per_device_tps", "per_device_tps_including_padding"}


def base_args(model_dir, output_dir, steps=4, *extra):
    return ["--model_name_or_path", str(model_dir), "--output_dir", str(output_dir),
            "--dataset_mixer_list", "synthetic:spelling", "96", "synthetic:arithmetic", "32",
            "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2", "--learning_rate", "2e-3",
            "--max_train_steps", str(steps), "--seed", "1", *extra]


def losses(output_dir):
    return [row["train_loss"] for row in read_metrics(output_dir)]


def test_run_trains_saves_and_reloads(tiny_model_dir, tmp_path):
    secret = "hf_DoNotLeakThisValue123"
    out = tmp_path / "run"
    result = finetune(base_args(tiny_model_dir, out, 30), env=clean_env(HF_TOKEN=secret, WANDB_API_KEY="wandb-secret-456"))
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == list(range(1, 31))  # logging_steps defaults to 1
    assert all(REQUIRED_METRICS <= set(m) for m in metrics)
    assert metrics[-1]["train_loss"] < 0.6 * metrics[0]["train_loss"], losses(out)
    assert metrics[-1]["total_tokens"] == metrics[-1]["total_tokens_including_padding"]  # padding-free: no padding
    assert all(m["per_device_tps"] > 0 for m in metrics)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", "generation_config.json",
                 "run_config.yaml", "dataset_stats.json", "summary.json"):
        assert (out / name).is_file(), name
    assert not (out / ".final_model.tmp").exists()
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert tokenizer.chat_template
    from open_instruct.sample import answer

    assert isinstance(answer(model, tokenizer, "Spell the word: cat", max_new_tokens=12), str)
    # Secrets never reach logs or saved files.
    everything = result.stdout + result.stderr + "".join(p.read_text(errors="ignore") for p in out.glob("*.*")
                                                         if p.suffix in {".json", ".yaml", ".jsonl"})
    assert secret not in everything and "wandb-secret-456" not in everything


def test_padded_and_padding_free_train_identically(tiny_model_dir, tmp_path):
    finetune(base_args(tiny_model_dir, tmp_path / "packed"))
    finetune(base_args(tiny_model_dir, tmp_path / "padded", 4, "--no_padding_free"))
    assert losses(tmp_path / "packed") == pytest.approx(losses(tmp_path / "padded"), abs=1e-5)
    padded = read_metrics(tmp_path / "padded")[-1]
    assert padded["total_tokens_including_padding"] > padded["total_tokens"]
    assert padded["total_tokens"] == read_metrics(tmp_path / "packed")[-1]["total_tokens"]


def test_gradient_checkpointing_does_not_change_training(tiny_model_dir, tmp_path):
    finetune(base_args(tiny_model_dir, tmp_path / "plain", 3))
    finetune(base_args(tiny_model_dir, tmp_path / "ckpt", 3, "--gradient_checkpointing"))
    assert losses(tmp_path / "plain") == pytest.approx(losses(tmp_path / "ckpt"), abs=1e-6)
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["use_cache"] is True


def test_checkpointing_steps_writes_complete_checkpoints(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    finetune(base_args(tiny_model_dir, out, 4, "--checkpointing_steps", "2", "--logging_steps", "2"))
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["step_2", "step_4"]
    for name in checkpoints:
        assert json.loads((out / "checkpoints" / name / "COMPLETED").read_text())["step"] == int(name.split("_")[1])
        assert any((out / "checkpoints" / name).glob("*.safetensors")) or any((out / "checkpoints" / name).glob("*.bin"))
    assert [m["step"] for m in read_metrics(out)] == [2, 4]


def test_bad_data_fails_before_anything_expensive(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    result = finetune(["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(out),
                       "--dataset_mixer_list", "data/missing.jsonl", "1.0"], check=False)
    assert result.returncode == 2
    assert "data/missing.jsonl does not exist" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()  # nothing was written: the spec failed before the run started


def test_malformed_jsonl_names_file_and_line(tiny_model_dir, tmp_path):
    data = tmp_path / "chat.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    data.write_text(f"{good}\n{good}\n{{not json\n")
    result = finetune(["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(tmp_path / "run"),
                       "--dataset_mixer_list", str(data), "2"], check=False)
    assert result.returncode == 2
    assert f"{data}:3: invalid JSON" in result.stderr


def test_missing_chat_template_is_a_clear_error(tiny_model_dir, tmp_path):
    model = copy_without_template(tiny_model_dir, tmp_path / "no-template")
    result = finetune(["--model_name_or_path", str(model), "--output_dir", str(tmp_path / "run"),
                       "--dataset_mixer_list", "synthetic:spelling", "8"], check=False)
    assert result.returncode == 2
    assert "no chat template" in result.stderr and "--chat_template_name" in result.stderr
    # Naming a template makes the same model usable.
    finetune(base_args(model, tmp_path / "ok", 1, "--chat_template_name", "tulu"))


def test_unknown_flag_is_rejected(tiny_model_dir, tmp_path):
    result = finetune(base_args(tiny_model_dir, tmp_path / "run", 1, "--learning_rat", "1e-4"), check=False)
    assert result.returncode == 2 and "--learning_rat" in result.stderr


def test_with_tracking_logs_to_wandb_offline(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    result = finetune(base_args(tiny_model_dir, out, 2, "--with_tracking", "--report_to", "wandb",
                                "--wandb_project_name", "sft-test"))
    assert "wandb runs offline" in result.stderr + result.stdout
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    records = b"".join(p.read_bytes() for p in runs[0].glob("*.wandb"))
    assert b"train_loss" in records and b"per_device_tps_including_padding" in records
    assert b"sft-test" in records  # the project name and the resolved config went with the run


def test_push_to_hub_without_login_fails_before_training(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    result = finetune(base_args(tiny_model_dir, out, 2, "--push_to_hub"), check=False)
    assert result.returncode == 2
    assert "--push_to_hub needs a Hugging Face login" in result.stderr
    assert not (out / "metrics.jsonl").exists()


# A child trainer whose hub client records its calls in argv[1]: uploads to the paths in argv[2] (a JSON list; null is
# the final model) answer HTTP 403. The trainer's own arguments follow.
RECORDING_HUB = """
import json, os, sys, time
from pathlib import Path
import httpx2
from huggingface_hub.errors import HfHubHTTPError
import open_instruct.hub as hub

calls_file, refused = sys.argv[1], json.loads(sys.argv[2])
calls = []

def record(method, *args, **kwargs):
    calls.append([method, list(args), kwargs])
    Path(calls_file).write_text(json.dumps(calls))

class RecordingApi:
    def whoami(self):
        return {"name": "tester"}
    def create_repo(self, repo_id, **kwargs):
        record("create_repo", repo_id, **kwargs)
    def create_branch(self, repo_id, **kwargs):
        record("create_branch", repo_id, **kwargs)
    def upload_folder(self, **kwargs):
        time.sleep(float(os.environ.get("SLOW_UPLOAD_SECONDS", "0")))  # files are listed after the wait
        folder = Path(kwargs["folder_path"])
        record("upload_folder", files=sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()),
               **kwargs)
        if kwargs["path_in_repo"] in refused:
            request = httpx2.Request("POST", "https://huggingface.co/api/models/x/commit")
            raise HfHubHTTPError("403 Forbidden: no write access", response=httpx2.Response(403, request=request))

hub.HfApi = RecordingApi
from open_instruct.finetune import main
main(sys.argv[3:])
"""


def run_with_recording_hub(tmp_path, args, refused=(), env=None):
    calls = tmp_path / "calls.json"
    result = run([sys.executable, "-c", RECORDING_HUB, str(calls), json.dumps(list(refused)), *with_cache_dir(args)],
                 env=env)
    return result, json.loads(calls.read_text())


def test_push_to_hub_uploads_checkpoints_and_the_final_model_without_leaking_the_token(tiny_model_dir, tmp_path):
    """The real upload path in a child process with a recording HfApi: the repo and the run's branch, then each
    checkpoint and the final model with its card, in order; the token in the environment reaches no output."""
    out = tmp_path / "run"
    secrets = ("hf_SentinelTokenDoNotLeak4242", "wandb-sentinel-key-4242")
    env = clean_env(HF_TOKEN=secrets[0], WANDB_API_KEY=secrets[1])
    args = base_args(tiny_model_dir, out, 2, "--push_to_hub", "--push_checkpoints", "--checkpointing_steps", "1")
    result, calls = run_with_recording_hub(tmp_path, args, env=env)
    assert [c[0] for c in calls] == ["create_repo", "create_branch", "upload_folder", "upload_folder", "upload_folder"]
    assert calls[0][1] == ["tester/finetune"] and calls[0][2]["private"] is True
    assert calls[1][1] == ["tester/finetune"] and calls[1][2]["branch"] == "finetune"  # the run name
    uploads = [c[2] for c in calls[2:]]
    assert [u["path_in_repo"] for u in uploads] == ["checkpoints/step_1", "checkpoints/step_2", None]
    assert all(u["repo_id"] == "tester/finetune" and u["revision"] == "finetune" for u in uploads)
    assert uploads[0]["folder_path"] == str((out / "checkpoints" / "step_1").resolve())
    assert "COMPLETED" in uploads[0]["files"]
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md"} <= set(uploads[2]["files"])
    assert "checkpoints/**" in uploads[2]["ignore_patterns"]
    assert not any("token" in c[2] for c in calls)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["hub_url"] == "https://huggingface.co/tester/finetune/tree/finetune"
    assert "hub_upload_failed" not in summary
    card = (out / "README.md").read_text()
    assert "## Final metrics" in card and f"| last_train_loss | {summary['last_train_loss']} |" in card
    # The secrets reach no log line and no file of the run.
    logs = (result.stdout + result.stderr).encode()
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for secret in secrets:
        assert secret.encode() not in logs
        assert [p for p, content in files.items() if secret.encode() in content] == []


def test_failed_hub_uploads_are_reported_at_the_end_and_the_model_stays(tiny_model_dir, tmp_path):
    """A refused checkpoint upload does not stop training or the next uploads; a refused final upload does not fail
    the run: both are reported in the summary, with the model on local disk."""
    out = tmp_path / "run"
    result, calls = run_with_recording_hub(
        tmp_path, base_args(tiny_model_dir, out, 2, "--push_to_hub", "--push_checkpoints", "--checkpointing_steps", "1",
                            "--exp_name", "run7", "--hf_entity", "my-org", "--hf_repo_revision", "try-1"),
        refused=["checkpoints/step_1", None])
    uploads = [c[2] for c in calls if c[0] == "upload_folder"]
    assert [u["path_in_repo"] for u in uploads] == ["checkpoints/step_1", "checkpoints/step_2", None]  # 403: once each
    assert all(u["repo_id"] == "my-org/run7" and u["revision"] == "try-1" for u in uploads)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["hub_url"] == "https://huggingface.co/my-org/run7/tree/try-1"
    failed = summary["hub_upload_failed"]
    assert "checkpoints/step_1: HTTP 403" in failed and "final model: HTTP 403" in failed
    assert "checkpoints/step_2" not in failed
    assert "hub_upload_failed" in result.stdout and "Hub upload of final model failed" in result.stderr
    assert (out / "model.safetensors").is_file() and (out / "checkpoints" / "step_1" / "COMPLETED").is_file()


def test_checkpoints_still_uploading_are_not_pruned_until_their_upload_is_done(tiny_model_dir, tmp_path):
    """--keep_last_n_checkpoints 1 with slow checkpoint uploads: each checkpoint is still whole when its upload runs
    (the prune skips it while it is queued), and at the end only the newest is left on disk."""
    out = tmp_path / "run"
    _, calls = run_with_recording_hub(
        tmp_path, base_args(tiny_model_dir, out, 3, "--push_to_hub", "--push_checkpoints", "--checkpointing_steps", "1",
                            "--keep_last_n_checkpoints", "1"), env=clean_env(SLOW_UPLOAD_SECONDS="1.5"))
    uploads = [c[2] for c in calls if c[0] == "upload_folder"]
    assert [u["path_in_repo"] for u in uploads] == ["checkpoints/step_1", "checkpoints/step_2", "checkpoints/step_3",
                                                    None]
    assert all("COMPLETED" in u["files"] for u in uploads[:3])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_3"]


def test_debug_script_interface(tiny_model_dir, tmp_path):
    """Extra flags override the recipe's; OUTPUT_DIR and TINY_MODEL_DIR are honoured; the recipe evaluates before and
    after training; the held-out check runs."""
    out = tmp_path / "debug"
    env = clean_env(OUTPUT_DIR=str(out), TINY_MODEL_DIR=str(tiny_model_dir), PYTHON=sys.executable,
                    PATH=f"{REPO / '.venv' / 'bin'}:{clean_env()['PATH']}")
    result = subprocess.run(["bash", "scripts/train/debug/finetune.sh",
                             *with_cache_dir(["--max_train_steps", "5", "--logging_steps", "1",
                                              "--eval_max_examples", "4"])],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert [m["step"] for m in read_metrics(out) if "train_loss" in m] == [1, 2, 3, 4, 5]
    evals = [m for m in read_metrics(out) if "eval_seconds" in m]
    assert [m["step"] for m in evals] == [0, 5]
    assert {"eval_loss", "eval_bits_per_byte", "eval/spelling_accuracy", "eval/reverse_accuracy",
            "eval/spelling_majority_baseline", "eval/reverse_majority_baseline",
            "eval/centered_accuracy"} <= set(evals[0])
    assert not any("letter_count" in key for key in evals[0])  # dropped from the demo: never learned
    assert "held-out exact match:" in result.stdout
    assert (out / "model.safetensors").is_file()


def test_tools_recipe_trains_and_evaluates_tool_calls_and_reasoning(tiny_model_dir, tmp_path):
    """scripts/train/debug/finetune_tools.sh: the hermes-rendered tool_calc and reasoning rows train, the three
    generation scores are logged before and after, the stats count reasoning, calls and results, and the held-out
    check prints the model's calls."""
    out = tmp_path / "tools"
    env = clean_env(OUTPUT_DIR=str(out), TINY_MODEL_DIR=str(tiny_model_dir), PYTHON=sys.executable)
    result = subprocess.run(["bash", "scripts/train/debug/finetune_tools.sh",
                             *with_cache_dir(["--dataset_mixer_list", "synthetic:tool_calc", "32", "synthetic:reasoning",
                                              "32", "--max_train_steps", "3", "--logging_steps", "1",
                                              "--eval_max_examples", "2", "--eval_tasks", "tool_calc", "reasoning"])],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    evals = [m for m in read_metrics(out) if "eval_seconds" in m]
    assert [m["step"] for m in evals] == [0, 3]
    assert {"eval/tool_calc_call_accuracy", "eval/tool_calc_answer_accuracy", "eval/reasoning_accuracy"} <= set(evals[0])
    stats = {s["name"]: s for s in json.loads((out / "dataset_stats.json").read_text())}
    assert (stats["synthetic:tool_calc"]["rows_with_tool_calls"], stats["synthetic:tool_calc"]["tool_results"]) == (32, 32)
    assert (stats["synthetic:reasoning"]["rows_with_reasoning"], stats["synthetic:reasoning"]["rows_with_tool_calls"]) == (32, 0)
    assert "user: What is" in result.stdout and "held-out exact match:" in result.stdout


def test_debug_script_trains_a_given_model_and_dataset(tiny_model_dir, tmp_path):
    """MODEL=... DATASET=... takes the real-model branch of the recipe with no code change (local paths here)."""
    data = tmp_path / "chats.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"say {i}"}, {"role": "assistant", "content": str(i)}]}
            for i in range(8)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "real"
    env = clean_env(OUTPUT_DIR=str(out), MODEL=str(tiny_model_dir), DATASET=f"{data} 8", PYTHON=sys.executable)
    result = subprocess.run(["bash", "scripts/train/debug/finetune.sh", *with_cache_dir([])], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = read_metrics(out)
    assert len(metrics) == 4  # 8 rows / (1 per device x 4 accumulation) x 2 epochs
    assert metrics[0]["learning_rate"] <= 5e-6  # the real-model recipe, not the tiny one
    assert (out / "model.safetensors").is_file()


def test_mixer_file_audit_and_cache_reuse(tiny_model_dir, tmp_path):
    """A mixture file with a sharegpt source trains; the audit shows exactly the replies + eos as trained; a second
    run with the same data flags loads the cache instead of tokenizing again."""
    chats = tmp_path / "chats.jsonl"
    rows = [{"dialog": [{"from": "human", "value": f"say {i}"}, {"from": "gpt", "value": f"ok {i}"}]} for i in range(16)]
    chats.write_text("".join(json.dumps(row) + "\n" for row in rows))
    mixture = tmp_path / "mixture.yaml"
    mixture.write_text(f"- {{name: {chats}, amount: 16, format: sharegpt, columns: {{conversations: dialog}}}}\n"
                       "- {name: 'synthetic:spelling', amount: 16}\n")
    cache, audit = tmp_path / "cache", tmp_path / "audit.jsonl"
    args = ["--model_name_or_path", str(tiny_model_dir), "--dataset_mixer_file", str(mixture),
            "--per_device_train_batch_size", "4", "--max_train_steps", "2", "--dataset_local_cache_dir", str(cache)]
    first = finetune([*args, "--output_dir", str(tmp_path / "a"), "--audit_file", str(audit)])
    assert "Cached the tokenized mixture" in first.stderr
    stats = json.loads((tmp_path / "a" / "dataset_stats.json").read_text())
    assert [(s["format"], s["kept_rows"]) for s in stats] == [("sharegpt", 16), ("messages", 16)]
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    sharegpt = [r for r in records if r["source"] == str(chats)]
    assert len(sharegpt) >= 2
    for record in sharegpt:  # rows are sampled in random order: match each reply to its own prompt's number
        number = re.search(r"say (\d+)", "".join(s["text"] for s in record["segments"])).group(1)
        assert [s["text"] for s in record["segments"] if s["trained"]] == [f"ok {number}<|endoftext|>"]
    second = finetune([*args, "--output_dir", str(tmp_path / "b")])
    assert "Loading the tokenized mixture" in second.stderr and "Tokenizing" not in second.stderr
    assert read_metrics(tmp_path / "a")[0]["train_loss"] == read_metrics(tmp_path / "b")[0]["train_loss"]


def test_loss_reduction_sum_is_the_token_sum(tiny_model_dir, tmp_path):
    """sum: the gradient is the mean's gradient times the global batch's trained-token count (the logged loss stays
    per token). A huge clip value logs the norm without clipping."""
    runs = {}
    for reduction in ("mean", "sum"):
        finetune(base_args(tiny_model_dir, tmp_path / reduction, 1, "--loss_reduction", reduction,
                           "--clip_grad_norm", "1e9"))
        runs[reduction] = read_metrics(tmp_path / reduction)[0]
    assert runs["sum"]["train_loss"] == pytest.approx(runs["mean"]["train_loss"], rel=1e-6)
    trained = runs["mean"]["trained_tokens"]
    assert runs["sum"]["grad_norm"] == pytest.approx(runs["mean"]["grad_norm"] * trained, rel=1e-4)


def test_padded_and_padding_free_gradients_match(tiny_model_dir, tmp_path):
    finetune(base_args(tiny_model_dir, tmp_path / "packed", 3, "--clip_grad_norm", "1e9"))
    finetune(base_args(tiny_model_dir, tmp_path / "padded", 3, "--clip_grad_norm", "1e9", "--no_padding_free"))
    for packed, padded in zip(read_metrics(tmp_path / "packed"), read_metrics(tmp_path / "padded")):
        assert packed["grad_norm"] == pytest.approx(padded["grad_norm"], rel=1e-5)


def test_use_liger_kernel_trains_identically_with_the_chunked_loss(tiny_model_dir, tmp_path):
    """--use_liger_kernel on CPU: PyTorch's ops plus the chunked loss give the same losses and gradients; the saved
    model is the plain Hugging Face model (no wrapper keys)."""
    finetune(base_args(tiny_model_dir, tmp_path / "plain", 3, "--clip_grad_norm", "1e9"))
    result = finetune(base_args(tiny_model_dir, tmp_path / "fused", 3, "--clip_grad_norm", "1e9", "--use_liger_kernel"))
    assert "chunked linear cross-entropy" in result.stderr
    for plain, fused in zip(read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "fused")):
        assert fused["train_loss"] == pytest.approx(plain["train_loss"], abs=1e-5)
        assert fused["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-4)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fused")
    assert not any(name.startswith("lm.") for name, _ in model.named_parameters())


def layout_args(model_dir, output_dir, steps, *extra):
    """base_args' data and optimizer with the global batch given as a total (no per-device batch)."""
    return ["--model_name_or_path", str(model_dir), "--output_dir", str(output_dir),
            "--dataset_mixer_list", "synthetic:spelling", "96", "synthetic:arithmetic", "32", "--max_seq_length", "256",
            "--learning_rate", "2e-3", "--max_train_steps", str(steps), "--seed", "1", "--clip_grad_norm", "1e9", *extra]


def test_packed_rows_of_a_token_budget_train_like_fixed_micro_batches(tiny_model_dir, tmp_path):
    """The same 12-example global batches, cut into 3 balanced micro-batches or into as many <=256-token rows as
    best-fit-decreasing needs: identical losses and gradients (the normalizer is the global batch's trained tokens)."""
    finetune(layout_args(tiny_model_dir, tmp_path / "fixed", 3, "--global_batch_size", "12",
                         "--gradient_accumulation_steps", "3"))
    finetune(layout_args(tiny_model_dir, tmp_path / "rows", 3, "--global_batch_size", "12",
                         "--max_tokens_per_micro_batch", "256"))
    for fixed, rows in zip(read_metrics(tmp_path / "fixed"), read_metrics(tmp_path / "rows"), strict=True):
        assert rows["total_tokens"] == fixed["total_tokens"]
        assert rows["train_loss"] == pytest.approx(fixed["train_loss"], abs=1e-6)
        assert rows["grad_norm"] == pytest.approx(fixed["grad_norm"], rel=1e-5)


def test_global_batch_tokens_fills_each_step_to_the_budget(tiny_model_dir, tmp_path):
    finetune(layout_args(tiny_model_dir, tmp_path / "run", 5, "--global_batch_tokens", "700",
                         "--max_tokens_per_micro_batch", "256"))
    totals = [0] + [m["total_tokens"] for m in read_metrics(tmp_path / "run")]
    per_step = [b - a for a, b in zip(totals, totals[1:])]
    assert len(per_step) == 5 and all(700 - 256 < tokens <= 700 for tokens in per_step), per_step


@pytest.mark.gpu
def test_trainer_on_cuda_with_liger_and_packed_rows(tiny_model_dir, tmp_path):
    """bf16 autocast on a GPU, Liger's kernels and the chunked loss, packed rows: trains like the plain run."""
    plain, fused = tmp_path / "plain", tmp_path / "fused"
    common = ("--global_batch_size", "12", "--max_tokens_per_micro_batch", "256")
    env = clean_env(ACCELERATE_MIXED_PRECISION="bf16")
    finetune(layout_args(tiny_model_dir, plain, 20, *common), env=env)
    result = finetune(layout_args(tiny_model_dir, fused, 20, *common, "--use_liger_kernel"), env=env)
    assert "Liger needs CUDA" not in result.stderr
    a, b = losses(plain), losses(fused)
    assert b[-1] < 0.7 * b[0]
    assert b == pytest.approx(a, rel=2e-2)
