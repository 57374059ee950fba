"""`moeut analyze`: how a trained MoEUT's shared layers use their experts (the paper's §5).

The routing comes from a single-process model over validation shards. Every application of a
group layer (layer `g` in repeat `r` is application `r·G + g`) is counted apart, so the same
parameters can be compared across depth. Forward hooks read the selection logits that the
σ-MoE and SwitchHead modules return, and pick the top-k from them with the model's own
`top_k_sigmoid_gates`; in eval mode (no expert dropout) that is exactly the selection the
layer made, and the model code stays as it is.

Statistics, over every input position of the evaluated samples:

- σ-MoE expert usage per application: the share of the application's selections that went to
  each expert, and its entropy over log(n_experts) (1: every expert equally used);
- overlap between applications i and j of the same group layer (the same experts): the mean
  over tokens of |S_i ∩ S_j| and of |S_i ∩ S_j| / |S_i ∪ S_j| (Jaccard), S being the set of
  experts a token selects; applications of different group layers have disjoint experts, so
  their overlap is not defined (null);
- distinct experts per token over the whole depth: |∪_r S_(r,g)| summed over the group layers
  g, as a histogram (k·G when every repeat reselects the same experts, min(E, k·R)·G at most);
- SwitchHead usage per application and head, for the value and the output experts, with the
  same normalised entropy.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moeut_dist.cli_errors import reports_bad_input
from moeut_dist.model import MoEUTLM
from moeut_dist.model.moe import top_k_sigmoid_gates

REPORT_FILE = "analysis.json"


@dataclass
class Routing:
    """The experts every token selected in one forward, per application of the group layers.

    `ffn` [N, L, k]: σ-MoE experts; `att_v`, `att_o` [N, L, H, ka]: SwitchHead value and output
    experts, indices within each head (None when the attention has a single expert per head).
    """

    ffn: torch.Tensor
    att_v: torch.Tensor | None
    att_o: torch.Tensor | None


@contextmanager
def recording_routing(model: MoEUTLM) -> Iterator[list[dict[str, torch.Tensor]]]:
    """Forward hooks that append, for each layer application in the order they run, the
    selected experts as `{"ffn": [B, T, k], "att_v": ..., "att_o": [B, T, H, ka]}`."""
    applications: list[dict[str, torch.Tensor]] = []

    def after_attention(module, inputs, output) -> None:
        _, _, logits = output  # {} when each head has one expert
        applications.append(
            {
                name: top_k_sigmoid_gates(value, module.experts_per_head)[1]
                for name, value in logits.items()
            }
        )

    def after_ffn(module, inputs, output) -> None:
        _, logits = output
        applications[-1]["ffn"] = top_k_sigmoid_gates(logits, module.k)[1]

    handles = []
    for layer in model.transformer.layers:
        handles.append(layer.attention.register_forward_hook(after_attention))
        handles.append(layer.ffn.register_forward_hook(after_ffn))
    try:
        yield applications
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def route(model: MoEUTLM, tokens: torch.Tensor) -> Routing:
    """The experts every position of `tokens` [B, T] selects, from one forward of `model`."""
    if model.training:
        raise ValueError("routing is read in eval mode: expert dropout would change it")
    with recording_routing(model) as applications:
        model(tokens)
    if len(applications) != model.config.n_layers:
        raise RuntimeError(f"recorded {len(applications)} of {model.config.n_layers} layers")

    def stacked(name: str) -> torch.Tensor | None:
        if name not in applications[0]:
            return None
        per_layer = [application[name].flatten(0, 1) for application in applications]
        return torch.stack(per_layer, dim=1)

    return Routing(stacked("ffn"), stacked("att_v"), stacked("att_o"))


def normalized_entropy(counts: torch.Tensor) -> torch.Tensor:
    """Entropy of the distribution `counts` (last dim) over log(its size): 1 when uniform."""
    shares = counts / counts.sum(-1, keepdim=True).clamp_min(1)
    entropy = -(shares * shares.clamp_min(1e-30).log()).sum(-1)
    return entropy / math.log(counts.shape[-1])


@dataclass
class RoutingStatistics:
    """Sums over tokens of everything the report needs; `add` one forward's `Routing` at a time."""

    n_layers: int
    group_size: int
    n_experts: int
    n_heads: int
    att_n_experts: int  # per head; 1: SwitchHead has no selection to count
    tokens: int = 0
    ffn_counts: torch.Tensor = field(init=False)  # [L, E] selections
    intersection_sum: torch.Tensor = field(init=False)  # [L, L] Σ_tokens |S_i ∩ S_j|
    jaccard_sum: torch.Tensor = field(init=False)  # [L, L] Σ_tokens |S_i ∩ S_j| / |S_i ∪ S_j|
    distinct_histogram: torch.Tensor = field(init=False)  # [G·E + 1] tokens per distinct count
    att_v_counts: torch.Tensor | None = field(init=False)  # [L, H, Ea]; None if Ea = 1
    att_o_counts: torch.Tensor | None = field(init=False)

    def __post_init__(self) -> None:
        L, E = self.n_layers, self.n_experts
        self.ffn_counts = torch.zeros(L, E, dtype=torch.float64)
        self.intersection_sum = torch.zeros(L, L, dtype=torch.float64)
        self.jaccard_sum = torch.zeros(L, L, dtype=torch.float64)
        self.distinct_histogram = torch.zeros(self.group_size * E + 1, dtype=torch.float64)
        self.att_v_counts = self.att_o_counts = None
        if self.att_n_experts > 1:
            shape = (L, self.n_heads, self.att_n_experts)
            self.att_v_counts = torch.zeros(shape, dtype=torch.float64)
            self.att_o_counts = torch.zeros(shape, dtype=torch.float64)

    def add(self, routing: Routing) -> None:
        experts = routing.ffn.cpu()
        n_tokens, n_layers, k = experts.shape
        selected = torch.zeros(n_tokens, n_layers, self.n_experts)
        selected.scatter_(2, experts, 1.0)  # [N, L, E]: 1 where the token chose the expert
        self.tokens += n_tokens
        self.ffn_counts += selected.sum(0).double()
        intersection = torch.bmm(selected, selected.transpose(1, 2))  # [N, L, L]
        self.intersection_sum += intersection.sum(0).double()
        self.jaccard_sum += (intersection / (2 * k - intersection)).sum(0).double()
        # Application r·G + g uses group layer g: reshape to [N, R, G, E] and take the union
        # over repeats of each group layer's experts.
        per_repeat = selected.view(n_tokens, -1, self.group_size, self.n_experts)
        distinct = per_repeat.amax(dim=1).sum(dim=(1, 2)).long()
        self.distinct_histogram += torch.bincount(
            distinct, minlength=len(self.distinct_histogram)
        ).double()
        if self.att_v_counts is not None:
            _count_per_head(routing.att_v, self.att_v_counts)
            _count_per_head(routing.att_o, self.att_o_counts)

    @classmethod
    def for_model(cls, model: MoEUTLM) -> RoutingStatistics:
        c = model.config
        return cls(c.n_layers, c.group_size, c.n_experts, c.n_heads, c.att_n_experts)

    def report(self) -> dict[str, Any]:
        """The JSON report (see the module docstring for the definitions)."""
        if self.tokens == 0:
            raise ValueError("no tokens were analysed")
        L, G = self.n_layers, self.group_size
        same_layer = [[i % G == j % G for j in range(L)] for i in range(L)]

        def per_token(sums: torch.Tensor) -> list[list[float | None]]:
            means = (sums / self.tokens).tolist()
            return [
                [value if same else None for value, same in zip(row, same_row, strict=True)]
                for row, same_row in zip(means, same_layer, strict=True)
            ]

        histogram = self.distinct_histogram
        counts = torch.arange(len(histogram), dtype=torch.float64)
        observed = histogram.nonzero().flatten()
        report: dict[str, Any] = {
            "tokens": self.tokens,
            "applications": [
                {"index": i, "group_layer": i % G, "repeat": i // G} for i in range(L)
            ],
            "ffn": {
                "usage": (self.ffn_counts / self.ffn_counts.sum(1, keepdim=True)).tolist(),
                "usage_entropy": normalized_entropy(self.ffn_counts).tolist(),
                "overlap_intersection": per_token(self.intersection_sum),
                "overlap_jaccard": per_token(self.jaccard_sum),
                "distinct_experts_per_token": {
                    "histogram": {str(int(c)): int(histogram[c]) for c in observed.tolist()},
                    "mean": float((histogram * counts).sum() / self.tokens),
                    "min": int(observed.min()),
                    "max": int(observed.max()),
                },
            },
            "attention": None,
        }
        if self.att_v_counts is not None:
            report["attention"] = {
                name: {
                    "usage": (counts / counts.sum(-1, keepdim=True)).tolist(),
                    "usage_entropy": normalized_entropy(counts).tolist(),
                }
                for name, counts in (("value", self.att_v_counts), ("output", self.att_o_counts))
            }
        return report


def _count_per_head(chosen: torch.Tensor, counts: torch.Tensor) -> None:
    """Add the selections of `chosen` [N, L, H, ka] to `counts` [L, H, Ea]."""
    per_head = chosen.cpu().permute(1, 2, 0, 3).flatten(2)  # [L, H, N·ka]
    counts.scatter_add_(2, per_head, torch.ones(per_head.shape, dtype=counts.dtype))


def analyze_batches(
    model: MoEUTLM, batches: Iterable[torch.Tensor], max_tokens: int | None = None
) -> RoutingStatistics:
    """Routing statistics of `model` over the inputs (`batch[:, :-1]`) of `batches`, stopping
    after the batch that reaches `max_tokens` input positions."""
    statistics = RoutingStatistics.for_model(model)
    device = next(model.parameters()).device
    for batch in batches:
        statistics.add(route(model, batch[:, :-1].to(device)))
        if max_tokens is not None and statistics.tokens >= max_tokens:
            break
    return statistics


def model_summary(model: MoEUTLM) -> dict[str, int]:
    config = model.config
    return {
        "n_layers": config.n_layers,
        "group_size": config.group_size,
        "n_repeats": config.n_repeats,
        "n_experts": config.n_experts,
        "experts_per_token": config.experts_per_token,
        "n_heads": config.n_heads,
        "att_n_experts": config.att_n_experts,
        "att_experts_per_head": config.att_experts_per_head,
    }


def default_out_dir(model_dir: str | Path) -> Path:
    """`<model_dir>-analysis`: beside the model directory, never inside it (a model directory
    holds only the model's files, so that exporting over it can replace it whole)."""
    model_dir = Path(model_dir)
    return model_dir.with_name(model_dir.name + "-analysis")


@reports_bad_input("analyze")
def _analyze_command(args: argparse.Namespace) -> int:
    from moeut_dist.analysis_plots import write_plots
    from moeut_dist.data import TokenLoader, read_manifest
    from moeut_dist.eval_cli import device_or_default
    from moeut_dist.evaluate import load_model_and_tokenizer

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    out_dir = Path(args.out) if args.out else default_out_dir(args.model_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} exists and is not a directory")
    device = device_or_default(args.device)
    manifest = read_manifest(args.shards)
    if manifest.split(args.split).samples == 0:
        raise ValueError(f"split {args.split!r} of {args.shards} holds no samples to analyse")
    model, tokenizer = load_model_and_tokenizer(args.model_dir, device)
    if not isinstance(model, MoEUTLM):
        raise ValueError(f"{args.model_dir} holds a {type(model).__name__}: it has no experts")
    loader = TokenLoader(
        args.shards,
        seq_len=manifest.seq_len,
        tokenizer=tokenizer,
        batch_size=args.batch_size,
        split=args.split,
        epochs=1,
    )
    report = {
        "model_dir": str(args.model_dir),
        "shards": str(args.shards),
        "split": args.split,
        "model": model_summary(model),
        **analyze_batches(model, loader, args.max_tokens).report(),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / REPORT_FILE).write_text(json.dumps(report, indent=1))
    pngs = write_plots(report, out_dir)
    ffn = report["ffn"]
    print(f"{report['tokens']} tokens of {args.shards} ({args.split})")
    print("σ-MoE usage entropy per layer: " + " ".join(f"{e:.3f}" for e in ffn["usage_entropy"]))
    print(f"distinct experts per token: mean {ffn['distinct_experts_per_token']['mean']:.1f}")
    for path in [out_dir / REPORT_FILE, *pngs]:
        print(path)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `analyze` to the `moeut` command."""
    parser = subparsers.add_parser(
        "analyze", help="expert usage, overlap across depth and entropy of a MoEUT (PNGs + JSON)"
    )
    parser.add_argument("model_dir", help="a model directory (moeut_dist.export)")
    parser.add_argument("--shards", required=True, help="shards built with the model's tokenizer")
    parser.add_argument("--split", default="val", help="split of the shards to read")
    parser.add_argument("--out", help="output folder (default: MODEL_DIR-analysis)")
    parser.add_argument(
        "--max-tokens", type=int, default=1 << 17, help="stop after this many positions"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.set_defaults(handler=_analyze_command)
