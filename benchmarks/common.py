"""What the benchmarks share: statistics, machine facts, logging and the results file of a machine class."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DOC = ROOT / "docs" / "benchmarks.md"
_T0 = time.perf_counter()


def log(tag: str, msg: str) -> None:
    print(f"[{tag} {time.perf_counter() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values),
            "values": values}


def fmt(s: dict | None, digits: int = 1, unit: str = "") -> str:
    """'median (min-max)'."""
    if not s:
        return "n/a"
    d = digits
    return f"{s['median']:.{d}f}{unit} ({s['min']:.{d}f}-{s['max']:.{d}f})"


def _first_line(path: str, prefix: str) -> str | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(prefix):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _markers(name: str, doc: str) -> tuple[int, int]:
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    if begin not in doc or end not in doc:
        raise SystemExit(f"{DOC} has no {begin} ... {end} markers: put them where that section goes")
    return doc.index(begin) + len(begin), doc.index(end)


def doc_section(name: str, doc: str) -> str:
    """The generated text between <!-- name:begin --> and <!-- name:end --> of docs/benchmarks.md."""
    start, stop = _markers(name, doc)
    return doc[start:stop].strip("\n")


def write_doc_section(name: str, text: str) -> None:
    """Replace the generated text of section `name` in docs/benchmarks.md (the prose around it stays)."""
    doc = DOC.read_text()
    start, stop = _markers(name, doc)
    DOC.write_text(doc[:start] + "\n" + text.strip("\n") + "\n" + doc[stop:])
    log("doc", f"wrote the {name} section of {DOC.relative_to(ROOT)}")


def cpu_machine() -> dict:
    """Cores, CPU model, memory, kernel and Python of this machine."""
    mem_kib = (_first_line("/proc/meminfo", "MemTotal") or "0 kB").split()[0]
    return {"cores": os.cpu_count(), "cpu": _first_line("/proc/cpuinfo", "model name") or platform.machine(),
            "mem_gib": round(int(mem_kib) * 1024 / 2**30, 1), "kernel": platform.release(),
            "python": platform.python_version()}


def gpu_machine() -> dict:
    """The GPU (nvidia-smi), host and library versions of this process, and the date."""
    env = {"python": platform.python_version(), "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        env["nvidia_smi"] = out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        env["nvidia_smi"] = None
    for mod in ("torch", "transformers", "mlx.core", "mlx_lm"):
        if mod in sys.modules:
            env[mod] = getattr(sys.modules[mod], "__version__", "?")
    env["vllm_imported"] = "vllm" in sys.modules
    return env


class ResultsFile:
    """The results of one machine class (benchmarks/results/<class>.json). A command owns one part,
    `data[section][name]`, and rewrites the file after every measurement, so a run cut short keeps what
    it measured; the other parts stay as they were."""

    def __init__(self, path: str | Path | None, section: str, name: str, **head):
        self.path = Path(path) if path else None
        self.data = json.loads(self.path.read_text()) if self.path and self.path.is_file() else {}
        self.part = {"env": gpu_machine(), **head, "rows": [], "errors": []}
        self.data.setdefault(section, {})[name] = self.part
        self.save()

    def add(self, **row) -> dict:
        self.part["rows"].append(row)
        self.save()
        return row

    def error(self, what: str, exc: BaseException) -> None:
        log("error", f"{what}: {type(exc).__name__}: {exc}")
        self.part["errors"].append({"what": what, "error": f"{type(exc).__name__}: {exc}"[:2000]})
        self.save()

    def save(self) -> None:
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
