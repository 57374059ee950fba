"""Perplexity and bits per byte on shards, `moeut generate`, `moeut eval` and `moeut export` end
to end, on a tiny random MoEUT with a SentencePiece tokenizer trained on synthetic text."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save_file

from data_prep.shards import build_shards
from data_prep.synthetic import synthetic_documents, write_jsonl
from data_prep.tokenizer import train_tokenizer
from moeut_dist import MoEUTConfig, MoEUTLM
from moeut_dist.checksums import record_checksums
from moeut_dist.cli import main as moeut
from moeut_dist.data import read_manifest, read_shard
from moeut_dist.eval_cli import stream_text
from moeut_dist.evaluate import (
    LanguageModelingResult,
    evaluate_shards,
    load_model_and_tokenizer,
    target_bytes,
)
from moeut_dist.export import save_pretrained
from moeut_dist.generate import SamplingConfig, generate
from moeut_dist.parallel.shards import shard_file, shard_metadata
from moeut_dist.zeroshot import (
    TASKS,
    builtin_sample,
    evaluate_task,
    model_logits,
    read_task_file,
    score_continuations,
)
from tests.shard_server import serving

SEQ_LEN = 32


@pytest.fixture(scope="module")
def documents():
    return synthetic_documents(100, seed=0, words_per_document=(20, 120))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, documents):
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "corpus.jsonl", documents)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, corpus):
    return train_tokenizer([corpus], tmp_path_factory.mktemp("tok") / "tok.model", vocab_size=600)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, corpus, tokenizer):
    out = tmp_path_factory.mktemp("shards")
    build_shards(
        [corpus],
        out,
        tokenizer.path,
        SEQ_LEN,
        shard_bytes=16 << 10,
        val_fraction=0.2,
        progress=False,
    )
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    torch.manual_seed(0)
    # The PyTorch expert path: the tests set TRITON_INTERPRET, under which "auto" would run the
    # Triton kernels in the (slow) interpreter, and the kernels are not what is tested here.
    config = MoEUTConfig.from_profile("tiny", vocab_size=tokenizer.vocab_size, kernel="torch")
    model = MoEUTLM(config)
    return save_pretrained(model, tmp_path_factory.mktemp("model"), tokenizer.path)


@pytest.fixture(scope="module")
def padded_model_dir(tmp_path_factory, tokenizer):
    """A model whose vocabulary is padded 20 ids past the tokenizer's (as for tensor
    parallelism), the padding ids made the likeliest next tokens."""
    torch.manual_seed(0)
    config = MoEUTConfig.from_profile("tiny", vocab_size=tokenizer.vocab_size + 20, kernel="torch")
    model = MoEUTLM(config)
    with torch.no_grad():
        model.lm_head.bias[tokenizer.vocab_size :] = 20.0
    return save_pretrained(model, tmp_path_factory.mktemp("padded"), tokenizer.path)


@pytest.fixture(scope="module")
def loaded(model_dir):
    return load_model_and_tokenizer(model_dir)


@pytest.fixture(scope="module")
def val_result(loaded, shards):
    return evaluate_shards(*loaded, shards, batch_size=5)


def val_samples(shard_dir) -> torch.Tensor:
    """Every stored validation sample, read directly in manifest order."""
    manifest = read_manifest(shard_dir)
    rows = [
        read_shard(
            shard_dir / shard.name,
            shard.samples,
            manifest.sample_len,
            np.dtype(manifest.dtype),
            vocab_size=manifest.vocab_size,
            sha256=shard.sha256,
        )
        for shard in manifest.split("val").shards
    ]
    return torch.from_numpy(np.concatenate(rows).astype(np.int64))


def test_perplexity_is_exp_of_the_mean_nll_of_a_direct_forward(loaded, shards, val_result):
    model, _ = loaded
    samples = val_samples(shards)
    assert len(read_manifest(shards).split("val").shards) > 1
    with torch.no_grad():
        logits = model(samples[:, :-1]).logits
    mean_nll = F.cross_entropy(logits.flatten(0, 1), samples[:, 1:].flatten())
    assert val_result.tokens == samples.shape[0] * SEQ_LEN
    assert val_result.perplexity == pytest.approx(math.exp(mean_nll.item()), rel=1e-5)


def test_bits_per_byte_counts_the_bytes_the_targets_decode_to(loaded, shards, val_result):
    tokenizer = loaded[1]
    samples = val_samples(shards).tolist()
    assert val_result.bytes == sum(target_bytes(sample, tokenizer) for sample in samples)
    bits_per_byte = val_result.nll / math.log(2) / val_result.bytes
    assert val_result.bits_per_byte == pytest.approx(bits_per_byte)
    assert 2 < val_result.bytes / val_result.tokens < 8  # a few characters per token


def test_target_bytes_follow_sentencepiece_spaces_and_document_starts(tokenizer, documents):
    first, second = documents[0], documents[1]
    ids = tokenizer.encode(first)
    assert tokenizer.decode(ids) == first  # so the byte counts below are exact
    utf8 = lambda text: len(text.encode("utf-8"))
    # A document start: its first piece's space is SentencePiece's dummy prefix, not text.
    assert target_bytes([tokenizer.eod_id, *ids], tokenizer) == utf8(first)
    # A sample starting inside a document: the targets' text is what follows its first token.
    for cut in (0, 1, 7, len(ids) - 2):
        expected = utf8(first) - utf8(tokenizer.decode(ids[: cut + 1]))
        assert target_bytes(ids[cut:], tokenizer) == expected
    # The end-of-document id stands for no text and starts the next document afresh.
    joined = [*ids[5:], tokenizer.eod_id, *tokenizer.encode(second)]
    assert target_bytes(joined, tokenizer) == target_bytes(ids[5:], tokenizer) + utf8(second)


def generated(model_dir, capsys, *options: str) -> str:
    args = ["generate", str(model_dir), "--prompt", "Ba", "--max-tokens", "24", "--device", "cpu"]
    assert moeut([*args, *options]) == 0
    return capsys.readouterr().out


def test_generation_is_determined_by_the_seed(model_dir, capsys):
    first = generated(model_dir, capsys, "--seed", "3", "--top-k", "50", "--top-p", "0.95")
    again = generated(model_dir, capsys, "--seed", "3", "--top-k", "50", "--top-p", "0.95")
    other = generated(model_dir, capsys, "--seed", "4", "--top-k", "50", "--top-p", "0.95")
    assert first.startswith("Ba") and len(first) > len("Ba\n")
    assert first == again
    assert first != other


def test_generation_streams_the_decoded_continuation(model_dir, loaded, capsys):
    model, tokenizer = loaded
    prompt_ids = [tokenizer.eod_id, *tokenizer.encode("Ba")]
    steps = generate(model, torch.tensor([prompt_ids]), SamplingConfig(24, temperature=0))
    tokens = [step.item() for step in steps]
    if tokenizer.eod_id in tokens:
        tokens = tokens[: tokens.index(tokenizer.eod_id)]
    continuation = tokenizer.decode(prompt_ids + tokens)[len(tokenizer.decode(prompt_ids)) :]
    assert generated(model_dir, capsys, "--temperature", "0") == f"Ba{continuation}\n"
    pieces = list(stream_text(tokenizer, prompt_ids, tokens))
    assert "".join(pieces) == continuation and len(pieces) > 1


def test_streamed_text_ends_with_the_bytes_that_never_formed_a_character(tokenizer):
    prompt_ids = [tokenizer.eod_id, *tokenizer.encode("Ba")]
    cat = tokenizer.encode("猫")[-3:]  # three byte pieces (byte fallback): one character
    assert "".join(stream_text(tokenizer, prompt_ids, cat)).endswith("猫")
    cut = "".join(stream_text(tokenizer, prompt_ids, cat[:2]))
    whole = tokenizer.decode(prompt_ids + cat[:2])
    assert cut == whole[len(tokenizer.decode(prompt_ids)) :] and cut.endswith("\ufffd")


def test_generation_with_a_padded_vocabulary_produces_only_the_tokenizer_pieces(
    padded_model_dir, capsys
):
    assert generated(padded_model_dir, capsys, "--temperature", "0").startswith("Ba")


def test_eval_scores_a_padded_vocabulary_over_every_id_of_the_model(
    padded_model_dir, shards, capsys
):
    """The padding ids never occur in text; they only take probability mass, as in training."""
    args = [str(padded_model_dir), "--shards", str(shards), "--builtin-tasks", "--device", "cpu"]
    assert moeut(["eval", *args]) == 0
    assert "perplexity" in capsys.readouterr().out


def test_the_perplexity_of_a_diverged_model_is_infinite():
    assert LanguageModelingResult(nll=1e6, tokens=10, bytes=40).perplexity == math.inf


def test_scores_of_the_model_do_not_depend_on_batching(loaded):
    model, tokenizer = loaded
    requests = [
        ([tokenizer.eod_id, *tokenizer.encode(context)], tokenizer.encode(continuation))
        for context, continuation in [("Ba ke", "to la"), ("", "Sou"), ("Mi ra po", "ze")]
    ]
    alone = score_continuations(model_logits(model), requests, batch_size=1)
    batched = score_continuations(model_logits(model), requests, batch_size=3)
    for one, other in zip(alone, batched, strict=True):
        assert one.logprob == pytest.approx(other.logprob, abs=1e-4)
        assert (one.tokens, one.greedy) == (other.tokens, other.greedy)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_zero_shot_scoring_of_the_builtin_samples(loaded, task):
    model, tokenizer = loaded
    items = read_task_file(task, builtin_sample(task))
    result = evaluate_task(TASKS[task], items, model_logits(model), tokenizer, batch_size=4)
    assert result.task == task and result.items == len(items)
    expected = {"acc", "ppl"} if TASKS[task].scoring == "cloze" else {"acc", "acc_norm"}
    assert set(result.metrics) == expected
    assert 0 <= result.metrics["acc"] <= 1 and result.metrics["acc"] * len(items) % 1 == 0


def test_eval_command_reports_language_modeling_and_every_builtin_task(
    model_dir, shards, val_result, tmp_path, capsys
):
    report_path = tmp_path / "report.json"
    args = [str(model_dir), "--shards", str(shards), "--builtin-tasks", "--json", str(report_path)]
    assert moeut(["eval", *args, "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "perplexity" in printed and "bits per byte" in printed
    report = json.loads(report_path.read_text())
    assert set(report) == {"language_modeling", "tasks"}
    language_modeling = report["language_modeling"]  # batched by 8, not 5: the same totals
    assert language_modeling["perplexity"] == pytest.approx(val_result.perplexity)
    assert language_modeling["bits_per_byte"] == pytest.approx(val_result.bits_per_byte)
    assert [entry["task"] for entry in report["tasks"]] == list(TASKS)
    for entry in report["tasks"]:
        assert entry["items"] == len(read_task_file(entry["task"], builtin_sample(entry["task"])))
        assert 0 <= entry["acc"] <= 1


def test_eval_reads_shards_over_http_as_from_the_local_directory(
    model_dir, shards, val_result, tmp_path
):
    report_path = tmp_path / "report.json"
    with serving(shards) as (url, server):
        args = [str(model_dir), "--shards", url, "--batch-size", "5", "--json", str(report_path)]
        assert moeut(["eval", *args, "--device", "cpu"]) == 0
        served = set(server.requested)
    report = json.loads(report_path.read_text())["language_modeling"]
    local = val_result  # the same batches of 5, read from the directory
    assert (report["tokens"], report["bytes"]) == (local.tokens, local.bytes)
    assert report["perplexity"] == local.perplexity
    assert report["bits_per_byte"] == local.bits_per_byte
    assert {"manifest.json", *(s.name for s in read_manifest(shards).split("val").shards)} <= served


def refused(capsys, command: str, *args: str) -> str:
    """The error of a `moeut` command (on the CPU) that refuses its input: one line, status 2."""
    capsys.readouterr()  # what came before the command
    assert moeut([command, "--device", "cpu", *args]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"moeut {command}: ") and error.count("\n") == 1, error
    return error


def test_eval_names_a_missing_model_directory(tmp_path, capsys):
    assert "not found" in refused(capsys, "eval", str(tmp_path / "absent"), "--builtin-tasks")


def test_eval_refuses_shards_of_another_tokenizer(model_dir, corpus, shards, tmp_path, capsys):
    other = train_tokenizer([corpus], tmp_path / "other.model", vocab_size=380)
    other_dir = tmp_path / "model"
    shutil.copytree(model_dir, other_dir)
    shutil.copyfile(other.path, other_dir / "tokenizer.model")
    record_checksums(other_dir)  # a model directory of that tokenizer, not a damaged one
    error = refused(capsys, "eval", str(other_dir), "--shards", str(shards))
    assert f"tokenizer has sha256 {other.sha256}" in error


def test_eval_names_the_malformed_line_of_a_task_file(model_dir, tmp_path, capsys):
    path = tmp_path / "piqa.jsonl"
    path.write_text(builtin_sample("piqa").read_text() + '{"goal": "no solutions"}\n')
    error = refused(capsys, "eval", str(model_dir), "--task", f"piqa={path}")
    assert f"{path}:5: piqa: missing field 'sol1'" in error


def test_eval_names_the_line_of_a_candidate_without_tokens(model_dir, tmp_path, capsys):
    path = tmp_path / "blimp.jsonl"
    lines = [
        '{"sentence_good": "Ba ke", "sentence_bad": "ke Ba"}',
        "",
        '{"sentence_good": "\u200b", "sentence_bad": "Ba"}',
    ]
    path.write_text("\n".join(lines) + "\n")
    error = refused(capsys, "eval", str(model_dir), "--task", f"blimp={path}")
    assert f"{path}:3: blimp: the candidate '\\u200b' encodes to no tokens" in error


def _add_config_key(config_path) -> None:
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "bogus": 1}))


def _truncate(path) -> None:
    path.write_bytes(path.read_bytes()[:5000])


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "config.json").write_text("{"), "config.json is not valid JSON"),
        (lambda d: _add_config_key(d / "config.json"), "config.json: unknown key(s) ['bogus']"),
        (lambda d: _truncate(d / "model.safetensors"), "model.safetensors is damaged"),
        (lambda d: (d / "tokenizer.model").write_text("{}"), "is not a SentencePiece model"),
    ],
)
def test_a_damaged_model_directory_is_named(model_dir, tmp_path, capsys, damage, message):
    damaged = shutil.copytree(model_dir, tmp_path / "model")
    damage(damaged)
    assert " is corrupt: its sha256 is " in refused(capsys, "generate", str(damaged))
    record_checksums(damaged)  # as if it had been written so: the readers name the damage
    assert message in refused(capsys, "generate", str(damaged))


def _without_validation_samples(manifest_text: str) -> str:
    manifest = json.loads(manifest_text)
    manifest["splits"]["val"]["shards"] = []
    return json.dumps(manifest)


@pytest.mark.parametrize(
    ("edit", "options", "message"),
    [
        (lambda text: "{", [], "manifest.json is damaged"),
        (lambda text: text, ["--split", "test"], "has no split 'test'"),
        (_without_validation_samples, [], "holds no samples to evaluate"),
    ],
)
def test_unusable_shards_are_named(model_dir, shards, tmp_path, capsys, edit, options, message):
    """Only the manifest is copied: each of these is refused before any shard is read."""
    (tmp_path / "manifest.json").write_text(edit((shards / "manifest.json").read_text()))
    error = refused(capsys, "eval", str(model_dir), "--shards", str(tmp_path), *options)
    assert message in error


@pytest.mark.parametrize(
    ("command", "options", "message"),
    [
        ("eval", ["--builtin-tasks", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        ("generate", ["--temperature", "nan"], "temperature must be finite and >= 0"),
        ("generate", ["--temperature", "inf"], "temperature must be finite and >= 0"),
        ("generate", ["--max-tokens", "-5"], "max_new_tokens must be >= 0, got -5"),
        ("generate", ["--seed", "99999999999999999999999"], "seed must be in 0..2**64 - 1"),
        ("generate", ["--device", "cuda:99"], "device 'cuda:99' is not available"),
        ("generate", ["--device", "tpu"], "unknown device 'tpu'"),
    ],
)
def test_impossible_settings_are_refused_before_the_model_loads(
    model_dir, capsys, command, options, message
):
    assert message in refused(capsys, command, str(model_dir), *options)


def one_process_checkpoint(model_dir, tokenizer_path, directory):
    """The parts of a one-process training checkpoint that `moeut export` reads, holding the
    weights of `model_dir`."""
    weights = directory / "engine"
    weights.mkdir(parents=True)
    tensors = load_file(model_dir / "model.safetensors")
    save_file(tensors, shard_file(weights, 0, 0), metadata=shard_metadata(1, 1))
    run = {
        "model": {"profile": "tiny", "kernel": "torch"},
        "data": {"shard_dir": str(directory), "tokenizer": str(tokenizer_path)},
    }
    (directory / "config.yaml").write_text(yaml.safe_dump(run))
    shutil.copyfile(tokenizer_path, directory / "tokenizer.model")
    (directory / "done_rank00000").write_text("1")
    record_checksums(directory)
    return directory


def test_export_replaces_the_whole_model_directory(model_dir, tokenizer, tmp_path):
    checkpoint = one_process_checkpoint(model_dir, tokenizer.path, tmp_path / "checkpoint")
    out = tmp_path / "exported"
    assert moeut(["export", str(checkpoint), str(out), "--official"]) == 0
    official = torch.load(out / "official_model.pt", weights_only=True)
    assert official.keys() == load_file(model_dir / "model.safetensors").keys()
    assert moeut(["export", str(checkpoint), str(out)]) == 0
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoint", "exported"]
    assert sorted(path.name for path in out.iterdir()) == [
        "checksums.json",
        "config.json",
        "model.safetensors",
        "tokenizer.model",
    ]
