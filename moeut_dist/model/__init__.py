"""Model definitions; no distributed code here (parallelism is applied from outside)."""

from moeut_dist.model.dense import DenseLM
from moeut_dist.model.moeut import MoEUTLM, MoEUTOutput, lm_loss, perplexity

__all__ = ["DenseLM", "MoEUTLM", "MoEUTOutput", "lm_loss", "perplexity"]
