"""One command that proves and measures the trainer's real paths on a GPU, within a short GPU loan (<= 9 minutes).

    make gpu-check                         # on a machine with one H100/H200: results in output/gpu-check (or $OUT)
    make gpu-check DRY_RUN=1               # the same script end to end on CPU with the tiny model (~1-2 minutes)
    make gpu-wheels                        # here, ahead of the loan: wheels of what the GPU image lacks, into .whl/
    python benchmarks/gpu_check.py --out DIR [--dry_run] [--budget_s 540] [--rows ROW ...]

Stages, each under its own time cap and all under one budget (`--budget_s`):
1. packages: what the GPU machine lacks (deepspeed, datasets, liger-kernel, bitsandbytes and their needs) is installed
   from the wheels in `.whl/` into a private folder (no network there; `make gpu-wheels` prepares them here, at the
   versions this checkout's tests ran with); what is already importable is reused. flash-attn has no wheel for the
   GPU image's torch on the package index and is never built here (it would take the whole loan): packed rows use
   torch's own varlen flash kernel where the torch has one (open_instruct/attention.py), else per-example SDPA.
2. tests: `pytest -m gpu` (skipped without CUDA, so a dry run only proves they collect and skip).
3. throughput: the rows of MATRIX through benchmarks/gpu_throughput.py, each in a fresh process with its own cap, in
   order of importance: the presumed best configuration first, then each lever switched off (or changed) from it
   once. A row that cannot start before the budget ends is listed as not run, never silently dropped.
4. results: gpu_check.json (everything) and gpu_check.md (the table, environment, tests) in the output folder, and
   a short summary on stdout: each lever's effect against the best row, the memory plan's error, host syncs, and
   gpu_throughput_rows.json: the measured rows in the form of the time plan's table (open_instruct/assets/).

The dry run differs from the GPU run only where a CPU must: the tiny model, 1 step per row, one thread, no wheels
installed, the compile rows traced with the aot_eager backend (no kernels built), and the CUDA-only rows (Liger's
fused linear cross-entropy, QLoRA) skipped by name.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.gpu_throughput import Row, format_table, last_json_line, row_command  # noqa: E402

# The presumed best configuration first, then each lever changed from it once, then the adapters and the figure
# comparable to docs/benchmarks.md's 2026-11-23 H100 run (single process, Liger, 8,192-token rows).
MATRIX = (
    "zero3+liger+compile@16384",   # best guess: the recipes' ZeRO-3 bf16 path, Liger, compiled layers, big rows
    "zero3+liger@16384",           # compile off
    "zero3+compile@16384",         # Liger off (unfused norms/RoPE/SwiGLU, full logits loss)
    "single+liger+compile@16384",  # DeepSpeed off (fp32 weights under autocast, fused AdamW)
    "zero3+liger+compile@8192",    # row budget 8,192
    "zero3+liger+compile+gc@16384",  # gradient checkpointing on
    "single+flce+compile@16384",   # Liger's fused linear cross-entropy instead of our chunked loss (vs row 4)
    "zero3+liger+compile@4096",    # row budget 4,096
    "single+liger+lora@16384",     # LoRA rank 64
    "single+liger+qlora@16384",    # QLoRA (bitsandbytes 4-bit base)
    "single+liger@8192",           # as measured on 2026-11-23 (30.8% MFU on one H100)
)
# What the GPU image may lack (import name -> distribution); their own needs come as wheels too (make gpu-wheels).
PACKAGES = {"deepspeed": "deepspeed", "datasets": "datasets", "liger_kernel": "liger-kernel",
            "bitsandbytes": "bitsandbytes"}
WHEEL_NEEDS = ("dill", "multiprocess", "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "hjson")
ROW_CAP_S, COMPILE_ROW_CAP_S, TESTS_CAP_S, MIN_ROW_S = 100, 170, 110, 25


class Budget:
    """Seconds left of the whole check; each stage gets min(its cap, what is left)."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def cap(self, wanted: float) -> float:
        return max(0.0, min(wanted, self.left()))


