"""Hugging Face transformers directories of our models, and back (`moeut_dist.hf.export`).

`configuration_moeut` and `modeling_moeut` are the thin `PreTrainedConfig` / `PreTrainedModel`
wrappers around `moeut_dist.model`; `packaging` copies them, the model package and what it
imports into an exported directory, so the directory's code is ours, never a second copy.
"""
