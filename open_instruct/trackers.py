"""Experiment trackers for --with_tracking: wandb, TensorBoard, MLflow and Trackio, one or several at once
(--report_to).

Every tracker gets the same metrics (the lines of metrics.jsonl, through accelerate's `Accelerator.log`) and the same
resolved config: the flags (`args_to_dict`), which hold no secrets (tokens come from the environment, never from
flags; see run_info.py). TensorBoard's hparams and MLflow's params take scalars only, so they get the config with
lists and None written as text; wandb and Trackio take it whole. Where each one writes:

- wandb: OUTPUT_DIR/wandb; offline (sync later with `wandb sync`) when neither WANDB_API_KEY nor WANDB_MODE is set.
  The run's id is kept in OUTPUT_DIR/wandb/run_id, so a run resumed from a checkpoint continues the same wandb run
  (resume="allow") instead of starting a second one.
- tensorboard: OUTPUT_DIR/tensorboard/<wandb_project_name> (`tensorboard --logdir OUTPUT_DIR/tensorboard`).
- mlflow: MLFLOW_TRACKING_URI when set, else file:OUTPUT_DIR/mlruns (with MLFLOW_ALLOW_FILE_STORE=true, which MLflow
  3.x needs for a file store; read it with the same variable set: `mlflow ui --backend-store-uri file:...`); the
  experiment is --wandb_project_name (or MLFLOW_EXPERIMENT_NAME), the run is --exp_name.
- trackio: TRACKIO_DIR when set, else OUTPUT_DIR/trackio: one SQLite file per project (--wandb_project_name), the
  run named --exp_name (`TRACKIO_DIR=OUTPUT_DIR/trackio trackio show --project NAME` opens its dashboard). Local
  only: a Space or a Trackio server is the user's own TRACKIO_SPACE_ID / TRACKIO_SERVER_URL.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from accelerate import Accelerator

    from open_instruct.args import FinetuneArgs

logger = logging.getLogger(__name__)

# tracker name -> (module that must be importable, what to pip install)
TRACKER_PACKAGES = {"wandb": ("wandb", "wandb"), "tensorboard": ("tensorboard", "tensorboard"),
                    "mlflow": ("mlflow", "mlflow-skinny"), "trackio": ("trackio", "trackio")}
TRACKERS = tuple(TRACKER_PACKAGES)
TRACKER_DIRS = ("wandb", "tensorboard", "mlruns", "trackio")  # under OUTPUT_DIR; hub.py leaves them out of uploads


def report_to_errors(report_to: list[str]) -> list[str]:
    """Unknown, repeated or not-installed trackers, one message each (run at argument validation)."""
    errors = []
    for name in report_to:
        if name not in TRACKER_PACKAGES:
            errors.append(f"--report_to {name!r} is not supported; use one or more of {', '.join(TRACKERS)}.")
        elif importlib.util.find_spec(TRACKER_PACKAGES[name][0]) is None:
            errors.append(f"--report_to {name} needs the {name} package: pip install {TRACKER_PACKAGES[name][1]} "
                          "(or pip install 'open-instruct-sft[trackers]').")
    repeated = sorted({name for name in report_to if report_to.count(name) > 1})
    if repeated:
        errors.append(f"--report_to names {', '.join(repeated)} more than once.")
    if not report_to:
        errors.append("--report_to needs at least one tracker.")
    return errors


def accelerator_tracking(args: FinetuneArgs) -> dict:
    """Accelerator keyword arguments: which trackers, and TensorBoard's folder (OUTPUT_DIR/tensorboard)."""
    from accelerate.utils import ProjectConfiguration  # here: args.py imports this module, and stays light

    if not args.with_tracking:
        return {"log_with": None}
    return {"log_with": list(args.report_to),
            "project_config": ProjectConfiguration(logging_dir=str(Path(args.output_dir) / "tensorboard"))}


def scalar_config(config: dict) -> dict:
    """The config as TensorBoard hparams and MLflow params take it: bool, int, float and str kept, the rest as text."""
    return {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in config.items()}