def run_capped(command: list[str], cap: float, env: dict, log) -> tuple[int | None, str]:
    """(exit code or None when stopped at the cap, stdout); stderr goes to the log as it comes."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True, env=env, cwd=REPO,
                               start_new_session=True)
    try:
        stdout, _ = process.communicate(timeout=cap)
        return process.returncode, stdout
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)  # the row's whole process group: DeepSpeed or compile workers too
        stdout, _ = process.communicate()
        return None, stdout


# ----------------------------------------------------------------------------------------------------------------
# 1. Packages
# ----------------------------------------------------------------------------------------------------------------
def installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def wheel_distribution(wheel: Path) -> str:
    return wheel.name.split("-")[0].replace("_", "-").lower()


def ensure_packages(wheel_dir: Path, target: Path, dry_run: bool) -> tuple[dict, dict]:
    """Install the wheels of missing distributions into `target`; returns ({name: what happened}, env for children)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    if dry_run:  # a busy CPU oversubscribed by torch's threads ran the tiny rows 15x slower (5.9 s vs 0.3 s a step)
        env.setdefault("OMP_NUM_THREADS", "1")
    wheels = sorted(wheel_dir.glob("*.whl")) if wheel_dir.is_dir() else []
    missing = [w for w in wheels if installed_version(wheel_distribution(w)) is None]
    if missing and not dry_run:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--target", str(target), *map(str, missing)], check=True)
        sys.path.insert(0, str(target))
        importlib.invalidate_caches()
    paths = [str(target)] if missing and not dry_run else []
    env["PYTHONPATH"] = os.pathsep.join(paths + [str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    report = {}
    for module, distribution in PACKAGES.items():
        from_wheel = next((w.name for w in missing if wheel_distribution(w) == distribution), None)
        version = installed_version(distribution) or (None if dry_run else _version_in(target, distribution))
        if from_wheel and not dry_run:
            report[distribution] = f"installed from {from_wheel}"
        elif version:
            report[distribution] = f"present ({version})"
        else:
            report[distribution] = "missing (rows that need it are skipped; make gpu-wheels prepares it)"
    report["flash-attn"] = (f"present ({installed_version('flash-attn')})" if installed_version("flash-attn") else
                            "not installed: no wheel for this torch on the package index, and building it would take "
                            "the whole loan; packed rows use torch's varlen flash kernel where torch has one")
    return report, env


def _version_in(target: Path, distribution: str) -> str | None:
    metadata = list(target.glob(f"{distribution.replace('-', '_')}-*.dist-info"))
    return metadata[0].name.split("-")[1] if metadata else None


def prepare_wheels(wheel_dir: Path) -> None:
    """Here, ahead of a GPU loan: the wheels of PACKAGES and their needs at the versions installed in this environment
    (the tested set), for CPython 3.12 on x86-64 Linux. DeepSpeed is only published as source: its wheel is built here
    without compiled ops (it compiles them at run time where it needs them)."""
    wheel_dir.mkdir(parents=True, exist_ok=True)
    pins = [f"{name}=={installed_version(name)}" for name in (*PACKAGES.values(), *WHEEL_NEEDS)
            if name != "deepspeed" and installed_version(name)]
    pins += [f"{name}" for name in ("liger-kernel", "bitsandbytes") if not installed_version(name)]  # CUDA-only here
    platforms = [arg for tag in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
                                 "manylinux_2_17_x86_64", "manylinux2014_x86_64") for arg in ("--platform", tag)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(wheel_dir), *pins],
                   check=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(wheel_dir), f"deepspeed=={installed_version('deepspeed')}"], check=True,
                   env=dict(os.environ, DS_BUILD_OPS="0"))
    total = sum(w.stat().st_size for w in wheel_dir.glob("*.whl"))
    print(f"{len(list(wheel_dir.glob('*.whl')))} wheels in {wheel_dir} ({total / 2**20:.1f} MiB); carry this folder "
          "to the GPU machine (the device tool's carry, 64 MiB with the checkout)")


