"""Benchmark output: the environment, a terminal table, the JSON file and a throughput plot."""

from __future__ import annotations

import datetime
import hashlib
import os
import platform
import re
import subprocess
import sys

import torch

from .. import atomic
from ..info import report as info_report


def describe_device(device: torch.device) -> dict:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {
            "type": "cuda", "name": props.name, "capability": f"{props.major}.{props.minor}",
            "memory_bytes": props.total_memory, "multiprocessors": props.multi_processor_count,
            "cuda": torch.version.cuda,
        }  # fmt: skip
    described = {"type": device.type, "name": platform.processor() or platform.machine()}
    if device.type == "cpu":
        # CPU ratios move with the machine (Winograd against oneDNN flipped between two VMs of ours):
        # the model and the vector ISA torch dispatches to say which machine a file came from.
        described.update(model=_cpu_model(), vector_isa=torch.backends.cpu.get_cpu_capability())
    return {**described, "threads": torch.get_num_threads()}


def _cpu_model() -> str:
    """The processor's marketing name ('model name' of /proc/cpuinfo on Linux), else what platform says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def source_hash(root: str = _ROOT) -> str:
    """sha256 of the Python sources of fastvit_style/ and kernels/ under root (each file's path relative
    to root, then its bytes, in path order; links to folders not followed: fastvit_style/kernels may
    link to kernels/): it ties results to the code that ran where a commit cannot, a dirty tree or a
    copy without .git."""
    digest = hashlib.sha256()
    for top in ("fastvit_style", "kernels"):
        for folder, _, files in sorted(os.walk(os.path.join(root, top))):
            for name in sorted(f for f in files if f.endswith(".py")):
                path = os.path.join(folder, name)
                digest.update(os.path.relpath(path, root).encode() + b"\0")
                with open(path, "rb") as f:
                    digest.update(f.read() + b"\0")
    return digest.hexdigest()


def utc_now() -> str:
    """The time of a result, UTC, to the second (ISO 8601)."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def git_commit() -> dict:
    """HEAD of the checkout this package runs from, whether tracked files differ from it (untracked
    ones, such as result JSONs not yet committed, do not; 'unknown' outside one), and `sources`, the
    source_hash. FASTVIT_STYLE_GIT_COMMIT names the commit where the tree was copied without .git (a GPU
    machine); a value that is no full commit hash (40 hex digits) is kept as `given`, the commit unknown."""
    unknown = {"commit": "unknown", "dirty": None, "sources": source_hash()}
    given = os.environ.get("FASTVIT_STYLE_GIT_COMMIT")
    if given and re.fullmatch(r"[0-9a-f]{40}", given):
        return {**unknown, "commit": given}
    if given:
        return {**unknown, "given": given}
    try:
        head, dirty = (
            subprocess.run(["git", *cmd], cwd=_ROOT, capture_output=True, text=True, timeout=10, check=False)
            for cmd in (["rev-parse", "HEAD"], ["status", "--porcelain", "--untracked-files=no"])
        )
    except (OSError, subprocess.SubprocessError):
        return unknown
    if head.returncode:
        return unknown
    return {**unknown, "commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def environment() -> dict:
    env = info_report()  # versions of torch, triton, xformers, ... and each backend's availability
    return {
        **env,
        "git": git_commit(),
        "argv": sys.argv,
        "time_utc": utc_now(),
        "hostname": platform.node(),
    }


def output_stem(out_dir: str, device: dict, kind: str = "bench") -> str:
    """OUT/<date-time>_<device>_<kind>: files of one run sort together and say where they came from.

    The stem is claimed by creating <stem>.json (an empty JSON object until the run writes it), so
    that runs started in the same second on alike devices get -2, -3, ... rather than one file.
    ValueError when out_dir (--out) is a file."""
    if problem := atomic.folder_problem(out_dir, "--out"):
        raise ValueError(problem)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device["name"]).strip("-") or device["type"]
    os.makedirs(out_dir, exist_ok=True)
    n = 1
    while True:
        stem = os.path.join(out_dir, f"{stamp}_{slug}_{kind}" + ("" if n == 1 else f"-{n}"))
        try:
            fd = os.open(stem + ".json", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            n += 1
            continue
        with os.fdopen(fd, "w") as f:
            f.write("{}")
        return stem


def check_output_file(path: str, keys: tuple[str, ...]) -> None:
    """Before a run that writes its JSON to `path` (--out): a new file, or a JSON object holding `keys`,
    the same tool's output, which the run replaces (`atomic.check_replaceable`)."""
    atomic.check_replaceable(
        path, "--out", "JSON file", lambda p: atomic.holds_json_keys(p, keys), "was not written by this tool"
    )


def write_json(path: str, run: dict, env: dict) -> None:
    """Atomic, so that a run killed mid-write leaves the previous complete file."""
    atomic.write_json(path, {"env": env, **run})


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


COLUMNS = ("workload", "backbone", "B", "dtype", "backend", "status", "rel_err", "median ms [p20-p80]",
           "img/s", "x ref", "x ref-bf16c", "peak MiB", "warm s", "MFU")  # fmt: skip


def table_row(r: dict) -> tuple:
    backend = r["backend"] + ("+compile" if r["compile"] else "")
    spread = f"{_fmt(r['median_ms'], '.1f')} [{_fmt(r['p20_ms'], '.1f')}-{_fmt(r['p80_ms'], '.1f')}]"
    if r["median_ms"] is None:
        spread = "-"
    return (
        r["workload"], r["backbone"], str(r["batch_size"]), r["dtype"], backend, r["status"],
        _fmt(r["rel_err"], ".1e"), spread, _fmt(r["images_per_s"], ".1f"),
        _fmt(r["speedup_vs_reference"], ".2f"), _fmt(r["speedup_vs_reference_bf16_compile"], ".2f"),
        _fmt(r["peak_mem_bytes"] and r["peak_mem_bytes"] / 2**20, ".0f"), _fmt(r["warmup_s"], ".1f"),
        _fmt(r["mfu"], ".1%"),
    )  # fmt: skip


def table(rows: list[dict]) -> str:
    """Fixed-width table; reasons of rows that did not run ok are listed under it."""
    cells = [COLUMNS] + [table_row(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = [f"  {' '.join(table_row(r)[:5])}: {r['reason']}" for r in rows if r["reason"]]
    return "\n".join(lines + (["", "notes:"] + notes if notes else []))


def plot(path: str, rows: list[dict]) -> str | None:
    """Throughput against batch size, one panel per (workload, backbone), one line per variant.
    Returns None when written, else why not (matplotlib missing, or nothing to plot)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import NullLocator
    except Exception as exc:
        return f"no plot: matplotlib cannot be imported ({type(exc).__name__})"
    ok = [r for r in rows if r["status"] == "ok"]
    panels = sorted({(r["workload"], r["backbone"]) for r in ok})
    if not panels:
        return "no plot: no row ran ok"

    def label(r):
        return f"{r['backend']}{'+compile' if r['compile'] else ''} {r['dtype']}"

    colors = {name: f"C{i % 10}" for i, name in enumerate(sorted({label(r) for r in ok}))}  # one per variant
    cols = min(3, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.6 * nrows), squeeze=False)
    for ax, (workload, backbone) in zip(axes.flat, panels):
        lines: dict[str, list] = {}
        for r in ok:
            if (r["workload"], r["backbone"]) == (workload, backbone):
                lines.setdefault(label(r), []).append((r["batch_size"], r["images_per_s"]))
        for name, points in sorted(lines.items()):
            xs, ys = zip(*sorted(points))
            ax.plot(xs, ys, marker="o", label=name, color=colors[name])
        batches = sorted({b for points in lines.values() for b, _ in points})
        ax.set(title=f"{workload} / {backbone}", xlabel="batch size", ylabel="images/s", yscale="log")
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.xaxis.set_minor_locator(NullLocator())  # only the batch sizes run
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
