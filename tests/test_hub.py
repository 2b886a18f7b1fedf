"""Hub uploads without a network: a fake client stands in for huggingface_hub.HfApi and records every call."""

from __future__ import annotations

import json
import threading

import httpx2
import pytest
from huggingface_hub import ModelCard
from huggingface_hub.errors import HfHubHTTPError

from open_instruct import hub
from open_instruct.args import parse_args

BASE = ["--model_name_or_path", "m", "--dataset_mixer_list", "synthetic:spelling", "1.0", "--push_to_hub"]
WAIT = 10  # seconds a fake waits for the test to release it: long only when the code under test is broken


def http_error(status: int) -> HfHubHTTPError:
    request = httpx2.Request("POST", "https://huggingface.co/api/models/tester/run/upload")
    return HfHubHTTPError(f"{status} Client Error: for url {request.url}\nmore detail",
                          response=httpx2.Response(status, request=request))


class FakeApi:
    """Records calls as (method, args, kwargs). `errors[method]` lists exceptions its next calls raise, in order;
    `gate`, when given, holds each upload_folder call until the test sets it."""

    def __init__(self, user: str = "tester", errors: dict | None = None, gate: threading.Event | None = None):
        self.user, self.errors, self.gate = user, errors or {}, gate
        self.calls: list[tuple] = []
        self.started = threading.Event()
        self.released: list[bool] = []

    def _call(self, method: str, *args, **kwargs):
        self.calls.append((method, args, kwargs))
        pending = self.errors.get(method)
        if pending:
            raise pending.pop(0)

    def whoami(self):
        self._call("whoami")
        return {"name": self.user}

    def create_repo(self, repo_id, **kwargs):
        self._call("create_repo", repo_id, **kwargs)

    def create_branch(self, repo_id, **kwargs):
        self._call("create_branch", repo_id, **kwargs)

    def upload_folder(self, **kwargs):
        self.started.set()
        if self.gate is not None:
            self.released.append(self.gate.wait(WAIT))
        self._call("upload_folder", **kwargs)

    def methods(self) -> list[str]:
        return [call[0] for call in self.calls]

    def uploads(self) -> list[dict]:
        return [kwargs for method, _, kwargs in self.calls if method == "upload_folder"]


def uploader(api: FakeApi, attempts: int = 3) -> hub.HubUploader:
    return hub.HubUploader("tester/run", "run-branch", api, attempts=attempts, base_delay=0.001)


@pytest.fixture
def folders(tmp_path):
    final = tmp_path / "out"
    steps = [final / "checkpoints" / f"step_{n}" for n in (1, 2)]
    for folder in steps:
        folder.mkdir(parents=True)
    return final, steps


# --- repo id and revision -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, expected",
    [
        ([], "tester/finetune"),
        (["--exp_name", "run7"], "tester/run7"),
        (["--hf_entity", "my-org"], "my-org/finetune"),
        (["--hf_repo_id", "named"], "tester/named"),
        (["--hf_repo_id", "named", "--hf_entity", "my-org"], "my-org/named"),
        (["--hf_repo_id", "other-org/named"], "other-org/named"),
    ],
)
def test_repo_id_names_entity_and_repo(extra, expected):
    assert hub.resolve_repo_id(parse_args(BASE + extra), FakeApi()) == expected


def test_repo_id_checks_the_login():
    api = FakeApi(errors={"whoami": [http_error(401)]})
    with pytest.raises(hub.HubError, match="needs a Hugging Face login: set HF_TOKEN"):
        hub.resolve_repo_id(parse_args(BASE + ["--hf_repo_id", "org/name"]), api)


@pytest.mark.parametrize("extra, expected", [([], "finetune"), (["--exp_name", "run7"], "run7"),
                                             (["--exp_name", "run7", "--hf_repo_revision", "v2"], "v2")])
def test_revision_defaults_to_the_run_name(extra, expected):
    assert hub.repo_revision(parse_args(BASE + extra)) == expected


# --- calls and order ----------------------------------------------------------------------------------------------


