"""`moeut analyze` on a tiny MoEUT: every number of its JSON recomputed here from the spec's
selection rule (top-k of sigmoid(LN(x) @ selectorᵀ)), layer application by layer application,
with Python sets per token."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch

from data_prep.shards import build_shards
from data_prep.synthetic import synthetic_documents, write_jsonl
from data_prep.tokenizer import train_tokenizer
from moeut_dist import DenseLM, MoEUTConfig, MoEUTLM, profiles
from moeut_dist.analysis import analyze_batches
from moeut_dist.cli import main as moeut
from moeut_dist.export import load_pretrained, save_pretrained
from tests.test_eval import val_samples

SEQ_LEN = 16


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    documents = synthetic_documents(60, seed=1, words_per_document=(20, 80))
    corpus = write_jsonl(tmp_path_factory.mktemp("corpus") / "corpus.jsonl", documents)
    tokenizer = train_tokenizer(
        [corpus], tmp_path_factory.mktemp("tok") / "tok.model", vocab_size=300
    )
    return corpus, tokenizer


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tokenizer):
    corpus, tok = tokenizer
    out = tmp_path_factory.mktemp("shards")
    build_shards([corpus], out, tok.path, SEQ_LEN, val_fraction=0.2, progress=False)
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    torch.manual_seed(0)
    # G = 2 over R = 3 repeats, so overlaps across repeats of one layer are non-trivial.
    config = MoEUTConfig.from_profile(
        "tiny", vocab_size=tokenizer[1].vocab_size, n_layers=6, kernel="torch"
    )
    return save_pretrained(
        MoEUTLM(config), tmp_path_factory.mktemp("model") / "m", tokenizer[1].path
    )


@pytest.fixture(scope="module")
def report(model_dir, shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("analysis")
    assert moeut(["analyze", str(model_dir), "--shards", str(shards), "--out", str(out),
                  "--batch-size", "3"]) == 0  # fmt: skip
    pngs = {p.name for p in out.glob("*.png") if p.stat().st_size > 0}
    assert pngs == {"expert_usage.png", "layer_overlap.png", "distinct_experts.png",
                    "entropy.png", "attention_usage.png"}  # fmt: skip
    return json.loads((out / "analysis.json").read_text())


def _top_k(logits: torch.Tensor, k: int) -> list:
    return torch.sigmoid(logits).topk(k, dim=-1).indices.tolist()


@pytest.fixture(scope="module")
def direct_selections(model_dir, shards):
    """Per layer application: the σ-MoE expert set of every token, and the per-head sets of
    the SwitchHead value and output experts, from a forward written out here."""
    model = load_pretrained(model_dir)
    config = model.config
    tokens = val_samples(shards)[:, :-1]
    ffn, att_v, att_o = [], [], []
    with torch.no_grad():
        x = model.embedding(tokens)
        for _ in range(config.n_repeats):
            for layer in model.transformer.layers:
                normed = layer.ln1(x)
                heads = (config.n_heads, config.att_n_experts)
                ka = config.att_experts_per_head
                att_v.append(_top_k((normed @ layer.attention.sel_v.T).unflatten(-1, heads), ka))
                att_o.append(_top_k((normed @ layer.attention.sel_o.T).unflatten(-1, heads), ka))
                x = x + layer.attention(normed, normed, x)[0]
                ffn.append(_top_k(layer.ln2(x) @ layer.ffn.expert_sel.T, config.experts_per_token))
                x = x + layer.ffn(x, layer.ln2(x))[0]

    def token_sets(per_layer):  # [L][B][T][...][k] → [L][token][...] of sets
        return [[_sets(row) for sample in layer for row in sample] for layer in per_layer]

    return config, token_sets(ffn), token_sets(att_v), token_sets(att_o)


def _sets(selection):
    if selection and isinstance(selection[0], list):
        return [set(s) for s in selection]
    return set(selection)


def _entropy(counts: list[float]) -> float:
    total = sum(counts)
    return -sum(c / total * math.log(c / total) for c in counts if c) / math.log(len(counts))


def test_expert_usage_and_entropy_per_layer_application(report, direct_selections):
    config, ffn, _, _ = direct_selections
    assert report["tokens"] == len(ffn[0]) and len(report["ffn"]["usage"]) == config.n_layers
    for application, sets in enumerate(ffn):
        counts = Counter(e for chosen in sets for e in chosen)
        usage = [counts[e] for e in range(config.n_experts)]
        total = sum(usage)
        assert report["ffn"]["usage"][application] == pytest.approx([u / total for u in usage])
        assert report["ffn"]["usage_entropy"][application] == pytest.approx(_entropy(usage))


def test_overlap_between_applications_of_the_same_layer(report, direct_selections):
    config, ffn, _, _ = direct_selections
    G = config.group_size
    for i in range(config.n_layers):
        for j in range(config.n_layers):
            jaccard = report["ffn"]["overlap_jaccard"][i][j]
            intersection = report["ffn"]["overlap_intersection"][i][j]
            if i % G != j % G:  # different parameters: no overlap to speak of
                assert jaccard is None and intersection is None
                continue
            pairs = list(zip(ffn[i], ffn[j], strict=True))
            assert intersection == pytest.approx(sum(len(a & b) for a, b in pairs) / len(pairs))
            assert jaccard == pytest.approx(
                sum(len(a & b) / len(a | b) for a, b in pairs) / len(pairs)
            )
    assert report["ffn"]["overlap_jaccard"][0][0] == 1.0


def test_distinct_experts_per_token_over_the_depth(report, direct_selections):
    config, ffn, _, _ = direct_selections
    G = config.group_size
    distinct = [
        sum(len(set().union(*(ffn[a][t] for a in range(g, config.n_layers, G)))) for g in range(G))
        for t in range(len(ffn[0]))
    ]
    histogram = report["ffn"]["distinct_experts_per_token"]
    assert histogram["histogram"] == {str(c): n for c, n in sorted(Counter(distinct).items())}
    assert histogram["mean"] == pytest.approx(sum(distinct) / len(distinct))
    assert (histogram["min"], histogram["max"]) == (min(distinct), max(distinct))


@pytest.mark.parametrize("name, index", [("value", 2), ("output", 3)])
def test_switchhead_usage_per_head(report, direct_selections, name, index):
    config = direct_selections[0]
    selections = direct_selections[index]
    for application, tokens in enumerate(selections):
        for head in range(config.n_heads):
            counts = Counter(e for chosen in tokens for e in chosen[head])
            usage = [counts[e] for e in range(config.att_n_experts)]
            reported = report["attention"][name]
            assert reported["usage"][application][head] == pytest.approx(
                [u / sum(usage) for u in usage]
            )
            assert reported["usage_entropy"][application][head] == pytest.approx(_entropy(usage))


def refused(capsys, *args: str) -> str:
    assert moeut(["analyze", *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moeut analyze: ")
    return lines[0]


def test_bad_input_is_one_line(model_dir, shards, tokenizer, tmp_path, capsys):
    assert "not found" in refused(capsys, str(tmp_path / "nowhere"), "--shards", str(shards))
    assert "--max-tokens" in refused(capsys, str(model_dir), "--shards", str(shards),
                                     "--max-tokens", "0")  # fmt: skip
    a_file = tmp_path / "file"
    a_file.write_text("")
    assert "not a directory" in refused(capsys, str(model_dir), "--shards", str(shards),
                                        "--out", str(a_file))  # fmt: skip
    assert "manifest" in refused(capsys, str(model_dir), "--shards", str(tmp_path))
    dense = DenseLM(profiles.get_dense("dense-tiny", vocab_size=tokenizer[1].vocab_size))
    dense_dir = save_pretrained(dense, tmp_path / "dense", tokenizer[1].path)
    assert "DenseLM: it has no experts" in refused(capsys, str(dense_dir), "--shards", str(shards))


def test_single_expert_attention_has_no_selection_to_report(shards, tokenizer):
    torch.manual_seed(0)
    config = MoEUTConfig.from_profile(
        "tiny", vocab_size=tokenizer[1].vocab_size, att_n_experts=1, kernel="torch"
    )
    statistics = analyze_batches(MoEUTLM(config).eval(), [val_samples(shards)[:2]])
    report = statistics.report()
    assert report["attention"] is None and report["tokens"] == 2 * SEQ_LEN
    assert len(report["ffn"]["usage"]) == config.n_layers
