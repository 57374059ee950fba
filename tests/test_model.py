"""The MoEUT model against the spec: structure, masking, caching, regulariser, initialisation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moeut_dist import ConfigError, DenseLM, MoEUTConfig, MoEUTLM, arch, profiles
from moeut_dist.model import lm_loss
from moeut_dist.model.attention import SwitchHead
from moeut_dist.model.moe import SigmaMoE
from moeut_dist.model.regularization import negative_mean_entropy, summed_selection_probs
from moeut_dist.model.rope import RotaryEmbedding

TINY = MoEUTConfig.from_profile("tiny", vocab_size=64)
TINY_GATED = TINY.replace(att_n_experts=1)  # the Ea == 1 SwitchHead variant


def make_model(config: MoEUTConfig = TINY, seed: int = 0, dtype=torch.float32) -> MoEUTLM:
    torch.manual_seed(seed)
    return MoEUTLM(config).to(dtype)


def tokens(batch: int, length: int, vocab: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randint(vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


# --- shapes, dtypes, structure -------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("config", [TINY, TINY_GATED], ids=["Ea>1", "Ea=1"])
def test_output_shapes_and_dtypes(config, dtype):
    model = make_model(config, dtype=dtype)
    out = model(tokens(3, 7))
    assert out.logits.shape == (3, 7, 64) and out.logits.dtype == dtype
    assert out.reg_loss.shape == () and torch.isfinite(out.reg_loss)
    assert out.cache is None
    assert torch.isfinite(out.logits).all()


def test_group_is_applied_in_order_and_repeated():
    config = TINY.replace(n_layers=6, group_size=2)
    model = make_model(config)
    assert len(model.transformer.layers) == 2
    calls = []
    for index, layer in enumerate(model.transformer.layers):
        layer.register_forward_hook(lambda *_, i=index: calls.append(i))
    model(tokens(1, 4))
    assert calls == [0, 1, 0, 1, 0, 1]


PAPER_PARAMETERS_M = {  # moeut-spec.md
    "moeut-44m": 44.35,
    "moeut-126m": 125.67,
    "moeut-244m": 243.33,
    "moeut-318m": 318.11,
    "moeut-582m": 581.94,  # the authors' public-repository profile named "727M"
    "moeut-727m": 727.42,
    "moeut-1b": 1040.32,
}


@pytest.mark.parametrize("name", sorted(PAPER_PARAMETERS_M))
def test_paper_profile_parameter_counts(name):
    config = MoEUTConfig.from_profile(name, vocab_size=8000)
    with torch.device("meta"):
        model = MoEUTLM(config)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count / 1e6 - PAPER_PARAMETERS_M[name]) < 0.01
    summary = arch.of(config).summary(config, 1024)
    assert summary.parameters == count
    assert summary.active_parameters < count


# name: (d, L, heads, head width, FFN width = int(d · ff_mult)), moeut-spec.md's dense table.
PAPER_DENSE_SHAPES = {
    "dense-44m": (412, 16, 10, 41, 2053),
    "dense-126m": (768, 16, 16, 48, 3072),
    "dense-244m": (1024, 18, 16, 64, 4110),
    "dense-318m": (1024, 24, 16, 64, 4110),
    "dense-727m": (1280, 36, 20, 64, 5120),
    "dense-1b": (1536, 36, 24, 64, 6144),
}


@pytest.mark.parametrize("name", sorted(PAPER_DENSE_SHAPES))
def test_dense_baselines_have_the_published_shapes_and_match_their_moeut(name):
    config = profiles.get_dense(name)
    shape = (config.d_model, config.n_layers, config.n_heads, config.head_dim, config.d_ff)
    assert shape == PAPER_DENSE_SHAPES[name]
    with torch.device("meta"):
        model = DenseLM(config)
    count = sum(p.numel() for p in model.parameters())
    assert count == arch.of(config).summary(config, 1024).parameters
    # Parameter-matched by the authors' choice of shapes, not by solving for a width.
    matched = PAPER_PARAMETERS_M["moeut-" + name.removeprefix("dense-")]
    assert abs(count / 1e6 / matched - 1) < 0.005
    if name == "dense-44m":  # 10 heads of width 41: attention projects d → 410 → d
        assert tuple(model.layers[0].attention.q.weight.shape) == (410, 412)
        assert tuple(model.layers[0].attention.o.weight.shape) == (412, 410)


def test_dense_baseline_layers_start_at_the_pre_ln_scale():
    config = profiles.get_dense("dense-44m", vocab_size=300)
    layer = DenseLM(config).layers[0]
    attention, ffn = layer.attention, layer.ffn
    for linear in (attention.q, attention.k, attention.v, attention.o, ffn.up, ffn.down):
        expected = math.sqrt(2 / (config.n_layers * linear.in_features))
        assert linear.weight.std().item() == pytest.approx(expected, rel=0.02)


def test_unknown_profiles_and_profiles_of_the_other_architecture_are_explained():
    with pytest.raises(ConfigError, match="unknown MoEUT profile 'nope'"):
        MoEUTConfig.from_profile("nope")
    with pytest.raises(ConfigError, match="'dense-44m' is a dense profile"):
        MoEUTConfig.from_profile("dense-44m")
    with pytest.raises(ConfigError, match="'moeut-44m' is a MoEUT profile"):
        profiles.get_dense("moeut-44m")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"n_layers": 5}, r"n_layers \(5\) must be a multiple of group_size \(2\)"),
        ({"experts_per_token": 17}, r"experts_per_token \(17\) exceeds n_experts \(16\)"),
        ({"att_experts_per_head": 5}, r"att_experts_per_head \(5\)"),
        ({"dropout": 1.5}, "dropout must be in"),
        ({"kernel": "cuda"}, r"kernel must be one of \[.auto., .torch., .triton.\], got .cuda."),
        ({"d_modle": 3}, r"unknown key\(s\) \[.d_modle.\]"),
    ],
)
def test_invalid_configs_are_rejected_by_name(changes, message):
    with pytest.raises(ConfigError, match=message):
        MoEUTConfig.from_dict({**TINY.to_dict(), **changes})


# --- the spec's mathematics, recomputed naively -------------------------------------------


def naive_sigma_moe(moe: SigmaMoE, expert_in, select_in):
    logits = select_in @ moe.expert_sel.T
    gates = torch.sigmoid(logits)
    chosen = gates.topk(moe.k, dim=-1).indices
    out = torch.zeros_like(expert_in)
    for b, t in torch.cartesian_prod(*(torch.arange(s) for s in expert_in.shape[:2])):
        for e in chosen[b, t]:
            hidden = F.relu(expert_in[b, t] @ moe.keys[e])
            out[b, t] += gates[b, t, e] * (hidden @ moe.values[e])
    return out


def naive_rope(x: torch.Tensor, n: int, offset: int = 0) -> torch.Tensor:
    out = x.clone()
    for t in range(x.shape[-2]):
        for i in range(n // 2):
            angle = (t + offset) * 10000 ** (-2 * i / n)
            a, b = x[..., t, i], x[..., t, i + n // 2]
            out[..., t, i] = a * math.cos(angle) - b * math.sin(angle)
            out[..., t, i + n // 2] = b * math.cos(angle) + a * math.sin(angle)
    return out


def naive_switchhead(att: SwitchHead, q_src, k_src, v_src):
    batch, time, _ = q_src.shape
    heads, dh, ea = att.n_heads, att.head_dim, att.n_experts
    q = (q_src @ att.q.weight.T) * dh**-0.25
    k = (k_src @ att.k.weight.T) * dh**-0.25
    causal = torch.ones(time, time, dtype=torch.bool).tril()
    out = torch.zeros_like(q_src)
    for h in range(heads):
        rows = slice(h * ea, (h + 1) * ea)
        gv = torch.sigmoid(k_src @ att.sel_v[rows].T)
        go = torch.sigmoid(q_src @ att.sel_o[rows].T)
        iv, io = (
            gv.topk(att.experts_per_head, -1).indices,
            go.topk(att.experts_per_head, -1).indices,
        )
        v_h = torch.zeros(batch, time, dh, dtype=q_src.dtype)
        for j in range(att.experts_per_head):
            weight = att.v[rows][iv[..., j]]  # [B, T, d, dh]
            v_h += gv.gather(-1, iv[..., j : j + 1]) * torch.einsum("btd,btde->bte", v_src, weight)
        qh = naive_rope(q[..., h * dh : (h + 1) * dh], att.rope.rotary_dim)
        kh = naive_rope(k[..., h * dh : (h + 1) * dh], att.rope.rotary_dim)
        scores = (qh @ kh.transpose(-1, -2)).masked_fill(~causal, float("-inf"))
        att_h = scores.softmax(-1) @ v_h
        for j in range(att.experts_per_head):
            weight = att.o[rows][io[..., j]]  # [B, T, dh, d]
            out += go.gather(-1, io[..., j : j + 1]) * torch.einsum("bte,bted->btd", att_h, weight)
    return out


def test_sigma_moe_matches_the_spec():
    model = make_model(dtype=torch.float64)
    moe = model.transformer.layers[0].ffn
    x = torch.randn(2, 5, TINY.d_model, dtype=torch.float64)
    select_in = torch.randn_like(x)
    out, logits = moe(x, select_in)
    torch.testing.assert_close(out, naive_sigma_moe(moe, x, select_in))
    torch.testing.assert_close(logits, select_in @ moe.expert_sel.T)


def test_switchhead_matches_the_spec():
    model = make_model(dtype=torch.float64)
    att = model.transformer.layers[0].attention
    q_src = torch.randn(2, 6, TINY.d_model, dtype=torch.float64)
    v_src = torch.randn_like(q_src)
    out, _, _ = att(q_src, q_src, v_src)
    torch.testing.assert_close(out, naive_switchhead(att, q_src, q_src, v_src))


def test_gated_switchhead_matches_the_spec():
    model = make_model(TINY_GATED, dtype=torch.float64)
    att = model.transformer.layers[0].attention
    x = torch.randn(1, 5, TINY.d_model, dtype=torch.float64)
    out, _, logits = att(x, x, x)
    assert logits == {}
    dh, heads = att.head_dim, att.n_heads
    q = naive_rope((x @ att.q.weight.T * dh**-0.25).view(1, 5, heads, dh).transpose(1, 2), 8)
    k = naive_rope((x @ att.k.weight.T * dh**-0.25).view(1, 5, heads, dh).transpose(1, 2), 8)
    v = (x @ att.v.T).view(1, 5, heads, dh).transpose(1, 2)
    scores = (q @ k.transpose(-1, -2)).masked_fill(~torch.ones(5, 5).tril().bool(), -math.inf)
    per_head = (scores.softmax(-1) @ v).transpose(1, 2)
    per_head = per_head * torch.sigmoid(x @ att.sel_o.T)[..., None]
    torch.testing.assert_close(out, per_head.flatten(-2) @ att.o.T)


def test_layer_uses_peri_layernorm():
    """Only selection/Q/K inputs are normalised: scaling the residual stream by c scales the
    values and expert inputs but leaves every routing decision unchanged."""
    model = make_model(dtype=torch.float64)
    layer = model.transformer.layers[0]
    for module in (layer.ln1, layer.ln2):
        module.eps = 0.0  # so that LN(3x) == LN(x) exactly
    x = torch.randn(1, 6, TINY.d_model, dtype=torch.float64)
    out1, _, _ = layer(x, None, None)
    out2, _, _ = layer(3 * x, None, None)
    # Attention values, σ-MoE inputs (ReLU is positively homogeneous) and the residual all scale.
    torch.testing.assert_close(out2, 3 * out1)


def test_rope_rotates_only_half_of_each_head():
    assert MoEUTConfig.from_profile("moeut-44m").rotary_dim == 40  # dh = 82
    rope = RotaryEmbedding(40, 10000.0)
    x = torch.randn(2, 7, 82, dtype=torch.float64)
    rotated = rope(x, offset=3)
    torch.testing.assert_close(rotated, naive_rope(x, 40, offset=3))
    torch.testing.assert_close(rotated[..., 40:], x[..., 40:])


# --- causality, masks, KV cache -----------------------------------------------------------


@pytest.mark.parametrize("config", [TINY, TINY_GATED], ids=["Ea>1", "Ea=1"])
def test_causality(config):
    model = make_model(config, dtype=torch.float64).eval()
    seq = tokens(2, 10)
    changed = seq.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % 64
    a, b = model(seq).logits, model(changed).logits
    torch.testing.assert_close(a[:, :6], b[:, :6])
    assert (a[:, 6:] - b[:, 6:]).abs().max() > 1e-3


def test_padding_mask_hides_padded_keys():
    model = make_model(dtype=torch.float64).eval()
    seq = tokens(1, 8)
    mask = torch.ones(1, 8, dtype=torch.bool)
    mask[0, 2] = False
    other = seq.clone()
    other[0, 2] = (other[0, 2] + 5) % 64
    a = model(seq, attention_mask=mask).logits
    b = model(other, attention_mask=mask).logits
    torch.testing.assert_close(a[:, 3:], b[:, 3:])  # later tokens never see the padded one
    full = model(seq).logits
    assert (a[:, 3:] - full[:, 3:]).abs().max() > 1e-6  # and the mask did hide something


@pytest.mark.parametrize("config", [TINY, TINY_GATED], ids=["Ea>1", "Ea=1"])
def test_incremental_decoding_equals_full_forward(config):
    model = make_model(config, dtype=torch.float64).eval()
    seq = tokens(2, 9)
    full = model(seq).logits
    out = model(seq[:, :4], use_cache=True)
    assert len(out.cache) == config.n_layers
    pieces = [out.logits]
    for t in range(4, 9):
        out = model(seq[:, t : t + 1], cache=out.cache)
        pieces.append(out.logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full)


@pytest.mark.parametrize("config", [TINY, TINY_GATED], ids=["Ea>1", "Ea=1"])
def test_left_padded_incremental_decoding_equals_unpadded_sequence(config):
    """A left-padded row decoded with the KV cache and a growing mask gives, at its real
    positions, the logits of the same tokens without padding (RoPE is relative)."""
    model = make_model(config, dtype=torch.float64).eval()
    seq, n_pad = tokens(1, 7), 3
    padded = torch.cat((torch.zeros(1, n_pad, dtype=torch.long), seq), dim=1)
    padded = torch.cat((padded, tokens(1, n_pad + 7, seed=2)))  # a second, unpadded row
    mask = torch.ones_like(padded, dtype=torch.bool)
    mask[0, :n_pad] = False
    out = model(padded[:, :5], attention_mask=mask[:, :5], use_cache=True)
    pieces = [out.logits]
    for t in range(5, padded.shape[1]):
        out = model(padded[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=out.cache)
        pieces.append(out.logits)
    decoded = torch.cat(pieces, dim=1)
    torch.testing.assert_close(decoded[:1, n_pad:], model(seq).logits)
    torch.testing.assert_close(decoded[1:], model(padded[1:]).logits)


# --- regulariser, dropout, initialisation --------------------------------------------------


def test_entropy_regulariser_minimum_is_uniform_selection():
    n_experts = 8
    uniform = torch.zeros(2, 5, n_experts)
    best = negative_mean_entropy([summed_selection_probs(uniform)] * 3, n_positions=5)
    torch.testing.assert_close(best, torch.tensor(-math.log(n_experts)))
    for seed in range(5):
        logits = torch.randn(2, 5, n_experts, generator=torch.Generator().manual_seed(seed))
        other = negative_mean_entropy([summed_selection_probs(logits)] * 3, n_positions=5)
        assert other > best
    # Per sequence, averaged over positions: each position preferring a different expert evens
    # out to the same minimum.
    one_hot = 50 * torch.eye(n_experts)[None]
    spread = negative_mean_entropy([summed_selection_probs(one_hot)], n_positions=n_experts)
    torch.testing.assert_close(spread, best, atol=1e-4, rtol=0)


def test_reg_loss_sums_coefficient_weighted_terms_and_is_zero_in_eval():
    model = make_model()
    seq = tokens(2, 6)
    reg = model(seq).reg_loss
    floor = TINY.group_size * (
        TINY.entropy_reg * -math.log(TINY.n_experts)
        + 2 * TINY.att_entropy_reg * -math.log(TINY.att_n_experts)
    )
    assert floor <= reg.item() < 0.5 * floor
    reg.backward()
    assert model.transformer.layers[0].ffn.expert_sel.grad.abs().sum() > 0
    assert model.transformer.layers[0].attention.sel_v.grad.abs().sum() > 0
    model.eval()
    assert model(seq).reg_loss.item() == 0.0


def test_reg_loss_equals_the_spec_recomputed_from_the_selection_logits():
    """γ·Σ_layers mean_b(−H) for σ-MoE and δ·Σ_layers mean_{b,h}(−H) for V and O, where H is the
    entropy of the selection distribution averaged over positions × repeats of one sequence."""
    model = make_model(dtype=torch.float64)
    # captured[layer][name]: that group layer's selection logits, one entry per repeat
    captured = [{"ffn": [], "att_v": [], "att_o": []} for _ in model.transformer.layers]
    for layer, logits in zip(model.transformer.layers, captured, strict=True):

        def keep_attention(_module, _inputs, out, c=logits) -> None:
            for name, value in out[2].items():
                c[name].append(value)

        layer.ffn.register_forward_hook(lambda _m, _i, out, c=logits: c["ffn"].append(out[1]))
        layer.attention.register_forward_hook(keep_attention)
    reg = model(tokens(3, 5)).reg_loss

    def neg_entropy(per_repeat: list[torch.Tensor]) -> torch.Tensor:
        # [R, B, T, ..., E] → per sequence (and head) mean of softmax over R·T
        probs = torch.stack(per_repeat).softmax(-1).transpose(0, 1).flatten(1, 2).mean(1)
        return (probs * probs.log()).sum(-1).mean()

    expected = 0.0
    for layer_logits in captured:
        for name, coefficient in (
            ("ffn", TINY.entropy_reg),
            ("att_v", TINY.att_entropy_reg),
            ("att_o", TINY.att_entropy_reg),
        ):
            assert len(layer_logits[name]) == TINY.n_repeats
            expected = expected + coefficient * neg_entropy(layer_logits[name])
    torch.testing.assert_close(reg, expected)


@pytest.mark.parametrize("autocast", [False, True])
def test_switchhead_selection_is_computed_in_fp32_in_a_bf16_model(autocast):
    attention = make_model(TINY, dtype=torch.bfloat16).transformer.layers[0].attention
    src = torch.randn(2, 5, TINY.d_model).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits, _, _ = attention._select(src, attention.sel_v)
    expected = F.linear(src.float(), attention.sel_v.float())
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits.flatten(-2), expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("field", "dropped", "untouched"),
    [("expert_dropout", "ffn", "attention"), ("att_expert_dropout", "attention", "ffn")],
)
def test_expert_dropout_only_in_training(field, dropped, untouched):
    config = TINY.replace(**{field: 0.5})
    model = make_model(config)
    layer = model.transformer.layers[0]
    assert getattr(layer, dropped).expert_dropout == 0.5
    assert getattr(layer, untouched).expert_dropout == 0.0  # the spec's expert dropout is σ-MoE's
    seq = tokens(2, 6)
    torch.manual_seed(0)
    a = model(seq).logits
    torch.manual_seed(1)
    b = model(seq).logits
    assert (a - b).abs().max() > 1e-4  # different experts were hidden
    model.eval()
    torch.testing.assert_close(model(seq).logits, make_model().eval()(seq).logits)


def test_initialisation_statistics():
    config = MoEUTConfig.from_profile(
        "tiny", d_model=256, n_experts=64, expert_size=64, n_layers=8, n_heads=4, head_dim=32
    )
    model = make_model(config)
    s, d = math.sqrt(2 / 8), 256
    layer = model.transformer.layers[0]
    att, ffn = layer.attention, layer.ffn

    def assert_std(tensor, expected):
        assert abs(tensor.std().item() / expected - 1) < 0.03, (tensor.std().item(), expected)

    assert_std(model.embedding.weight, 1 / math.sqrt(d))
    assert_std(ffn.keys, s / math.sqrt(d))
    assert_std(ffn.values, s / math.sqrt(64 * 64))
    assert_std(ffn.expert_sel, s / math.sqrt(d))
    torch.testing.assert_close(
        ffn.expert_sel.norm(dim=-1) / ffn.expert_sel.norm(dim=-1)[0], torch.ones(64)
    )  # equal-norm rows
    for weight in (att.q.weight, att.k.weight, att.v):
        assert_std(weight, s / math.sqrt(d))
    assert_std(att.o, s / math.sqrt(4 * 32))
    for selector in (att.sel_v, att.sel_o):
        assert_std(selector, s / math.sqrt(d))
        row_norms = selector.norm(dim=-1)
        # rows ∝ their pre-normalisation std: close to, but not exactly, equal norms
        assert (row_norms.std() / row_norms.mean()) < 0.1
    assert torch.all(layer.ln1.weight == 1) and torch.all(layer.ln1.bias == 0)


def test_float64_gradients():
    # Every expert selected (k = E, ka = Ea): top-k only permutes, so the function is smooth and
    # finite differences are valid; gates, selectors and experts are all still exercised.
    config = TINY.replace(
        d_model=16,
        n_heads=2,
        head_dim=8,
        n_experts=4,
        experts_per_token=4,
        expert_size=8,
        att_n_experts=3,
        att_experts_per_head=3,
        vocab_size=11,
    )
    model = make_model(config, dtype=torch.float64)
    seq = tokens(1, 4, vocab=11)
    checked = [
        "transformer.layers.1.ffn.keys",
        "transformer.layers.1.ffn.values",
        "transformer.layers.1.ffn.expert_sel",
        "transformer.layers.0.attention.v",
        "transformer.layers.0.attention.o",
        "transformer.layers.0.attention.sel_v",
        "transformer.layers.0.attention.sel_o",
        "transformer.layers.0.attention.q.weight",
        "embedding.weight",
    ]
    params = dict(model.named_parameters())

    def loss_of(*values):
        out = torch.func.functional_call(
            model, {**params, **dict(zip(checked, values, strict=True))}, (seq,)
        )
        return F.cross_entropy(out.logits[0, :-1], seq[0, 1:]) + out.reg_loss

    inputs = tuple(params[name].detach().clone().requires_grad_() for name in checked)
    assert torch.autograd.gradcheck(loss_of, inputs, eps=1e-6, atol=1e-7, fast_mode=True)


def patterned_tokens(
    n_sequences: int,
    length: int,
    successor: torch.Tensor,
    generator: torch.Generator,
    noise: float = 0.1,
) -> torch.Tensor:
    """[n_sequences, length] tokens where each token is `successor[previous token]`, except
    that with probability `noise` a uniformly random token is drawn instead."""
    vocab_size = successor.numel()
    tokens = torch.empty(n_sequences, length, dtype=torch.long)
    tokens[:, 0] = torch.randint(vocab_size, (n_sequences,), generator=generator)
    for t in range(1, length):
        random = torch.randint(vocab_size, (n_sequences,), generator=generator)
        keep = torch.rand(n_sequences, generator=generator) >= noise
        tokens[:, t] = torch.where(keep, successor[tokens[:, t - 1]], random)
    return tokens


def train_on_patterns(
    config: MoEUTConfig,
    steps: int,
    batch_size: int,
    seq_len: int,
    lr: float,
    seed: int,
) -> list[float]:
    """Train `MoEUTLM(config)` on fresh patterned batches; returns the LM loss of every step."""
    torch.manual_seed(seed)
    data_generator = torch.Generator().manual_seed(seed)
    successor = torch.randperm(config.vocab_size, generator=data_generator)
    model = MoEUTLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    losses = []
    for _step in range(1, steps + 1):
        batch = patterned_tokens(batch_size, seq_len + 1, successor, data_generator)
        out = model(batch[:, :-1])
        loss = lm_loss(out.logits, batch[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        (loss + out.reg_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_tiny_profile_learns_a_pattern():
    config = MoEUTConfig.from_profile("tiny", vocab_size=64)
    losses = train_on_patterns(config, steps=150, batch_size=16, seq_len=32, lr=1e-2, seed=0)
    unigram_entropy = math.log(64)
    # 10% noise: the best achievable loss is about 0.1·ln 64 + H(0.9) ≈ 0.74 nats.
    assert sum(losses[-10:]) / 10 < 0.4 * unigram_entropy