def test_repo_and_branch_are_created_once_then_uploads_keep_their_order(folders):
    final, (step_1, step_2) = folders
    api = FakeApi()
    up = uploader(api)
    up.upload_checkpoint(step_1, 1)
    up.upload_checkpoint(step_2, 2)
    up.upload_final(final)
    report = up.finish()
    assert api.methods() == ["create_repo", "create_branch", "upload_folder", "upload_folder", "upload_folder"]
    assert api.calls[0] == ("create_repo", ("tester/run",), {"private": True, "exist_ok": True})
    assert api.calls[1] == ("create_branch", ("tester/run",), {"branch": "run-branch", "exist_ok": True})
    uploads = api.uploads()
    assert [u["path_in_repo"] for u in uploads] == ["checkpoints/step_1", "checkpoints/step_2", None]
    assert [u["folder_path"] for u in uploads] == [str(step_1), str(step_2), str(final)]
    assert all(u["revision"] == "run-branch" and u["repo_id"] == "tester/run" for u in uploads)
    assert {"checkpoints/**", "wandb/**", "*.tmp"} <= set(uploads[2]["ignore_patterns"])
    assert not any("token" in kwargs for _, _, kwargs in api.calls)  # huggingface_hub finds the token itself
    assert report == {"url": "https://huggingface.co/tester/run/tree/run-branch", "repo_id": "tester/run",
                      "revision": "run-branch", "uploaded": ["checkpoints/step_1", "checkpoints/step_2", "final model"],
                      "failed": {}}


def test_upload_final_does_not_block_the_caller(folders):
    final, _ = folders
    api = FakeApi(gate=threading.Event())
    up = uploader(api)
    up.upload_final(final)  # a blocking upload would wait WAIT seconds here for a gate nobody has set yet
    assert api.started.wait(WAIT)
    api.gate.set()
    assert up.finish()["uploaded"] == ["final model"]
    assert api.released == [True]


def test_busy_while_an_upload_is_queued_or_running(folders):
    final, (step_1, step_2) = folders
    api = FakeApi(gate=threading.Event())
    up = uploader(api)
    up.upload_checkpoint(step_1, 1)
    up.upload_checkpoint(str(step_2), 2)  # queued behind step_1's held upload
    assert api.started.wait(WAIT)
    assert up.busy(step_1) and up.busy(step_2)
    assert up.busy(final / "checkpoints" / "." / "step_2")  # the same folder spelled differently
    assert not up.busy(final)
    api.gate.set()
    up.finish()
    assert not up.busy(step_1) and not up.busy(step_2)


# --- retries and failures -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("error", [http_error(503), http_error(500), http_error(429), ConnectionError("reset"),
                                   httpx2.ReadTimeout("read timed out"), httpx2.ConnectError("refused")])
def test_a_transient_error_is_retried(folders, error):
    final, _ = folders
    api = FakeApi(errors={"upload_folder": [error, error]})
    up = uploader(api, attempts=3)
    up.upload_final(final)
    report = up.finish()
    assert api.methods().count("upload_folder") == 3
    assert report["uploaded"] == ["final model"] and report["failed"] == {}


def test_repo_creation_is_retried_too(folders):
    final, _ = folders
    api = FakeApi(errors={"create_repo": [http_error(502)]})
    up = uploader(api)
    up.upload_final(final)
    assert up.finish()["failed"] == {}
    assert api.methods() == ["create_repo", "create_repo", "create_branch", "upload_folder"]


@pytest.mark.parametrize("status", [401, 403, 404])
def test_a_client_error_fails_at_once(folders, status):
    final, (step_1, _) = folders
    api = FakeApi(errors={"upload_folder": [http_error(status)]})
    up = uploader(api, attempts=5)
    up.upload_checkpoint(step_1, 1)
    up.upload_final(final)
    report = up.finish()
    assert api.methods().count("upload_folder") == 2  # one attempt for the checkpoint, then the final model
    assert report["uploaded"] == ["final model"]
    reason = report["failed"]["checkpoints/step_1"]
    assert reason.startswith(f"HTTP {status} HfHubHTTPError") and "\n" not in reason and "gave up" not in reason


def test_giving_up_after_the_last_attempt_is_reported_not_raised(folders):
    final, _ = folders
    api = FakeApi(errors={"upload_folder": [http_error(500) for _ in range(4)]})
    up = uploader(api, attempts=4)
    up.upload_final(final)
    report = up.finish()  # returns: a failed upload never raises
    assert api.methods().count("upload_folder") == 4
    assert report["uploaded"] == []
    assert report["failed"] == {"final model": "HTTP 500 HfHubHTTPError: 500 Client Error: for url "
                                               "https://huggingface.co/api/models/tester/run/upload "
                                               "(gave up after 4 attempts)"}
    fields = hub.summary_fields(report)
    assert fields["hub_url"] == report["url"] and "final model: HTTP 500" in fields["hub_upload_failed"]


