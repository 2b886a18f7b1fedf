"""The hashed lock (requirements/cpu.txt, made by `make lock` with pip-tools) covers what pyproject.toml asks for.

Fast, no network: reads the files only. torch stays out of the lock (the Makefile installs it first).
"""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _name(req: str) -> str:
    return re.split(r"[\s\[<>=!~;@]", req.strip(), maxsplit=1)[0].lower().replace("_", "-").replace(".", "-")


def _pins(path: Path) -> dict[str, list[str]]:
    """name -> the requirement's lines (the pin plus its --hash continuation lines), comments dropped."""
    pins: dict[str, list[str]] = {}
    current = None
    for line in path.read_text().splitlines():
        text = line.split("#", 1)[0].rstrip()
        if not text:
            continue
        if not line.startswith((" ", "\t")):
            current = _name(text)
            pins[current] = [text]
        else:
            pins[current].append(text)
    return pins


def _wanted() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    reqs = project["dependencies"] + extras["dev"] + extras.get("trackers", [])
    return {_name(r) for r in reqs} - {"torch"}


def test_every_dependency_is_pinned_with_hashes_and_torch_is_absent():
    pins = _pins(ROOT / "requirements" / "cpu.txt")
    missing = sorted(_wanted() - set(pins))
    assert not missing, f"not in requirements/cpu.txt (run `make lock`): {missing}"
    assert "torch" not in pins, "torch must stay out of the lock (the Makefile installs it first)"
    for name, lines in pins.items():
        assert re.match(rf"^{re.escape(lines[0].split('==')[0])}==\S+", lines[0]), f"{name} is not pinned with ==: {lines[0]}"
        assert any("--hash=sha256:" in line for line in lines), f"{name} has no --hash"


def test_gpu_lock_is_the_cpu_lock_plus_the_gpu_extra():
    cpu = _pins(ROOT / "requirements" / "cpu.txt")
    gpu = _pins(ROOT / "requirements" / "gpu.txt")
    assert "torch" not in gpu and "flash-attn" not in gpu
    assert {"liger-kernel", "bitsandbytes"} <= set(gpu)
    assert set(cpu) <= set(gpu)
    for name, lines in gpu.items():
        assert any("--hash=sha256:" in line for line in lines), f"{name} has no --hash in requirements/gpu.txt"
