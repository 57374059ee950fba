"""The paper's comparison, small: MoEUT against its parameter-matched dense baseline.

    python bench/paper.py                  # two small sizes on this CPU (≤ 40 minutes, 2 cores)
    python bench/paper.py --size 44m       # moeut-44m vs dense-44m on GPUs (also 126m, gpu: both)
    python bench/paper.py --smoke          # tiny, seconds: the harness end to end (CI)

For each corpus of the experiment file (`launch/experiments/paper-*.yaml`: the works of
Shakespeare and CPython's standard library), one tokenizer and one set of shards; for each size,
MoEUT and the dense baseline train on the same tokens in the same order (same shards, seed and
batch), each at every learning rate of the same sweep, through `moeut train`. The run with the
lowest final validation loss of each side is exported (`moeut export`) and evaluated on the
whole validation split and the built-in zero-shot samples (`moeut eval`). Writes
`docs/paper-reproduction.md` (a table and the plot of validation loss against training FLOPs,
`docs/paper-reproduction.png`). Every finished step is kept under `--work-dir` and skipped on
a rerun of the same experiment (another one there is refused); an interrupted training run
continues from its latest checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from data_prep.shards import build_shards
from data_prep.tokenizer import train_tokenizer
from moeut_dist import arch
from moeut_dist.analysis import REPORT_FILE
from moeut_dist.cli import main as moeut
from moeut_dist.corpora import fetch_shakespeare, python_stdlib_texts
from moeut_dist.data import Tokenizer, read_manifest
from moeut_dist.export import read_config
from moeut_dist.train.metrics import read_run_metrics

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "launch" / "experiments"
# --size: the experiment file and the sizes of it to run (None: all).
SIZES = {
    "cpu": ("paper-cpu.yaml", None),
    "44m": ("paper-gpu.yaml", ["44m"]),
    "126m": ("paper-gpu.yaml", ["126m"]),
    "gpu": ("paper-gpu.yaml", None),
}
SMOKE = "paper-smoke.yaml"
ARCHITECTURES = ("moeut", "dense")  # each size of an experiment names one model of each
ANALYZED_TOKENS = 16384


@dataclass(frozen=True)
class Corpus:
    name: str
    source: str  # "shakespeare", "python-stdlib", or a folder of .txt files
    text_unit: str  # what a document is in a text file: file, paragraph or line
    max_bytes: int = 0  # of the standard library's sources (the others are taken whole)


@dataclass(frozen=True)
class Experiment:
    corpora: list[Corpus]
    vocab_size: int
    seq_len: int
    val_fraction: float
    learning_rates: list[float]
    # size → {arch: the run config's `model`, "recipe": what the size changes in `train`}
    models: dict[str, dict[str, dict[str, Any]]]
    train: dict[str, Any]  # the rest of a `moeut train` config (no paths, lr or model)
    processes: int  # per run; more than one launches torchrun

    @classmethod
    def load(cls, path: Path, sizes: list[str] | None) -> Experiment:
        values = yaml.safe_load(path.read_text())
        models = values["models"]
        if sizes is not None:
            models = {size: models[size] for size in sizes}
        for size, pair in models.items():
            if sorted(set(pair) - {"recipe"}) != sorted(ARCHITECTURES):
                raise ValueError(f"{path}: size {size} must name one model of each of "
                                 f"{ARCHITECTURES} (and optionally a recipe)")  # fmt: skip
        corpora = [Corpus(name=name, **spec) for name, spec in values["corpora"].items()]
        return cls(
            corpora=corpora,
            vocab_size=values["vocab_size"],
            seq_len=values["seq_len"],
            val_fraction=values["val_fraction"],
            learning_rates=values["learning_rates"],
            models=models,
            train=values["train"],
            processes=values.get("processes", 1),
        )


# --- data ---------------------------------------------------------------------------------


def corpus_texts(corpus: Corpus, work_dir: Path, cache_dir: Path) -> Path:
    if corpus.source == "shakespeare":
        return fetch_shakespeare(cache_dir)
    if corpus.source == "python-stdlib":
        return python_stdlib_texts(work_dir / "python-stdlib", corpus.max_bytes)
    return Path(corpus.source)


def prepare(
    corpus: Corpus, experiment: Experiment, work_dir: Path, cache_dir: Path
) -> tuple[Path, Path]:
    """The corpus's tokenizer and shard directory (built once)."""
    texts = corpus_texts(corpus, work_dir, cache_dir)
    tokenizer = work_dir / "tokenizer.model"
    if not tokenizer.is_file():
        train_tokenizer([texts], tokenizer, vocab_size=experiment.vocab_size,
                        text_unit=corpus.text_unit)  # fmt: skip
    elif Tokenizer(tokenizer).vocab_size != experiment.vocab_size:
        raise ValueError(f"{tokenizer} has another vocabulary size; use another --work-dir")
    shards = work_dir / "shards"
    build_shards([texts], shards, tokenizer, experiment.seq_len,
                 val_fraction=experiment.val_fraction, text_unit=corpus.text_unit,
                 workers=2, progress=False)  # fmt: skip
    return tokenizer, shards