def test_a_repo_that_cannot_be_created_fails_every_upload_without_uploading(folders):
    final, (step_1, _) = folders
    api = FakeApi(errors={"create_repo": [http_error(403), http_error(403)]})
    up = uploader(api)
    up.upload_checkpoint(step_1, 1)
    up.upload_final(final)
    report = up.finish()
    assert "upload_folder" not in api.methods() and "create_branch" not in api.methods()
    assert set(report["failed"]) == {"checkpoints/step_1", "final model"}
    assert all("HTTP 403" in reason for reason in report["failed"].values())


def test_offline_mode_is_not_retried(folders):
    from huggingface_hub.errors import OfflineModeIsEnabled

    final, _ = folders
    api = FakeApi(errors={"upload_folder": [OfflineModeIsEnabled("HF_HUB_OFFLINE=1")]})
    up = uploader(api, attempts=5)
    up.upload_final(final)
    assert "OfflineModeIsEnabled" in up.finish()["failed"]["final model"]
    assert api.methods().count("upload_folder") == 1


def test_a_token_in_an_error_message_is_masked(folders, monkeypatch):
    secret = "hf_SentinelTokenValue987"
    monkeypatch.setenv("HF_TOKEN", secret)
    final, _ = folders
    api = FakeApi(errors={"upload_folder": [http_error(403)]})
    api.errors["upload_folder"][0].args = (f"403 Forbidden: bad token {secret}",)
    up = uploader(api)
    up.upload_final(final)
    reason = up.finish()["failed"]["final model"]
    assert secret not in reason and "***" in reason


def test_no_upload_after_finish(folders):
    final, _ = folders
    up = uploader(FakeApi())
    up.finish()
    with pytest.raises(RuntimeError, match="finish"):
        up.upload_final(final)


# --- model card ---------------------------------------------------------------------------------------------------


def test_model_card_records_model_data_hyperparameters_and_metrics(tmp_path):
    data = tmp_path / "chat.jsonl"
    data.write_text("{}\n")
    args = parse_args(["--model_name_or_path", "allenai/base-model", "--push_to_hub", "--exp_name", "run7",
                       "--dataset_mixer_list", "allenai/tulu-mix@v2", "0.5", str(data), "100", "synthetic:spelling",
                       "1.0", "--learning_rate", "3e-5", "--lr_scheduler_type", "cosine", "--max_seq_length", "512",
                       "--loss_reduction", "sum", "--seed", "7", "--gradient_accumulation_steps", "4"])
    stats = [{"name": "allenai/tulu-mix@v2", "split": "train", "kept_rows": 11, "tokens": 1234, "trained_tokens": 600},
             {"name": str(data), "split": "train", "kept_rows": 100, "tokens": 5000, "trained_tokens": 2500},
             {"name": "synthetic:spelling", "split": "train", "kept_rows": 64, "tokens": 900, "trained_tokens": 300}]
    out = tmp_path / "out"
    out.mkdir()
    (out / "dataset_stats.json").write_text(json.dumps(stats))
    summary = {"steps": 40, "first_train_loss": 2.5, "last_train_loss": 0.75, "total_tokens": 7134,
               "per_device_tps": 321.5, "model_dir": str(out)}
    path = hub.write_model_card(out, args, summary, repo_id="org/run7", revision="run7", num_processes=2)
    card = ModelCard.load(path)
    assert card.data.base_model == "allenai/base-model"
    assert card.data.library_name == "transformers"
    assert card.data.datasets == ["allenai/tulu-mix"]  # hub ids only, without the revision
    assert "sft" in card.data.tags
    text = card.text
    for section in ("## Base model", "## Data mixture", "## Hyperparameters", "## Final metrics", "## Usage"):
        assert section in text
    assert "| `allenai/tulu-mix@v2` | train | 0.5 x the split | 11 | 1234 | 600 |" in text
    assert f"| `{data}` | train | 100 rows | 100 | 5000 | 2500 |" in text
    assert "| learning rate | 3e-05 |" in text and "| loss_reduction | sum |" in text
    assert "| scheduler | cosine, warmup ratio 0.03, final LR ratio 0.0 |" in text
    assert "| training length | 2 epochs = 40 optimizer steps |" in text
    assert "| seed | 7 |" in text and "512" in text and "| padding_free | True |" in text
    assert "1 per device x 4 accumulation steps x 2 processes = 8 examples per optimizer step" in text
    assert "| first_train_loss | 2.5 |" in text and "| last_train_loss | 0.75 |" in text
    assert "| per_device_tps | 321.5 |" in text
    assert 'from_pretrained("org/run7", revision="run7")' in text
    assert "## Evaluation" not in text  # the run did not evaluate


