"""Named model configurations: the paper's MoEUTs and dense baselines, and tiny test models.

Both families take the authors' own training configurations (`moeut-spec.md`). `moeut-727m` is
the model the paper trained (d = 1280, 727.42M parameters); `moeut-582m` is the profile the
authors' public repository names "727M" (d = 1024, 581.94M parameters), a different, smaller
model, kept under the count it has. The dense baselines have the published depth, heads, head
width and feed-forward multiplier (FFN width `int(d · ff_mult)`); they are not solved to match.
"""

from __future__ import annotations

from typing import Any

from moeut_dist.config import ConfigError, DenseConfig, MoEUTConfig

PAPER_VOCAB_SIZE = 8000

# name: (d, L, H, dh, E, k, Ea, G) — the spec's table; m = 128 and ka = 2 throughout.
_PAPER = {
    "moeut-44m": (412, 16, 4, 82, 155, 12, 8, 2),
    "moeut-126m": (768, 18, 4, 96, 254, 12, 10, 2),
    "moeut-244m": (1024, 18, 4, 128, 387, 16, 10, 2),
    "moeut-318m": (1024, 24, 4, 128, 338, 16, 10, 3),
    "moeut-582m": (1024, 36, 5, 128, 467, 20, 13, 4),  # the public repository's "727M"
    "moeut-727m": (1280, 36, 5, 128, 467, 20, 13, 4),
    "moeut-1b": (1536, 36, 6, 128, 565, 24, 12, 4),
}

# name: (d, L, heads, head width, ff_mult) — the spec's dense table.
_PAPER_DENSE = {
    "dense-44m": (412, 16, 10, 41, 4.985),
    "dense-126m": (768, 16, 16, 48, 4),
    "dense-244m": (1024, 18, 16, 64, 4.014),
    "dense-318m": (1024, 24, 16, 64, 4.014),
    "dense-727m": (1280, 36, 20, 64, 4),
    "dense-1b": (1536, 36, 24, 64, 4),
}


def _paper_profile(d: int, n_layers: int, h: int, dh: int, e: int, k: int, ea: int, g: int):
    return dict(
        vocab_size=PAPER_VOCAB_SIZE,
        d_model=d,
        n_layers=n_layers,
        group_size=g,
        n_heads=h,
        head_dim=dh,
        n_experts=e,
        experts_per_token=k,
        expert_size=128,
        att_n_experts=ea,
        att_experts_per_head=2,
    )


def _dense_profile(d: int, n_layers: int, heads: int, head_dim: int, ff_mult: float):
    return dict(
        vocab_size=PAPER_VOCAB_SIZE,
        d_model=d,
        n_layers=n_layers,
        n_heads=heads,
        head_dim=head_dim,
        d_ff=int(d * ff_mult),
    )


_MOEUT: dict[str, dict[str, Any]] = {name: _paper_profile(*row) for name, row in _PAPER.items()}
# Trains in seconds on a CPU; exercises grouping (G=2, R=2), σ-MoE and SwitchHead with Ea > 1.
_MOEUT["tiny"] = dict(
    vocab_size=256,
    d_model=64,
    n_layers=4,
    group_size=2,
    n_heads=2,
    head_dim=16,
    n_experts=16,
    experts_per_token=4,
    expert_size=32,
    att_n_experts=4,
    att_experts_per_head=2,
)

_DENSE: dict[str, dict[str, Any]] = {
    name: _dense_profile(*row) for name, row in _PAPER_DENSE.items()
}
# The dense counterpart of `tiny`. Like dense-44M its heads do not span d (4 × 12 = 48 ≠ 64),
# and its FFN width (211) does not divide by a tensor-parallel size of 2.
_DENSE["dense-tiny"] = _dense_profile(64, 4, 4, 12, 3.3) | {"vocab_size": 256}


def names() -> list[str]:
    return sorted(_MOEUT) + sorted(_DENSE)


def _lookup(table: dict[str, dict[str, Any]], kind: str, other: str, name: str) -> dict[str, Any]:
    if name not in table:
        hint = f" ({name!r} is a {other} profile)" if name in {**_MOEUT, **_DENSE} else ""
        raise ConfigError(f"unknown {kind} profile {name!r}{hint}; choose one of {sorted(table)}")
    return table[name]


def get(name: str, **overrides: Any) -> MoEUTConfig:
    """The MoEUT profile `name`, with fields replaced by `overrides`."""
    return MoEUTConfig.from_dict({**_lookup(_MOEUT, "MoEUT", "dense", name), **overrides})


def get_dense(name: str, **overrides: Any) -> DenseConfig:
    """The dense baseline profile `name` (`dense-44m` …), with fields replaced by `overrides`."""
    return DenseConfig.from_dict({**_lookup(_DENSE, "dense", "MoEUT", name), **overrides})


def moeut_names() -> list[str]:
    return sorted(_MOEUT)


def dense_names() -> list[str]:
    return sorted(_DENSE)