# ----------------------------------------------------------------------------------------------------------------
# 2. Tests
# ----------------------------------------------------------------------------------------------------------------
def run_gpu_tests(budget: Budget, env: dict, log) -> dict:
    cap = budget.cap(TESTS_CAP_S)
    started = time.monotonic()
    code, stdout = run_capped([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                               "-o", "addopts=-ra"], cap, env, log)
    log.write(stdout)
    counts = {key: int(n) for n, key in re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected)", stdout)}
    failed = [line.split(" ")[1] for line in stdout.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    status = "stopped at its cap" if code is None else ("passed" if code == 0 else f"exit {code}")
    return {"status": status, "seconds": round(time.monotonic() - started, 1), "counts": counts, "failed": failed}


# ----------------------------------------------------------------------------------------------------------------
# 3. Throughput rows
# ----------------------------------------------------------------------------------------------------------------
def missing_needs(row: Row, cuda: bool) -> list[str]:
    needs = row.needs() if cuda else [n for n in row.needs() if n == "deepspeed"]
    missing = [name for name in needs if importlib.util.find_spec(name) is None]
    if not cuda and row.levers & {"flce", "qlora"}:
        missing.append("CUDA")  # Liger's Triton kernels and bitsandbytes' 4-bit layers exist only on the GPU
    return missing


def run_rows(specs: list[str], model_dir: Path, cli, budget: Budget, env: dict, log) -> list[dict]:
    records = []
    for spec in specs:
        row = Row.parse(spec)
        missing = missing_needs(row, cli.device == "cuda")
        wanted = COMPILE_ROW_CAP_S if "compile" in row.levers else ROW_CAP_S
        if missing:
            record = {"row": spec, "error": f"skipped: needs {', '.join(missing)}"}
        elif budget.left() - cli.reserve_s < MIN_ROW_S:
            record = {"row": spec, "error": "not run: the budget was spent"}
        else:
            cap = min(wanted, budget.left() - cli.reserve_s)
            started = time.monotonic()
            code, stdout = run_capped(row_command(spec, model_dir, cli), cap, env, log)
            record = last_json_line(stdout) or {"row": spec, "error": f"stopped at its {cap:.0f} s cap" if code is None
                                                else f"exit {code} (see gpu_check.log)"}
            record["wall_s"] = round(time.monotonic() - started, 1)
        print(f"  {spec}: " + (record["error"] if "error" in record else
                               f"{record['tokens_per_s']:,.0f} tokens/s" + (f", MFU {record['mfu']:.1%}"
                                                                            if "mfu" in record else "")), flush=True)
        records.append(record)
    return records


def build_model(cli, env: dict, log, work: Path) -> Path:
    model_dir = work / "model"
    script = ("import sys; from pathlib import Path; from benchmarks.gpu_throughput import build_model_dir, LLAMA_1B, "
              f"TINY; build_model_dir(Path(sys.argv[1]), {'TINY' if cli.tiny else 'LLAMA_1B'})")
    subprocess.run([sys.executable, "-c", script, str(model_dir)], check=True, env=env, cwd=REPO, stderr=log)
    return model_dir


# ----------------------------------------------------------------------------------------------------------------
# 4. Results
# ----------------------------------------------------------------------------------------------------------------
def lever_changes(best: Row, other: Row) -> str | None:
    """What `other` changes from `best` ("compile off", "rows 8192"...), or None when it is not one change."""
    changes = [f"{lever} off" for lever in sorted(best.levers - other.levers)]
    changes += [f"{lever} on" for lever in sorted(other.levers - best.levers)]
    if other.base != best.base:
        changes.append(f"{other.base} instead of {best.base}")
    if other.row_tokens != best.row_tokens:
        changes.append(f"rows of {other.row_tokens}")
    return ", ".join(changes) if 0 < len(changes) <= 2 else None


def summary_lines(environment: dict, tests: dict, records: list[dict]) -> list[str]:
    lines = [f"GPU check on {environment['device']}: torch {environment['torch']}, tests {tests['status']} "
             f"{tests['counts']} in {tests['seconds']} s"]
    measured = [r for r in records if "tokens_per_s" in r]
    if not measured:
        return lines + ["no row was measured"]
    best = max(measured, key=lambda r: r["tokens_per_s"])
    lines.append(f"fastest: {best['row']} {best['tokens_per_s']:,.0f} tokens/s"
                 + (f", MFU {best['mfu']:.1%}" if "mfu" in best else "") + (f", peak {best['peak_gb']:.1f} GB"
                                                                            if "peak_gb" in best else ""))
    for index, other in enumerate(measured[1:], start=1):
        # against the earlier row it changes least from: same base first, fewest changes, the earliest on a tie
        candidates = [("instead of" in change, change.count(","), i, change) for i, r in enumerate(measured[:index])
                      if (change := lever_changes(Row.parse(r["row"]), Row.parse(other["row"])))]
        if candidates:
            *_, i, change = min(candidates)
            lines.append(f"  {change:<40} {other['tokens_per_s'] / measured[i]['tokens_per_s']:.2f}x tokens/s of "
                         f"{measured[i]['row']}")
    errors = [r["plan_error_pct"] for r in measured if "plan_error_pct" in r]
    if errors:
        lines.append(f"memory plan vs measured peak: {min(errors):+.0f}% to {max(errors):+.0f}%")
    syncs = [f"{r['row']} {r['host_syncs']}" for r in measured if "host_syncs" in r]
    if syncs:
        lines.append("host syncs in one step: " + ", ".join(syncs))
    not_measured = [f"{r['row']} ({r.get('error')})" for r in records if "tokens_per_s" not in r]
    if not_measured:
        lines.append("not measured: " + "; ".join(not_measured))
    return lines


def table_rows(environment: dict, records: list[dict]) -> list[dict]:
    """The measured rows in the form of open_instruct/assets/gpu_throughput.json (mason's time plan reads that table):
    the best row budget per configuration, ready to add after a look."""
    from open_instruct.flops import PEAK_BF16_TFLOPS

    gpu = next((kind for kind in PEAK_BF16_TFLOPS if kind in environment["device"]), None)
    best: dict[str, dict] = {}
    for r in records:
        if "mfu" in r and gpu and (Row.parse(r["row"]).config not in best or r["mfu"] > best[Row.parse(r["row"]).config]["mfu"]):
            best[Row.parse(r["row"]).config] = r
    return [{"gpu": gpu, "shape": "llama-3.2-1b", "params": r["params"], "config": config, "mfu": round(r["mfu"], 4),
             "tokens_per_s": round(r["tokens_per_s"]), "source": f"make gpu-check, {environment['date']}, "
             f"{environment['device']}, row {r['row']}, torch {environment['torch']}"} for config, r in best.items()]


def describe_environment(cli) -> dict:
    import torch

    device = torch.cuda.get_device_name() if cli.device == "cuda" else f"CPU ({platform.machine()}, dry run)"
    environment = {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda, "python":
                   platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                   "command": " ".join(sys.argv)}
    for name in ("transformers", "accelerate", "deepspeed", "liger-kernel", "bitsandbytes", "peft"):
        environment[name] = installed_version(name)
    return environment


def write_results(out: Path, environment: dict, packages: dict, tests: dict, records: list[dict], summary: list[str],
                  cli) -> None:
    result = {"environment": environment, "packages": packages, "tests": tests, "rows": records, "summary": summary,
              "settings": {"steps": cli.steps, "warmup": cli.warmup, "global_batch_size": cli.global_batch_size,
                           "model": "tiny" if cli.tiny else "llama-1.2B", "budget_s": cli.budget_s}}
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2))
    (out / "gpu_throughput_rows.json").write_text(json.dumps(table_rows(environment, records), indent=2))
    markdown = [f"# GPU check, {environment['date']}", "", f"`{environment['command']}`", "",
                ", ".join(f"{k} {v}" for k, v in environment.items() if k not in ("date", "command")), "",
                "Packages: " + "; ".join(f"{k}: {v}" for k, v in packages.items()), "",
                f"Tests (`pytest -m gpu`): {tests['status']}, {tests['counts']}, {tests['seconds']} s"
                + (f"; failed: {', '.join(tests['failed'])}" if tests["failed"] else ""), "",
                f"Rows: {cli.warmup} + {cli.steps} steps each, global batch {cli.global_batch_size} examples of the "
                "benchmarks/packing.py length mix; MFU against the dense bf16 datasheet peak.", "",
                *format_table(records), "", *summary, ""]
    (out / "gpu_check.md").write_text("\n".join(markdown))


