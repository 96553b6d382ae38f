"""Machine and version facts every benchmark writes next to its figures."""
from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

__all__ = ["environment", "header", "write_result"]


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def environment() -> dict[str, str]:
    import torch

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{_cpu_model()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = "not installed"
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    env["command"] = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    return env


def header(title: str) -> str:
    lines = [f"# {title}", ""]
    for k, v in environment().items():
        lines.append(f"- {k}: `{v}`" if k == "command" else f"- {k}: {v}")
    return "\n".join(lines) + "\n"


def write_result(text: str, out: str | None, stem: str) -> None:
    """Write a benchmark's markdown to ``out`` (default ``bench/results/<stem>-<date>.md``; ``-``:
    nowhere), then print it."""
    if out != "-":
        path = Path(out) if out else Path(__file__).resolve().parent / "results" / (
            f"{stem}-{datetime.date.today().isoformat()}.md")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}")
    print(text)
