"""Model definitions; no distributed code here (parallelism is applied from outside)."""

from moeut_dist.model.dense import DenseLM
from moeut_dist.model.lm_head import LMHead, lm_loss
from moeut_dist.model.moeut import MoEUTLM, MoEUTOutput, perplexity

__all__ = ["DenseLM", "LMHead", "MoEUTLM", "MoEUTOutput", "lm_loss", "perplexity"]