def parse_cli(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--out", default=os.environ.get("OUT") or "output/gpu-check", help="folder for the results")
    parser.add_argument("--dry_run", action="store_true", help="on CPU with the tiny model: proves the script works")
    parser.add_argument("--budget_s", type=float, default=540, help="the whole check, seconds (default 9 minutes)")
    parser.add_argument("--reserve_s", type=float, default=10, help="seconds kept for writing the results")
    parser.add_argument("--rows", nargs="+", default=list(MATRIX), help="rows, in order (see gpu_throughput.py)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per row (default 4; dry run 1)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2; dry run 0)")
    parser.add_argument("--global_batch_size", type=int, default=None, help="examples per step (default 128; dry run 4)")
    parser.add_argument("--no_tests", action="store_true", help="skip `pytest -m gpu`")
    parser.add_argument("--wheels", default=str(REPO / ".whl"), help="folder of wheels to install what is missing from")
    parser.add_argument("--prepare_wheels", metavar="DIR", help="download/build the wheels into DIR and exit")
    cli = parser.parse_args(argv)
    for spec in cli.rows:
        try:
            Row.parse(spec)
        except ValueError as error:
            parser.error(str(error))
    cli.tiny, cli.device = cli.dry_run, "cpu" if cli.dry_run else "cuda"
    cli.steps = cli.steps or (1 if cli.dry_run else 4)
    cli.warmup = cli.warmup if cli.warmup is not None else (0 if cli.dry_run else 2)
    cli.global_batch_size = cli.global_batch_size or (4 if cli.dry_run else 128)
    cli.padded_batch_size, cli.examples = (2 if cli.dry_run else 4), (64 if cli.dry_run else 4000)
    cli.peak_tflops = None  # gpu_throughput reads the device's peak itself
    # The dry run traces the compile rows (dynamo + AOT autograd: graphs, breaks, recompiles) without building
    # kernels, which would cost CI minutes; tests/test_compile.py checks inductor's kernels on CPU.
    cli.compile_backend = "aot_eager" if cli.dry_run else "inductor"
    return cli


def main(argv: list[str] | None = None) -> int:
    cli = parse_cli(argv)
    if cli.prepare_wheels:
        prepare_wheels(Path(cli.prepare_wheels))
        return 0
    budget = Budget(cli.budget_s)
    out = Path(cli.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch

    if not cli.dry_run and not torch.cuda.is_available():
        print("gpu-check: no CUDA device here; run it on a GPU machine, or `make gpu-check DRY_RUN=1`", file=sys.stderr)
        return 2
    with open(out / "gpu_check.log", "w") as log, tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
        work = Path(work)
        packages, env = ensure_packages(Path(cli.wheels), work / "site", cli.dry_run)
        print("packages: " + "; ".join(f"{k}: {v}" for k, v in packages.items()), flush=True)
        environment = describe_environment(cli)
        tests = ({"status": "not run (--no_tests)", "seconds": 0, "counts": {}, "failed": []} if cli.no_tests
                 else run_gpu_tests(budget, env, log))
        print(f"tests: {tests['status']} {tests['counts']} in {tests['seconds']} s", flush=True)
        model_dir = build_model(cli, env, log, work)
        records = run_rows(cli.rows, model_dir, cli, budget, env, log)
    summary = summary_lines(environment, tests, records)
    write_results(out, environment, packages, tests, records, summary, cli)
    print("\n".join(["", *format_table(records), "", *summary, f"results: {out}/gpu_check.md, gpu_check.json"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