def test_model_card_shows_the_evaluation_before_final_and_best(tmp_path):
    args = parse_args(["--model_name_or_path", "allenai/base-model", "--dataset_mixer_list", "synthetic:spelling",
                       "1.0", "--eval_fraction", "0.1"])
    summary = {"steps": 40, "mfu": 0.31, "initial_eval_loss": 5.6791, "final_eval_loss": 1.44903,
               "best_eval_loss": 1.40001, "best_eval_loss_step": 30, "initial_eval_spelling_accuracy": 0.0,
               "final_eval_spelling_accuracy": 0.5, "best_eval_spelling_accuracy": 0.5,
               "best_eval_spelling_accuracy_step": 40}
    text = ModelCard.load(hub.write_model_card(tmp_path, args, summary, [])).text
    assert "| mfu | 0.31 |" in text
    assert "| eval_loss | 5.679 | 1.449 | 1.4 (step 30) |" in text
    assert "| eval_spelling_accuracy | 0 | 0.5 | 0.5 (step 40) |" in text
    assert text.index("## Evaluation") < text.index("## Usage")


def test_a_lora_run_uploads_its_adapter_and_merged_model_but_no_unfinished_save():
    """The final upload's ignore patterns, applied by huggingface_hub's own filter to a LoRA run folder."""
    from huggingface_hub.utils import filter_repo_objects

    files = ["adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "README.md", "metrics.jsonl",
             "merged/config.json", "merged/model.safetensors", ".adapter.tmp/adapter_model.safetensors",
             ".merged.tmp/model.safetensors", "checkpoints/step_4/model.safetensors", "wandb/run/files.txt",
             "tensorboard/proj/events.out.tfevents.1", "mlruns/1/run/metrics/train_loss"]
    kept = set(filter_repo_objects(files, ignore_patterns=hub.UPLOAD_IGNORE))
    assert kept == {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "README.md",
                    "metrics.jsonl", "merged/config.json", "merged/model.safetensors"}


def test_model_card_of_a_lora_run_says_how_to_load_the_adapter_and_the_merged_model(tmp_path):
    args = parse_args(["--model_name_or_path", "allenai/base-model", "--dataset_mixer_list", "synthetic:spelling",
                       "1.0", "--use_lora", "--lora_rank", "16", "--lora_learning_rate", "2e-4",
                       "--merge_lora_on_save"])
    card = ModelCard.load(hub.write_model_card(tmp_path, args, {"steps": 3, "trainable_parameters": 1234}, [],
                                               repo_id="org/run", revision="run"))
    assert card.data.library_name == "peft" and "lora" in card.data.tags
    text = card.text
    assert "| fine-tune | LoRA, rank 16, alpha 16, dropout 0.1, on all linear projections |" in text
    assert "| learning rate | adapters 0.0002 |" in text
    assert "| trainable_parameters | 1234 |" in text
    assert 'AutoPeftModelForCausalLM.from_pretrained("org/run", revision="run")' in text
    assert 'AutoModelForCausalLM.from_pretrained("org/run", revision="run", subfolder="merged")' in text


def test_model_card_of_a_local_base_model_has_no_base_model_metadata(tmp_path):
    model = tmp_path / "local-model"
    model.mkdir()
    args = parse_args(["--model_name_or_path", str(model), "--dataset_mixer_list", "synthetic:spelling", "8",
                       "--push_to_hub", "--global_batch_tokens", "4096"])
    card = ModelCard.load(hub.write_model_card(tmp_path, args, {"steps": 3}, []))
    assert card.data.base_model is None and card.data.datasets is None
    assert f"`{model}`" in card.text and "4096 tokens per optimizer step" in card.text
