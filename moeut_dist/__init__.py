"""moeut-dist: distributed pretraining of MoEUT language models.

The model classes are imported on first use (PEP 562), so that the data tools (`moeut prep`,
`data_prep`) start without importing torch.
"""

from moeut_dist.lazy_exports import lazy_getattr

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
__getattr__ = lazy_getattr(__name__, _EXPORTS)
