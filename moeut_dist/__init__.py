"""moeut-dist: distributed pretraining of MoEUT language models."""

from moeut_dist import profiles
from moeut_dist.config import ConfigError, DenseConfig, MoEUTConfig
from moeut_dist.model import DenseLM, MoEUTLM, MoEUTOutput

__all__ = [
    "ConfigError",
    "DenseConfig",
    "DenseLM",
    "MoEUTConfig",
    "MoEUTLM",
    "MoEUTOutput",
    "profiles",
]