# --- runs ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    lr: float
    run_dir: Path
    wall_s: float
    val_loss: float  # the last validation pass of the run (chooses the learning rate)


def launch(argv: list[str], processes: int) -> None:
    """`moeut ARGV…`: in this process, or under torchrun with `processes` workers."""
    if processes == 1:
        status = moeut(argv)
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc-per-node={processes}", "-m", "moeut_dist.cli", *argv]  # fmt: skip
        status = subprocess.run(command).returncode
    if status != 0:
        raise RuntimeError(f"moeut {' '.join(argv)} failed with exit status {status}")


def merged(*layers: dict[str, Any]) -> dict[str, Any]:
    """The mappings merged key by key, nested mappings too; later layers win."""
    result: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if isinstance(value, dict) and isinstance(result.get(key), dict):
                value = merged(result[key], value)
            result[key] = value
    return result


def train_run(experiment: Experiment, corpus: str, size: str, arch_name: str, lr: float,
              tokenizer: Path, shards: Path, work_dir: Path) -> Run:  # fmt: skip
    run_dir = work_dir / f"{size}-{arch_name}-lr{lr:g}"
    done = run_dir / "bench-run.json"
    config_path = run_dir / "bench-config.yaml"
    config = merged(experiment.train, experiment.models[size].get("recipe", {}), {
        "out_dir": str(run_dir),
        "model": experiment.models[size][arch_name],
        "data": {"shard_dir": str(shards), "tokenizer": str(tokenizer),
                 "seq_len": experiment.seq_len},
        "optim": {"lr": lr},
    })  # fmt: skip
    if done.is_file() and yaml.safe_load(config_path.read_text()) != config:
        raise ValueError(
            f"{run_dir} was trained with another configuration; use another --work-dir"
        )
    if not done.is_file():
        run_dir.mkdir(parents=True, exist_ok=True)
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        print(f"== {corpus} {size} {arch_name} lr {lr:g}", flush=True)
        started = time.perf_counter()
        launch(["train", "--config", str(config_path)], experiment.processes)
        done.write_text(json.dumps({"wall_s": time.perf_counter() - started}))
    validations = read_run_metrics(run_dir, "val")
    if not validations:
        raise RuntimeError(f"{run_dir}: no validation pass was logged (eval.every)")
    wall_s = json.loads(done.read_text())["wall_s"]
    return Run(lr, run_dir, wall_s, validations[-1]["loss"])


