"""What checking a checkpoint's checksums costs, against saving and loading it.

    python bench/checksums.py [--profile moeut-44m]

A checkpoint of one process, as the trainer writes it, without DeepSpeed: the weights as
safetensors and the fp32 master weights with Adam's two moments as one torch file (ZeRO's
partitions hold the same bytes). Timed in wall and CPU seconds (a shared machine's wall time
says little), in the order a run meets them, the files in the page cache after the save:
writing them (fsynced), recording their sha256 (`record_checksums`), checking them
(`verify_checksums`), and loading them (safetensors + `torch.load(weights_only=True)`). Prints a
Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from moeut_dist import profiles
from moeut_dist.checksums import record_checksums, verify_checksums
from moeut_dist.model import MoEUTLM


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _timed(function) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), _cpu_seconds()
    function()
    return time.perf_counter() - wall, _cpu_seconds() - cpu


def _write(directory: Path, model: MoEUTLM) -> None:
    weights = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
    save_file(weights, str(directory / "model.safetensors"))
    state = {name: [t.float().clone() for _ in range(3)] for name, t in weights.items()}
    torch.save(state, directory / "optim_states.pt")
    for path in directory.iterdir():
        with open(path, "rb") as file:
            os.fsync(file.fileno())


def _load(directory: Path) -> None:
    load_file(str(directory / "model.safetensors"))
    torch.load(directory / "optim_states.pt", weights_only=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="moeut-44m")
    args = parser.parse_args()
    model = MoEUTLM(profiles.get(args.profile, vocab_size=8000, kernel="torch"))
    with tempfile.TemporaryDirectory() as directory:
        directory = Path(directory)
        rows = [
            ("save (write + fsync)", _timed(lambda: _write(directory, model))),
            ("record sha256", _timed(lambda: record_checksums(directory))),
            ("verify sha256", _timed(lambda: verify_checksums(directory))),
            ("load", _timed(lambda: _load(directory))),
        ]
        size = sum(p.stat().st_size for p in directory.iterdir())
    print(f"{args.profile}: checkpoint of {size / 1e6:.0f} MB\n")
    print("| step | wall s | CPU s | CPU vs save |")
    print("|---|---:|---:|---:|")
    save_cpu = rows[0][1][1]
    for name, (wall, cpu) in rows:
        print(f"| {name} | {wall:.2f} | {cpu:.2f} | {cpu / save_cpu:.2f}× |")


if __name__ == "__main__":
    main()
