"""--report_to: several trackers at once (open_instruct/trackers.py), each with the same metrics and config."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import clean_env, finetune, train_args
from open_instruct import trackers
from open_instruct.args import parse_args

BASE = ["--model_name_or_path", "m", "--dataset_mixer_list", "synthetic:spelling", "1.0"]
SENTINELS = {"HF_TOKEN": "hf_SENTINEL_do_not_log_4242", "WANDB_API_KEY": "wandb_SENTINEL_do_not_log_4242"}


def _exit_message(argv, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        parse_args(argv)
    assert info.value.code == 2
    return capsys.readouterr().err.split("error:", 1)[1]


def test_report_to_takes_several_trackers_from_the_command_line_and_yaml(tmp_path):
    assert parse_args(BASE).report_to == ["wandb"]
    args = parse_args([*BASE, "--with_tracking", "--report_to", "wandb", "tensorboard", "mlflow"])
    assert args.report_to == ["wandb", "tensorboard", "mlflow"]
    config = tmp_path / "c.yaml"
    config.write_text("model_name_or_path: m\ndataset_mixer_list: [synthetic:spelling, '1.0']\nwith_tracking: true\n"
                      "report_to: [tensorboard, mlflow]\n")
    assert parse_args([str(config)]).report_to == ["tensorboard", "mlflow"]
    config.write_text("model_name_or_path: m\ndataset_mixer_list: [synthetic:spelling, '1.0']\nwith_tracking: true\n"
                      "report_to: tensorboard\n")  # a single name, as before
    assert parse_args([str(config)]).report_to == ["tensorboard"]


@pytest.mark.parametrize("extra, fragment", [
    (["--with_tracking", "--report_to", "wandb", "neptune"], "--report_to 'neptune' is not supported"),
    (["--with_tracking", "--report_to", "wandb", "wandb"], "--report_to names wandb more than once"),
    (["--report_to", "tensorboard"], "--report_to has no effect without --with_tracking"),
])
def test_bad_report_to_exits(extra, fragment, capsys):
    assert fragment in _exit_message([*BASE, *extra], capsys)


def test_a_tracker_whose_package_is_missing_names_the_flag_and_the_install(monkeypatch, capsys):
    real = trackers.importlib.util.find_spec
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda name: None if name == "mlflow" else real(name))
    err = _exit_message([*BASE, "--with_tracking", "--report_to", "tensorboard", "mlflow"], capsys)
    lines = [line for line in err.splitlines() if "--report_to" in line]
    assert len(lines) == 1 and "pip install mlflow-skinny" in lines[0]


def test_accelerator_tracking_puts_tensorboard_under_the_output_dir(tmp_path):
    assert trackers.accelerator_tracking(parse_args(BASE)) == {"log_with": None}
    args = parse_args([*BASE, "--output_dir", str(tmp_path), "--with_tracking", "--report_to", "tensorboard", "mlflow"])
    kwargs = trackers.accelerator_tracking(args)
    assert kwargs["log_with"] == ["tensorboard", "mlflow"]
    assert kwargs["project_config"].logging_dir == str(tmp_path / "tensorboard")
    assert kwargs["project_config"].project_dir is None  # checkpoint naming stays the trainer's own


def test_the_log_names_where_each_tracker_writes_but_not_a_users_mlflow_uri(tmp_path, monkeypatch):
    args = parse_args([*BASE, "--with_tracking", "--report_to", "tensorboard", "mlflow"])
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert trackers.tracking_places(parse_args([*BASE, "--with_tracking"]), tmp_path, True)[0].startswith("wandb (")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://user:secret@mlflow.example")
    places = trackers.tracking_places(args, tmp_path, False)
    assert places == [f"tensorboard ({tmp_path / 'tensorboard'})", "mlflow (MLFLOW_TRACKING_URI)"]
    monkeypatch.delenv("TRACKIO_DIR", raising=False)
    (trackio,) = trackers.tracking_places(parse_args([*BASE, "--with_tracking", "--report_to", "trackio"]), tmp_path,
                                          True)
    assert trackio == (f"trackio ({tmp_path / 'trackio'}; to view: TRACKIO_DIR={tmp_path / 'trackio'} trackio show "
                       "--project open_instruct_internal)")


class RecordingAccelerator:
    is_main_process, trackers = True, []

    def init_trackers(self, project, config=None, init_kwargs=None):
        self.project, self.init_kwargs = project, init_kwargs


@pytest.mark.parametrize("resuming, mode", [(False, "never"), (True, "allow")])
def test_trackio_gets_the_config_at_init_and_a_resumed_run_continues_its_run(tmp_path, monkeypatch, resuming, mode):
    monkeypatch.setenv("TRACKIO_DIR", "")  # so that monkeypatch restores it, once init_tracking has set it
    monkeypatch.delenv("TRACKIO_DIR")
    args = parse_args([*BASE, "--with_tracking", "--report_to", "trackio", "--exp_name", "sft-x"])
    accelerator = RecordingAccelerator()
    trackers.init_tracking(accelerator, args, tmp_path, {"learning_rate": 1e-5}, resuming=resuming)
    assert accelerator.init_kwargs["trackio"] == {"name": "sft-x", "config": {"learning_rate": 1e-5}, "resume": mode}
    assert trackers.os.environ["TRACKIO_DIR"] == str(tmp_path / "trackio")  # its store under OUTPUT_DIR


def test_a_resumed_run_continues_its_wandb_run_and_a_fresh_one_gets_a_new_id(tmp_path):
    first = trackers.wandb_run_identity(tmp_path, resuming=False)
    assert set(first) == {"id"} and (tmp_path / "wandb" / "run_id").read_text() == first["id"] + "\n"
    assert trackers.wandb_run_identity(tmp_path, resuming=True) == {"id": first["id"], "resume": "allow"}
    fresh = trackers.wandb_run_identity(tmp_path, resuming=False)  # a new run into the directory: never joins
    assert fresh["id"] != first["id"] and "resume" not in fresh
    (tmp_path / "wandb" / "run_id").unlink()  # resuming a run that had no wandb before: a new run
    assert "resume" not in trackers.wandb_run_identity(tmp_path, resuming=True)


def test_scalar_config_writes_lists_and_none_as_text():
    flat = trackers.scalar_config({"a": [1, "x"], "b": None, "c": 1.5, "d": True, "e": "s", "f": 3})
    assert flat == {"a": "[1, 'x']", "b": "None", "c": 1.5, "d": True, "e": "s", "f": 3}


@pytest.mark.integration
def test_wandb_tensorboard_mlflow_and_trackio_get_the_same_metrics_and_no_secrets(tiny_model_dir, tmp_path,
                                                                                  monkeypatch):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    env = clean_env(WANDB_MODE="offline", **SENTINELS)
    finetune(train_args(tiny_model_dir, out, "--max_train_steps", "3", "--with_tracking", "--report_to", "wandb",
                        "tensorboard", "mlflow", "trackio", "--wandb_project_name", "sft-trackers", "--exp_name",
                        "sft-x"), env=env)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["train_loss"] for r in records if "train_loss" in r}
    assert sorted(losses) == [1, 2, 3]

    event_dirs = {p.parent for p in (out / "tensorboard").rglob("events.out.tfevents.*")}
    scalars = {}
    for folder in event_dirs:
        events = EventAccumulator(str(folder))
        events.Reload()
        if "train_loss" in events.Tags()["scalars"]:
            scalars = {e.step: e.value for e in events.Scalars("train_loss")}
    assert scalars.keys() == losses.keys()
    assert all(scalars[s] == pytest.approx(losses[s], rel=1e-6) for s in losses)

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3.x reads a file store only with it
    client = MlflowClient(tracking_uri=f"file:{out / 'mlruns'}")
    (experiment,) = [e for e in client.search_experiments() if e.name == "sft-trackers"]
    (run,) = client.search_runs([experiment.experiment_id])
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train_loss")}
    assert history == pytest.approx(losses)
    assert float(run.data.params["learning_rate"]) == 2e-3

    logs, config = read_trackio(out / "trackio", "sft-trackers", "sft-x")
    assert {r["step"]: r["train_loss"] for r in logs if "train_loss" in r} == pytest.approx(losses)
    assert config["learning_rate"] == 2e-3 and "allow_val_change" not in config

    (wandb_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")  # one offline run
    history, config = read_wandb_offline(wandb_file)
    assert {step: row["train_loss"] for step, row in history.items() if "train_loss" in row} == pytest.approx(losses)
    assert config["learning_rate"] == 2e-3
    for folder in ("wandb", "tensorboard", "mlruns", "trackio"):
        for path in (out / folder).rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                assert not any(s.encode() in data for s in SENTINELS.values()), path


def query_trackio(store, expression: str, *argv: str):
    """`expression` (over trackio's SQLiteStorage as S, and sys.argv) evaluated by trackio's own reader in a fresh
    process: trackio reads TRACKIO_DIR when first imported."""
    code = f"import json, sys; from trackio.sqlite_storage import SQLiteStorage as S; print(json.dumps({expression}))"
    result = subprocess.run([sys.executable, "-c", code, *argv], env=clean_env(TRACKIO_DIR=str(store)),
                            capture_output=True, text=True, check=True, timeout=120)
    return json.loads(result.stdout.strip().splitlines()[-1])


def read_trackio(store, project: str, run: str) -> tuple[list[dict], dict]:
    """A run's logged rows and config."""
    logs, config = query_trackio(store, "[S.get_logs(*sys.argv[1:]), S.get_run_config(*sys.argv[1:])]", project, run)
    return logs, config


def read_wandb_offline(path) -> tuple[dict[int, dict], dict]:
    """An offline wandb run file read back: {step: logged values} and the config. The file is a ':W&B' header
    (7 bytes) then LevelDB's log format: 32 KiB blocks of records, each a 7-byte header (crc32, little-endian length,
    type: 1 whole, 2 first, 3 middle, 4 last piece) and a piece of one protobuf Record; 0 is the zero padding at the
    end. wandb 0.31 reads it in its Go core only, so the test reads it itself."""
    from wandb.proto import wandb_internal_pb2

    data, block, header = path.read_bytes(), 32768, 7
    position, pieces, records = header, [], []
    while position + header <= len(data):
        if block - position % block < header:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        length, kind = int.from_bytes(data[position + 4:position + 6], "little"), data[position + 6]
        if kind == 0:
            break
        pieces.append(data[position + header:position + header + length])
        position += header + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(pieces))
            records.append(record)
            pieces = []
    history, config = {}, {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            history[record.history.step.num] = {"/".join(item.nested_key) or item.key: json.loads(item.value_json)
                                                for item in record.history.item}
        elif record.WhichOneof("record_type") == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
    return history, config


def wandb_offline_runs(out) -> list[tuple[str, dict[int, dict]]]:
    """(run id, history) of each offline run file under OUTPUT_DIR/wandb, oldest first."""
    runs = []
    for path in sorted((out / "wandb").glob("offline-run-*/run-*.wandb")):
        runs.append((path.stem.removeprefix("run-"), read_wandb_offline(path)[0]))
    return runs


@pytest.mark.integration
@pytest.mark.faults
def test_a_run_stopped_and_resumed_logs_into_the_same_wandb_and_trackio_runs(tiny_model_dir, tmp_path):
    """SIGTERM at step 2 or later, then the same command: wandb's second offline file carries the first one's run id
    (so `wandb sync` puts both into one run), and trackio has one run with every step once."""
    import signal

    from test_fault_signals import finish, start, stopped_step, wait_for_step

    out, log = tmp_path / "run", tmp_path / "log"
    args = train_args(tiny_model_dir, out, "--with_tracking", "--report_to", "wandb", "trackio", "--exp_name", "sft-x",
                      "--wandb_project_name", "sft-resume")
    process = start(args, 0.4, log=log, WANDB_MODE="offline")
    wait_for_step(out, 2, process)
    process.send_signal(signal.SIGTERM)
    step = stopped_step(finish(process, log), "stopped by SIGTERM", 6)
    finetune(args, env=clean_env(WANDB_MODE="offline"))

    (first_id, before), (second_id, after) = wandb_offline_runs(out)
    assert first_id == second_id
    assert [s for s, row in before.items() if "train_loss" in row] == list(range(1, step + 1))
    assert [s for s, row in after.items() if "train_loss" in row] == list(range(step + 1, 7))
    logs, _ = read_trackio(out / "trackio", "sft-resume", "sft-x")
    assert [row["step"] for row in logs if "train_loss" in row] == list(range(1, 7))
    assert query_trackio(out / "trackio", "S.get_runs(sys.argv[1])", "sft-resume") == ["sft-x"]