def evaluate(best: Run, shards: Path) -> dict[str, Any]:
    """Export the run and evaluate it: language modelling on the whole validation split and the
    built-in zero-shot samples; the model's size and compute from its architecture spec."""
    model_dir = best.run_dir / "model"
    report_path = best.run_dir / "eval.json"
    if not report_path.is_file():
        launch(["export", str(best.run_dir), str(model_dir)], 1)
        launch(["eval", str(model_dir), "--shards", str(shards), "--builtin-tasks",
                "--json", str(report_path)], 1)  # fmt: skip
    report = json.loads(report_path.read_text())
    config = read_config(model_dir)
    summary = arch.of(config).summary(config, read_manifest(shards).seq_len)
    return {
        "parameters": summary.parameters,
        "active_parameters": summary.active_parameters,
        "flops_per_token": summary.forward_flops_per_token,
        "training_flops_per_token": summary.training_flops_per_token,
        "perplexity": report["language_modeling"]["perplexity"],
        "bits_per_byte": report["language_modeling"]["bits_per_byte"],
        "zero_shot": {task["task"]: task["acc"] for task in report["tasks"]},
    }


# --- report -------------------------------------------------------------------------------


def validation_curve(run: Run, tokens_per_step: int, training_flops_per_token: float):
    """(training FLOPs, validation loss) of every validation pass."""
    flops_per_step = training_flops_per_token * tokens_per_step
    return [(r["step"] * flops_per_step, r["loss"]) for r in read_run_metrics(run.run_dir, "val")]


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    # A bare Figure on the Agg canvas: no pyplot, so no global backend state and no display.
    corpora = list(dict.fromkeys(row["corpus"] for row in rows))
    figure = Figure(figsize=(6 * len(corpora), 4.5), dpi=110)
    FigureCanvasAgg(figure)
    for column, corpus in enumerate(corpora):
        axes = figure.add_subplot(1, len(corpora), column + 1)
        for row in (r for r in rows if r["corpus"] == corpus):
            flops, losses = zip(*row["curve"], strict=True)
            style = "-" if row["arch"] == "moeut" else "--"
            axes.plot(flops, losses, style, marker="o", markersize=3,
                      label=f"{row['arch']} {row['size']} (lr {row['lr']:g})")  # fmt: skip
        axes.set_xscale("log")
        axes.set_xlabel("training FLOPs")
        axes.set_ylabel("validation loss (nats per token)")
        axes.set_title(corpus)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _millions(n: float) -> str:
    return f"{n / 1e6:.2f}M"


