"""Sampling, model directories and the authors' checkpoint format."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch._dynamo.utils import counters

from moeut_dist import MoEUTConfig, MoEUTLM
from moeut_dist.arch.moeut import to_official_state_dict
from moeut_dist.checksums import record_checksums
from moeut_dist.cli import main as moeut
from moeut_dist.convert import from_official_state_dict
from moeut_dist.export import (
    CheckpointMismatchError,
    load_pretrained,
    save_pretrained,
    write_safetensors_streaming,
)
from moeut_dist.generate import SamplingConfig, filter_logits, generate

TINY = MoEUTConfig.from_profile("tiny", vocab_size=50)


@pytest.fixture(scope="module")
def model() -> MoEUTLM:
    torch.manual_seed(0)
    return MoEUTLM(TINY).eval()


def prompt() -> torch.Tensor:
    return torch.randint(50, (2, 5), generator=torch.Generator().manual_seed(3))


def test_greedy_generation_equals_repeated_full_forward(model):
    produced = torch.stack(list(generate(model, prompt(), SamplingConfig(6, temperature=0))), 1)
    sequence = prompt()
    for _ in range(6):
        next_token = model(sequence).logits[:, -1].argmax(-1)
        sequence = torch.cat((sequence, next_token[:, None]), 1)
    torch.testing.assert_close(produced, sequence[:, 5:])


def test_sampling_is_reproducible_under_a_seed(model):
    def sample(seed):
        settings = SamplingConfig(8, temperature=1.0, top_k=10, top_p=0.9, seed=seed)
        return torch.stack(list(generate(model, prompt(), settings)), 1)

    torch.testing.assert_close(sample(7), sample(7))
    assert not torch.equal(sample(7), sample(8))


@pytest.mark.parametrize("temperature", [1e-45, 1e-300])
def test_a_tiny_temperature_samples_like_greedy(model, temperature):
    greedy = list(generate(model, prompt(), SamplingConfig(6, temperature=0)))
    tiny = list(generate(model, prompt(), SamplingConfig(6, temperature=temperature, seed=0)))
    torch.testing.assert_close(torch.stack(tiny), torch.stack(greedy))


def test_generation_produces_no_id_past_the_tokenizer_vocabulary():
    """A vocabulary padded past the tokenizer's 40 pieces, with the padding ids made the likeliest:
    they are still never produced."""
    torch.manual_seed(0)
    padded = MoEUTLM(TINY).eval()
    with torch.no_grad():
        padded.lm_head.bias[40:] = 20.0
    for settings in (SamplingConfig(8, temperature=0), SamplingConfig(8, temperature=2, seed=1)):
        tokens = torch.stack(list(generate(padded, prompt(), settings, vocab_size=40)))
        assert tokens.max() < 40


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"temperature": float("nan")}, "temperature must be finite and >= 0"),
        ({"temperature": float("inf")}, "temperature must be finite and >= 0"),
        ({"max_new_tokens": -5}, "max_new_tokens must be >= 0"),
        ({"seed": 2**64}, r"seed must be in 0\.\.2\*\*64 - 1"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ],
)
def test_impossible_sampling_settings_are_refused_naming_the_setting(settings, message):
    with pytest.raises(ValueError, match=message):
        SamplingConfig(**settings)


def test_generation_stops_at_the_stop_token(model):
    first = next(generate(model, prompt()[:1], SamplingConfig(5, temperature=0)))
    steps = list(generate(model, prompt()[:1], SamplingConfig(5, temperature=0), first.item()))
    assert len(steps) == 1


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda filtered: torch.isfinite(filtered)[0].tolist()
    assert kept(filter_logits(logits, top_k=2, top_p=1.0)) == [True, True, False, False]
    assert kept(filter_logits(logits, top_k=0, top_p=0.7)) == [True, True, False, False]
    assert kept(filter_logits(logits, top_k=0, top_p=0.5)) == [True, False, False, False]
    assert kept(filter_logits(logits, top_k=0, top_p=0.81)) == [True, True, True, False]


def test_model_directory_round_trip(model, tmp_path):
    save_pretrained(model, tmp_path)
    loaded = load_pretrained(tmp_path)
    assert loaded.config == model.config
    torch.testing.assert_close(loaded(prompt()).logits, model(prompt()).logits, rtol=0, atol=0)


def test_a_model_trained_compiled_loads_eager(tmp_path):
    """Compiling is the loading program's choice: compiled, sampling would recompile the layers
    as the KV cache grows."""
    torch.manual_seed(0)
    save_pretrained(MoEUTLM(dataclasses.replace(TINY, compile=True)), tmp_path)
    loaded = load_pretrained(tmp_path)
    counters.clear()
    list(generate(loaded, prompt(), SamplingConfig(3, temperature=0)))
    assert counters["frames"]["total"] == 0  # no frame was handed to dynamo


def test_model_directory_mismatch_names_the_tensor(model, tmp_path):
    save_pretrained(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "expert_size": 16}))
    record_checksums(tmp_path)  # as if it had been written so: the loader names the mismatch
    with pytest.raises(CheckpointMismatchError, match=r"transformer\.layers\.0\.ffn\.keys"):
        load_pretrained(tmp_path)


def test_official_round_trip_gives_identical_outputs(model):
    official = to_official_state_dict(model)
    assert "transformer.layers.1.attention.sel_v" in official
    assert official["transformer.layers.0.ffn.keys"].shape == (16, 64, 32)
    restored = from_official_state_dict(official, TINY).eval()
    torch.testing.assert_close(restored(prompt()).logits, model(prompt()).logits, rtol=0, atol=0)


def test_official_gated_variant_keys_are_linear_weights():
    config = TINY.replace(att_n_experts=1)
    official = to_official_state_dict(MoEUTLM(config))
    attention = "transformer.layers.0.attention"
    assert official[f"{attention}.v"].shape == (2 * 16, 64)
    assert official[f"{attention}.o"].shape == (64, 2 * 16)
    assert f"{attention}.sel_v" not in official


def test_official_import_rejects_a_wrong_profile_by_tensor(model):
    official = to_official_state_dict(model)
    with pytest.raises(CheckpointMismatchError, match=r"ffn\.keys"):
        from_official_state_dict(official, TINY.replace(n_experts=12, experts_per_token=4))


def _convert(checkpoint, profile: str, out) -> int:
    return moeut(["convert", "--from-official", str(checkpoint), "--profile", profile,
                  "--out", str(out)])  # fmt: skip


def test_convert_command(model, tmp_path):
    checkpoint = tmp_path / "official.pt"
    # The authors' trainer wraps the weights and stores RoPE frequencies; both are handled.
    wrapped = {f"model.{n}": t for n, t in to_official_state_dict(model).items()}
    wrapped["model.transformer.layers.0.attention.pe.inv_freq"] = torch.ones(4)
    torch.save({"model": wrapped, "step": 10}, checkpoint)
    assert _convert(checkpoint, "tiny", tmp_path / "out") == 0
    loaded = load_pretrained(tmp_path / "out")
    assert loaded.config.vocab_size == 50
    torch.testing.assert_close(loaded(prompt()).logits, model(prompt()).logits, rtol=0, atol=0)


class _RunsCode:
    def __reduce__(self):
        return (print, ("unpickled",))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda path: path.write_bytes(b"not a checkpoint"), "not a readable PyTorch checkpoint"),
        (lambda path: torch.save({"x": _RunsCode()}, path), "UnpicklingError"),
        (lambda path: torch.save(torch.ones(2), path), "holds a Tensor, not a state dict"),
        (lambda path: torch.save({"w": torch.ones(2)}, path), "no 'embedding.weight'"),
        (lambda path: None, "No such file"),
    ],
)
def test_convert_command_names_an_unusable_checkpoint(tmp_path, capsys, make, message):
    checkpoint = tmp_path / "official.pt"
    make(checkpoint)
    assert _convert(checkpoint, "tiny", tmp_path / "out") == 2
    error = capsys.readouterr().err
    assert error.startswith(f"moeut convert: {checkpoint}") and message in error
    assert not (tmp_path / "out").exists()


def test_convert_command_names_the_tensor_a_wrong_profile_misses(model, tmp_path, capsys):
    checkpoint = tmp_path / "official.pt"
    torch.save(to_official_state_dict(model), checkpoint)
    assert _convert(checkpoint, "moeut-44m", tmp_path / "out") == 2
    assert "moeut convert: tensor 'embedding.weight' is (50, 64)" in capsys.readouterr().err


def test_model_directory_without_a_tensor_is_refused_naming_it(model, tmp_path):
    out = save_pretrained(model, tmp_path / "model")
    weights = load_file(out / "model.safetensors")
    del weights["embedding.weight"]
    save_file(weights, out / "model.safetensors")
    record_checksums(out)
    with pytest.raises(CheckpointMismatchError, match=r"missing tensor 'embedding\.weight'"):
        load_pretrained(out)


def test_a_streamed_weights_file_gets_exactly_the_tensors_of_its_header(tmp_path):
    specs = {"a": ((2,), torch.float32), "b": ((3,), torch.float32)}
    a, b = ("a", torch.zeros(2)), ("b", torch.zeros(3))
    with pytest.raises(CheckpointMismatchError, match="the tensors ended before 'b'"):
        write_safetensors_streaming(tmp_path / "short", specs, [a])
    with pytest.raises(CheckpointMismatchError, match="tensor 'c' is not in the header"):
        write_safetensors_streaming(tmp_path / "long", specs, [a, b, ("c", torch.zeros(1))])


def stand_in_tokenizer(directory: Path) -> Path:
    """A file for `save_pretrained` to store as the tokenizer (it copies it without reading it)."""
    path = directory / "stand_in.model"
    path.write_bytes(b"a tokenizer")
    return path


def test_a_model_directory_is_replaced_whole(model, tmp_path):
    out = save_pretrained(model, tmp_path / "model", stand_in_tokenizer(tmp_path))
    (out / "official_model.pt").write_bytes(b"an earlier export's")
    save_pretrained(model, out)
    assert sorted(path.name for path in out.iterdir()) == [
        "checksums.json", "config.json", "model.safetensors",
    ]  # fmt: skip


def test_a_failed_write_leaves_the_previous_model_directory(model, tmp_path):
    out = save_pretrained(model, tmp_path / "model")
    weights = (out / "model.safetensors").read_bytes()
    out.rename(tmp_path / ".model.old")  # where a crash between replacing's two renames leaves it
    with pytest.raises(FileNotFoundError):
        save_pretrained(MoEUTLM(TINY), out, tokenizer_path=tmp_path / "absent.model")
    assert (out / "model.safetensors").read_bytes() == weights
    assert [path.name for path in tmp_path.iterdir()] == ["model"]


def test_convert_replaces_a_model_directory_and_refuses_any_other(model, tmp_path, capsys):
    checkpoint = tmp_path / "official.pt"
    torch.save(to_official_state_dict(model), checkpoint)
    out = save_pretrained(model, tmp_path / "model", stand_in_tokenizer(tmp_path))
    assert _convert(checkpoint, "tiny", out) == 0
    assert not (out / "tokenizer.model").exists()  # converted without --tokenizer

    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    assert _convert(checkpoint, "tiny", folder) == 2
    assert "holds files that are not a model directory's (notes.txt)" in capsys.readouterr().err
    assert [path.name for path in folder.iterdir()] == ["notes.txt"]

    (out / "eval.json").write_text("the user's report")  # a model directory with more in it
    assert _convert(checkpoint, "tiny", out) == 2
    assert "(eval.json)" in capsys.readouterr().err
    assert (out / "eval.json").read_text() == "the user's report"