def init_tracking(accelerator: Accelerator, args: FinetuneArgs, output: Path, config: dict,
                  resuming: bool = False) -> None:
    """Start the trackers of --report_to and give each the resolved config (every process calls it; accelerate
    starts trackers on the main process only). A run resuming from a checkpoint continues its wandb and trackio
    runs."""
    if not args.with_tracking:
        return
    if "wandb" in args.report_to and not os.environ.get("WANDB_API_KEY") and not os.environ.get("WANDB_MODE"):
        os.environ["WANDB_MODE"] = "offline"
        logger.info("WANDB_API_KEY is not set: wandb runs offline under %s/wandb (upload later with `wandb sync`).", output)
    own_mlflow_uri = not os.environ.get("MLFLOW_TRACKING_URI")
    if "mlflow" in args.report_to and own_mlflow_uri:
        os.environ["MLFLOW_TRACKING_URI"] = f"file:{(output / 'mlruns').resolve()}"
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3.x refuses a file store without it
    if "trackio" in args.report_to:
        # trackio reads TRACKIO_DIR once, when it is first imported (by accelerate's tracker, just below).
        os.environ.setdefault("TRACKIO_DIR", str((output / "trackio").resolve()))
    wandb_identity = (wandb_run_identity(output, resuming)
                      if "wandb" in args.report_to and accelerator.is_main_process else {})
    accelerator.init_trackers(
        args.wandb_project_name,
        config=None,  # given below, in the form each tracker takes
        init_kwargs={"wandb": {"entity": args.wandb_entity, "name": args.exp_name, "dir": str(output),
                               **wandb_identity},
                     "mlflow": {"run_name": args.exp_name},  # its experiment: the project name
                     # the config at init: accelerate's later config.update would store its allow_val_change flag
                     # as one more hyperparameter
                     "trackio": {"name": args.exp_name, "config": config,
                                 "resume": "allow" if resuming else "never"}},
    )
    for tracker in accelerator.trackers:
        if tracker.name != "trackio":
            tracker.store_init_configuration(config if tracker.name == "wandb" else scalar_config(config))
    if accelerator.is_main_process:
        logger.info("Tracking to %s.", ", ".join(tracking_places(args, output, own_mlflow_uri)))


def wandb_run_identity(output: Path, resuming: bool) -> dict:
    """wandb.init's id and resume: the id kept in OUTPUT_DIR/wandb/run_id when resuming (continue that run), else a
    new one, written there for a later resume. A fresh run into the directory never joins an earlier run's id."""
    from wandb.sdk.lib.runid import generate_id

    from open_instruct.storage import write_text

    path = output / "wandb" / "run_id"
    kept = path.read_text().strip() if resuming and path.is_file() else ""
    if kept:
        return {"id": kept, "resume": "allow"}
    run_id = generate_id()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, run_id + "\n", "the wandb run id", "nothing else is affected")
    return {"id": run_id}


def tracking_places(args: FinetuneArgs, output: Path, own_mlflow_uri: bool) -> list[str]:
    """Where each tracker writes, for the log (a user's MLFLOW_TRACKING_URI is not shown: it may hold credentials)."""
    mlflow_uri = os.environ.get("MLFLOW_TRACKING_URI") if own_mlflow_uri else "MLFLOW_TRACKING_URI"
    trackio_dir = os.environ.get("TRACKIO_DIR", output / "trackio")
    places = {"wandb": f"wandb ({os.environ.get('WANDB_MODE', 'online')}, {output / 'wandb'})",
              "tensorboard": f"tensorboard ({output / 'tensorboard'})",
              "mlflow": f"mlflow ({mlflow_uri})",
              # trackio's own banner says `trackio show` without the folder, which would read its default one
              "trackio": f"trackio ({trackio_dir}; to view: TRACKIO_DIR={trackio_dir} trackio show --project "
                         f"{args.wandb_project_name})"}
    return [places[name] for name in args.report_to]
