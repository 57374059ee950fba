"""Named model configurations: the paper's six MoEUTs, a tiny test model, dense baselines.

The paper's "727M" profile has 581.94M parameters with its published settings; it is named by
what it is (`moeut-582m`). Dense baselines keep the MoEUT's width and depth; their feed-forward
width is the paper's where the spec publishes it (244M: 4.014·d) and otherwise solved so that the
parameter count matches.
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
    "moeut-582m": (1024, 36, 5, 128, 467, 20, 13, 4),
    "moeut-1b": (1536, 36, 6, 128, 565, 24, 12, 4),
}

_RENAMED = {"moeut-727m": "moeut-582m"}

# The dense baselines' feed-forward width as a multiple of d, where the paper states it.
_PAPER_DENSE_FFN = {"moeut-244m": 4.014}


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


def _dense_heads(d_model: int) -> int:
    """The divisor of d_model giving the head width closest to 64."""
    divisors = [h for h in range(1, d_model + 1) if d_model % h == 0]
    return min(divisors, key=lambda h: abs(d_model / h - 64))


def _matched_d_ff(config: MoEUTConfig) -> int:
    """The feed-forward width that gives a dense model of this width and depth the MoEUT's count."""
    d, n_layers, vocab = config.d_model, config.n_layers, config.vocab_size
    outside_layers = 2 * vocab * d + vocab + 2 * d  # embedding, LM head (+bias), final norm
    per_layer_fixed = 4 * d * d + 4 * d  # Q, K, V, O and two LayerNorms
    per_layer = (moeut_parameter_count(config) - outside_layers) / n_layers
    return round((per_layer - per_layer_fixed) / (2 * d))


def _dense_baseline(moeut_name: str, config: MoEUTConfig) -> dict[str, Any]:
    d, n_layers, vocab = config.d_model, config.n_layers, config.vocab_size
    published = _PAPER_DENSE_FFN.get(moeut_name)
    d_ff = round(published * d) if published else _matched_d_ff(config)
    return dict(vocab_size=vocab, d_model=d, n_layers=n_layers, n_heads=_dense_heads(d), d_ff=d_ff)


def moeut_parameter_count(config: MoEUTConfig) -> int:
    """Exact parameter count of `MoEUTLM(config)` (embedding and LM head included)."""
    d, h, dh, ea = config.d_model, config.n_heads, config.head_dim, config.att_n_experts
    attention = 2 * d * h * dh + 2 * h * ea * d * dh + (2 if ea > 1 else 1) * h * ea * d
    ffn = 2 * config.n_experts * d * config.expert_size + config.n_experts * d
    layer = attention + ffn + 4 * d
    return config.group_size * layer + 2 * config.vocab_size * d + config.vocab_size + 2 * d


def names() -> list[str]:
    return sorted(_MOEUT) + sorted(f"dense-{n.removeprefix('moeut-')}" for n in _PAPER)


def get(name: str, **overrides: Any) -> MoEUTConfig:
    """The MoEUT profile `name`, with fields replaced by `overrides`."""
    if name in _RENAMED:
        raise ConfigError(
            f"profile {name!r} is named {_RENAMED[name]!r} here, after its true parameter count"
        )
    if name not in _MOEUT:
        raise ConfigError(f"unknown MoEUT profile {name!r}; choose one of {sorted(_MOEUT)}")
    return MoEUTConfig.from_dict({**_MOEUT[name], **overrides})


def get_dense(name: str, **overrides: Any) -> DenseConfig:
    """The dense baseline `dense-XXX`, parameter-matched to `moeut-XXX`."""
    moeut_name = "moeut-" + name.removeprefix("dense-")
    if not name.startswith("dense-") or moeut_name not in _PAPER:
        choices = sorted(f"dense-{n.removeprefix('moeut-')}" for n in _PAPER)
        raise ConfigError(f"unknown dense profile {name!r}; choose one of {choices}")
    vocab = overrides.get("vocab_size", PAPER_VOCAB_SIZE)
    baseline = _dense_baseline(moeut_name, get(moeut_name, vocab_size=vocab))
    return DenseConfig.from_dict({**baseline, **overrides})
