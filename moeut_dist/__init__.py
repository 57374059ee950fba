"""moeut-dist: distributed pretraining of MoEUT language models.

The model classes are imported on first use (PEP 562), so that the data tools (`moeut prep`,
`data_prep`) start without importing torch.
"""

import importlib
from typing import Any

# Exported name -> the module that defines it.
_EXPORTS = {
    "ConfigError": "moeut_dist.config",
    "DenseConfig": "moeut_dist.config",
    "DenseLM": "moeut_dist.model",
    "MoEUTConfig": "moeut_dist.config",
    "MoEUTLM": "moeut_dist.model",
    "MoEUTOutput": "moeut_dist.model",
    "profiles": "moeut_dist.profiles",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'moeut_dist' has no attribute {name!r}")
    module = importlib.import_module(_EXPORTS[name])
    return module if name == "profiles" else getattr(module, name)
