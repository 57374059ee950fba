"""lm-evaluation-harness over our model: a native `lm_eval.api.model.LM` and `moeut eval
--lm-eval`.

The adapter scores with our zero-shot scorer (`score_continuations`) and generates with our
KV-cache sampler, on the conventions of our training stream: every sequence starts with the
end-of-document id, and context and continuation are tokenised separately (SentencePiece drops
the continuation's leading space into its word-boundary mark), so on the same items both give
the same per-choice log-likelihoods, hence the same `acc` and `acc_norm` (both divide by the
candidate's length in characters, without the delimiter). Where the two must still differ:

- LAMBADA: lm-eval's perplexity is exp of the mean log-likelihood per text, ours per target
  token (its `acc`, every target token greedy, is ours).
- lm-eval's own task definitions format some items differently from our readers (hellaswag's
  context, for one); `lm_eval_tasks/` holds the paper's six tasks as our readers form them.
- lm-eval's `hf` model (on an `--hf` export) tokenises context and continuation together and
  then splits them; for SentencePiece that is the same wherever the continuation starts a new
  word, as in all six tasks. It prepends `</s>` only with `add_bos_token=True`.

`moeut_dist/zeroshot/lm_eval_tasks/` are task YAMLs reading local JSONL files (`dataset_path:
json`), so everything runs offline.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import yaml
from lm_eval.api.model import LM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from moeut_dist.data import Tokenizer
from moeut_dist.generate import SamplingConfig, generate
from moeut_dist.model import MoEUTLM
from moeut_dist.zeroshot.scorer import model_logits, score_continuations

TASK_TEMPLATES = resources.files("moeut_dist.zeroshot") / "lm_eval_tasks"
RESULTS_FILE = "lm_eval_results.json"


class MoEUTHarnessLM(LM):
    """Our `MoEUTLM` and its tokenizer as an lm-eval model."""

    def __init__(
        self, model: MoEUTLM, tokenizer: Tokenizer, batch_size: int = 16, max_length: int = 2048
    ) -> None:
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.max_length = batch_size, max_length

    def _score(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        scores = score_continuations(model_logits(self.model), pairs, self.batch_size)
        return [(score.logprob, score.greedy) for score in scores]

    def loglikelihood(
        self, requests: Sequence[Any], disable_tqdm: bool = False
    ) -> list[tuple[float, bool]]:
        eod = self.tokenizer.eod_id
        pairs = []
        for context, continuation in (request.args for request in requests):
            continuation_ids = self.tokenizer.encode(continuation)
            if not continuation_ids:
                raise ValueError(f"the continuation {continuation!r} encodes to no tokens")
            pairs.append(([eod, *self.tokenizer.encode(context)], continuation_ids))
        return self._score(pairs)

    def loglikelihood_rolling(
        self, requests: Sequence[Any], disable_tqdm: bool = False
    ) -> list[float]:
        """The log-likelihood of each whole text, in windows of `max_length` tokens that each
        predict tokens not predicted before (lm-eval's rolling windows)."""
        results = []
        for (text,) in (request.args for request in requests):
            windows = [
                make_disjoint_window(window)
                for window in get_rolling_token_windows(
                    self.tokenizer.encode(text), self.tokenizer.eod_id, self.max_length, 1
                )
            ]
            results.append(sum(logprob for logprob, _ in self._score(windows)))
        return results

    def generate_until(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[str]:
        from moeut_dist.eval_cli import stream_text

        device = next(self.model.parameters()).device
        outputs = []
        for context, options in (request.args for request in requests):
            options = dict(options)
            until = options.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            do_sample = options.pop("do_sample", False)
            sampling = SamplingConfig(
                max_new_tokens=options.pop("max_gen_toks", 256),
                temperature=float(options.pop("temperature", 1.0)) if do_sample else 0.0,
                top_k=options.pop("top_k", 0) or 0,
                top_p=float(options.pop("top_p", 1.0) or 1.0),
            )
            prompt = [self.tokenizer.eod_id, *self.tokenizer.encode(context)]
            steps = generate(
                self.model,
                torch.tensor([prompt], device=device),
                sampling,
                stop_token=self.tokenizer.eod_id,
                vocab_size=self.tokenizer.vocab_size,
            )
            outputs.append(
                _until(stream_text(self.tokenizer, prompt, (t.item() for t in steps)), until)
            )
        return outputs


def _until(pieces: Iterable[str], stops: Sequence[str]) -> str:
    """The text the pieces add up to, cut before the first stop string once one appears."""
    text = ""
    for piece in pieces:
        text += piece
        cuts = [text.index(stop) for stop in stops if stop in text]
        if cuts:
            return text[: min(cuts)]
    return text


# --- tasks ---------------------------------------------------------------------------------


def local_task_config(name: str, data_file: str | Path) -> dict[str, Any]:
    """The lm-eval config of our task `name` (lambada, blimp, piqa, hellaswag, arc_easy, cbt)
    reading the JSONL file `data_file`."""
    template = TASK_TEMPLATES / f"moeut_{name}.yaml"
    if not template.is_file():
        known = sorted(
            p.name.removeprefix("moeut_").removesuffix(".yaml") for p in TASK_TEMPLATES.iterdir()
        )
        raise ValueError(f"no lm-eval template for task {name!r}; known: {', '.join(known)}")
    data_file = Path(data_file)
    if not data_file.is_file():
        raise FileNotFoundError(f"{name} task file {data_file} not found")
    config = yaml.safe_load(template.read_text())
    config["dataset_kwargs"] = {"data_files": {"test": str(data_file.resolve())}}
    return config


def resolve_tasks(
    specs: Sequence[str], include_paths: Sequence[str] = ()
) -> tuple[list[str | dict[str, Any]], Any]:
    """lm-eval task arguments and the task manager for `specs`, each `NAME=FILE` (one of our
    six tasks on a local file), a task YAML file, or an lm-eval task or group name; unknown
    names are refused."""
    from lm_eval.tasks import TaskManager

    tasks: list[str | dict[str, Any]] = []
    names = []
    for spec in specs:
        name, separator, path = spec.partition("=")
        if separator:
            tasks.append(local_task_config(name, path))
        elif Path(spec).is_file():
            tasks.append(spec)
        else:
            names.append(spec)
    # Indexing lm-eval's own few thousand tasks takes a while: only when one is named.
    manager = TaskManager(
        include_path=[str(TASK_TEMPLATES), *include_paths], include_defaults=bool(names)
    )
    for name in names:
        if name not in manager.all_tasks:
            raise ValueError(f"unknown lm-eval task {name!r}")
    return [*tasks, *names], manager


def run_lm_eval(
    model: MoEUTLM, tokenizer: Tokenizer, tasks: Sequence[str | dict[str, Any]], manager: Any,
    num_fewshot: int | None = None, limit: int | float | None = None, batch_size: int = 16,
    bootstrap_iters: int = 100_000,
) -> dict[str, Any]:  # fmt: skip
    """lm-eval's `simple_evaluate` through the adapter; its results, per-item samples included.
    `bootstrap_iters` (lm-eval's default) resample the metrics without a closed-form standard
    error, such as perplexity; 0 skips them."""
    from lm_eval import simple_evaluate

    return simple_evaluate(
        model=MoEUTHarnessLM(model, tokenizer, batch_size),
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
        log_samples=True,
        bootstrap_iters=bootstrap_iters,
    )


def write_results(results: dict[str, Any], path: Path) -> None:
    """The results without the per-item samples: metrics, task versions, n-shot, configs."""
    from lm_eval.utils import handle_non_serializable

    summary = {key: value for key, value in results.items() if key != "samples"}
    path.write_text(json.dumps(summary, indent=2, default=handle_non_serializable) + "\n")