def write_doc(rows: list[dict[str, Any]], sweeps: dict, experiment_file: Path, plot_path: Path,
              doc_path: Path) -> None:  # fmt: skip
    """Write the page; what follows `DISCUSSION_MARKER` in the page already there is kept."""
    tasks = sorted({task for row in rows for task in row["zero_shot"]})
    header = ["corpus", "size", "model", "params", "active params", "FLOPs/token", "best lr",
              "val ppl", "bits/byte", "wall: best run / sweep", *tasks]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [
            row["corpus"], row["size"], row["arch"], _millions(row["parameters"]),
            _millions(row["active_parameters"]), _millions(row["flops_per_token"]),
            f"{row['lr']:g}", f"{row['perplexity']:.2f}", f"{row['bits_per_byte']:.4f}",
            f"{_duration(row['wall_s'])} / {_duration(row['sweep_wall_s'])}",
            *(f"{row['zero_shot'].get(task, float('nan')):.3f}" for task in tasks),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    sweep_lines = [
        f"- {corpus} {size} {arch_name}: "
        + ", ".join(f"lr {lr:g} → {loss:.4f}" for lr, loss in losses)
        for (corpus, size, arch_name), losses in sweeps.items()
    ]
    relative_plot = os.path.relpath(plot_path, doc_path.parent)
    training_s = sum(row["sweep_wall_s"] for row in rows)
    text = GENERATED_DOC.format(
        training_time=_duration(training_s),
        runs=sum(len(losses) for losses in sweeps.values()),
        experiment=os.path.relpath(experiment_file, ROOT),
        python=sys.version.split()[0],
        table="\n".join(lines),
        sweeps="\n".join(sweep_lines),
        plot=relative_plot,
        comparison="\n".join(compare(rows)),
        expert_usage="\n".join(expert_usage(rows, doc_path.parent)),
        how_to_run=HOW_TO_RUN,
        analyzed_tokens=ANALYZED_TOKENS,
    )
    discussion = DISCUSSION_MARKER + "\n"
    if doc_path.is_file() and DISCUSSION_MARKER in (previous := doc_path.read_text()):
        discussion = DISCUSSION_MARKER + previous.split(DISCUSSION_MARKER, 1)[1]
    doc_path.parent.mkdir(parents=True, exist_ok=True)
    doc_path.write_text(text + "\n" + discussion)


def analyze(best: Run, shards: Path, publish_dir: Path) -> dict[str, Any]:
    """`moeut analyze` of a MoEUT run's exported model (`evaluate` first): how many distinct
    σ-MoE experts a token uses over the depth, and how evenly each layer uses its experts. The
    JSON and plots are copied to `publish_dir`, beside the page that links them."""
    out_dir = best.run_dir / "analysis"
    if not (out_dir / REPORT_FILE).is_file():
        launch(["analyze", str(best.run_dir / "model"), "--shards", str(shards),
                "--out", str(out_dir), "--max-tokens", str(ANALYZED_TOKENS)], 1)  # fmt: skip
    shutil.rmtree(publish_dir, ignore_errors=True)
    shutil.copytree(out_dir, publish_dir)
    ffn = json.loads((out_dir / REPORT_FILE).read_text())["ffn"]
    return {
        "analysis_dir": str(publish_dir),
        "distinct_experts": ffn["distinct_experts_per_token"]["mean"],
        "usage_entropy": sum(ffn["usage_entropy"]) / len(ffn["usage_entropy"]),
    }


def expert_usage(rows: list[dict[str, Any]], doc_dir: Path) -> list[str]:
    """One line per MoEUT model: the paper's analyses in two numbers, and where the plots are
    (relative to the page)."""
    return [
        f"- {row['corpus']}, {row['size']}: a token uses {row['distinct_experts']:.1f} distinct "
        f"σ-MoE experts over the depth; mean usage entropy per layer "
        f"{row['usage_entropy']:.3f} of the maximum "
        f"(`{os.path.relpath(row['analysis_dir'], doc_dir)}`)."
        for row in rows
        if row["arch"] == "moeut"
    ]


def compare(rows: list[dict[str, Any]]) -> list[str]:
    """One line per corpus and size: which side has the lower validation perplexity."""
    lines = []
    for corpus, size in dict.fromkeys((r["corpus"], r["size"]) for r in rows):
        pair = {r["arch"]: r for r in rows if (r["corpus"], r["size"]) == (corpus, size)}
        moe, dense = pair["moeut"], pair["dense"]
        ratio = moe["perplexity"] / dense["perplexity"]
        better = "MoEUT" if ratio < 1 else "dense"
        lines.append(
            f"- {corpus}, {size}: {better} is better; MoEUT's perplexity is {ratio:.3f}× the "
            f"dense model's ({moe['perplexity']:.2f} vs {dense['perplexity']:.2f}), at "
            f"{moe['flops_per_token'] / dense['flops_per_token']:.2f}× its FLOPs per token."
        )
    return lines


HOW_TO_RUN = (
    "Run `python bench/paper.py` (two small sizes, sized for about 40 minutes on 2 idle CPU "
    "cores) or "
    "`python bench/paper.py --size 44m` (`126m`, `gpu`: both) on GPUs to rewrite it."
)

GENERATED_DOC = """\
# MoEUT against a parameter-matched dense Transformer, reproduced small

The paper's claim: at equal parameter count MoEUT matches or slightly beats a dense Transformer
in perplexity and zero-shot accuracy, with less compute. This page is written by
`bench/paper.py` from `{experiment}` (Python {python}; the code corpus is this interpreter's
standard library). {how_to_run}

Both sides train through `moeut train` on the same tokens in the same order, each at every
learning rate of the same sweep; the run with the lowest final validation loss of each side is
shown, exported with `moeut export` and evaluated with `moeut eval` on the whole validation
split (perplexity, bits per byte of the SentencePiece-normalised text: the tokenizer folds
runs of whitespace, so code loses its indentation) and the built-in zero-shot samples
(accuracy over 3–5 items per task: chance-level noise at this scale, shown because the paper
reports it). FLOPs per token are of the forward pass, 2 per multiply-accumulate counted as
the paper counts them (`moeut_dist.arch`); training FLOPs are 3 × that × tokens. Wall time
is this machine's; on a CPU, with the PyTorch expert path, it says nothing about MoEUT's speed
with the Triton kernels on GPUs.

{table}

The {runs} training runs took {training_time} of wall time together (data preparation, export,
evaluation and analysis not counted).

Final validation loss of every run of the sweeps:

{sweeps}

![validation loss against training FLOPs]({plot})

## What it shows

{comparison}

Expert usage of the MoEUT models (`moeut analyze`, up to {analyzed_tokens} validation positions; the
JSON and PNGs are in the folders named):

{expert_usage}

The paper compares models of 44M parameters and more, trained on billions of tokens; at this
size and length a comparison mostly measures how fast each side learns early on, and one seed
per point leaves differences of a few percent within noise.
"""


DISCUSSION_MARKER = (
    "<!-- Written by hand from here on: bench/paper.py keeps it when it rewrites the page. -->"
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu")
    parser.add_argument("--smoke", action="store_true", help="a tiny run of the whole harness")
    parser.add_argument("--experiment", type=Path, help="an experiment file instead of --size's")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "paper")
    parser.add_argument("--cache-dir", type=Path, default=ROOT / ".cache")
    parser.add_argument("--processes", type=int, help="per run (default: the experiment's)")
    parser.add_argument("--doc", type=Path, help="default: docs/paper-reproduction.md "
                        "(with --smoke: in the work directory)")  # fmt: skip
    args = parser.parse_args(argv)

    file_name, sizes = (SMOKE, None) if args.smoke else SIZES[args.size]
    experiment_file = args.experiment or EXPERIMENTS / file_name
    experiment = Experiment.load(experiment_file, sizes)
    if args.processes is not None:
        experiment = dataclasses.replace(experiment, processes=args.processes)
    default_doc = args.work_dir if args.smoke or args.experiment else ROOT / "docs"
    doc_path = args.doc or default_doc / "paper-reproduction.md"

    rows, sweeps = [], {}
    for corpus in experiment.corpora:
        corpus_dir = args.work_dir / corpus.name
        tokenizer, shards = prepare(corpus, experiment, corpus_dir, args.cache_dir)
        for size, models in experiment.models.items():
            batch = merged(experiment.train, models.get("recipe", {}))["data"]["global_batch_size"]
            for arch_name in ARCHITECTURES:
                runs = [
                    train_run(
                        experiment, corpus.name, size, arch_name, lr, tokenizer, shards, corpus_dir
                    )
                    for lr in experiment.learning_rates
                ]
                sweeps[corpus.name, size, arch_name] = [(run.lr, run.val_loss) for run in runs]
                best = min(runs, key=lambda run: run.val_loss)
                result = evaluate(best, shards)
                if arch_name == "moeut":
                    published = doc_path.with_suffix("") / f"{corpus.name}-{size}-analysis"
                    result |= analyze(best, shards, published)
                rows.append({
                    "corpus": corpus.name, "size": size, "arch": arch_name, "lr": best.lr,
                    "sweep_wall_s": sum(run.wall_s for run in runs), **result,
                    "wall_s": best.wall_s,
                    "curve": validation_curve(best, batch * experiment.seq_len,
                                              result["training_flops_per_token"]),
                })  # fmt: skip
    plot_path = doc_path.with_suffix(".png")
    plot(rows, plot_path)
    (args.work_dir / "results.json").write_text(json.dumps(rows, indent=1))
    write_doc(rows, sweeps, experiment_file, plot_path, doc_path)
    print(doc_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
