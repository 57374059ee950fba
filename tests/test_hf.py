"""Hugging Face transformers directories (export, load without moeut-dist, back again), the
tokenizer in them, and lm-evaluation-harness, on a tiny model trained for two steps."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from data_prep.synthetic import synthetic_documents, write_jsonl
from data_prep.tokenizer import train_tokenizer
from moeut_dist import profiles
from moeut_dist.cli import main as moeut
from moeut_dist.data import Tokenizer
from moeut_dist.evaluate import load_model_and_tokenizer
from moeut_dist.export import TOKENIZER_FILE, WEIGHTS_FILE, load_pretrained
from moeut_dist.generate import SamplingConfig, generate
from moeut_dist.hf.export import INDEX_FILE, export_hf
from moeut_dist.model import lm_loss
from moeut_dist.train import loop
from moeut_dist.train.config import load_config
from moeut_dist.zeroshot import (
    builtin_sample,
    evaluate_task,
    get_task,
    model_logits,
    read_task_file,
)
from moeut_dist.zeroshot.scorer import score_continuations
from tests.train_helpers import make_corpus, run_config, write_config

ISOLATED_SCRIPT = Path(__file__).with_name("hf_isolated.py")
EDGE_STRINGS = [
    "Digits 1234567890 and 3.14159, 2026-12-01.",
    "  leading,   inner   and trailing   spaces  ",
    "tabs\tand\nnew\n\nlines",
    "héllo wörld, naïve café 😀 漢字 ∑ ①",
    "ＦＵＬＬ width and\u00a0no-break space",
    "a literal </s> and <unk> in text",
    "",
    " ",
    "x",
]
PROMPT = "Tuci bu pu"
BATCH_PROMPTS = ["Tuci bu pu cibeari neatou da", "Poumugu", "da be bu"]
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished two-step run of the tiny model, checkpoint at step 2."""
    directory = tmp_path_factory.mktemp("hf_run")
    corpus = make_corpus(directory)
    config = run_config(
        corpus, directory / "run", schedule={"steps": 2, "warmup_steps": 1}, eval={"every": 0}
    )
    loop.train(load_config(write_config(config, directory / "run.yaml")))
    return directory / "run"


@pytest.fixture(scope="module")
def model_dir(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("ours") / "model"
    assert moeut(["export", str(run), str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def hf_dir(run, tmp_path_factory):
    """`moeut export RUN OUT --hf`: straight from the checkpoint."""
    out = tmp_path_factory.mktemp("hf") / "model"
    assert moeut(["export", str(run), str(out), "--hf"]) == 0
    return out


@pytest.fixture(scope="module")
def sharded_hf_dir(model_dir, tmp_path_factory):
    """The model directory exported with a shard limit below the model's size."""
    return export_hf(model_dir, tmp_path_factory.mktemp("sharded") / "model", 100_000)


@pytest.fixture(scope="module")
def documents():
    return synthetic_documents(40, seed=1, words_per_document=(20, 80))


@pytest.fixture(scope="module")
def isolated(sharded_hf_dir, model_dir, documents, tmp_path_factory):
    """What `tests/hf_isolated.py` computes from the export where only torch and transformers
    can be imported."""
    directory = tmp_path_factory.mktemp("isolated")
    tokenizer = Tokenizer(model_dir / TOKENIZER_FILE)
    request = {
        "texts": EDGE_STRINGS + documents[:10],
        "tokens": [[tokenizer.eod_id, *tokenizer.encode(d)[:40]] for d in documents[:2]],
        "prompt": PROMPT,
        "max_new_tokens": NEW_TOKENS,
        "batch_prompts": BATCH_PROMPTS,
    }
    (directory / "request.json").write_text(json.dumps(request))
    env = {
        "PATH": os.environ["PATH"],
        "OMP_NUM_THREADS": "1",  # the test waits for it: no thread competes for the cores
        "HOME": str(directory),
        "HF_HOME": str(directory / "hf_home"),
        "HF_HUB_OFFLINE": "1",
    }
    command = [sys.executable, "-I", str(ISOLATED_SCRIPT), str(sharded_hf_dir)]
    command += [str(directory / "request.json"), str(directory / "out.pt")]
    subprocess.run(
        command, env=env, cwd=directory, stdin=subprocess.DEVNULL, check=True, timeout=300
    )
    return request, torch.load(directory / "out.pt", weights_only=True)


def test_the_export_has_transformers_layout(hf_dir, sharded_hf_dir, model_dir):
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["model_type"] == "moeut"
    assert config["architectures"] == ["MoEUTForCausalLM"]
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModelForCausalLM"}
    assert config["torch_dtype"] == "float32"
    assert (hf_dir / "generation_config.json").is_file()
    assert (hf_dir / WEIGHTS_FILE).is_file() and not (hf_dir / INDEX_FILE).exists()
    index = json.loads((sharded_hf_dir / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (sharded_hf_dir / WEIGHTS_FILE).exists()
    ours = load_file(model_dir / WEIGHTS_FILE)
    assert set(index["weight_map"]) == {f"model.{name}" for name in ours}
    # The model code is this checkout's, imports rewritten: no module is kept by hand.
    source = (hf_dir / "moeut_model_moe.py").read_text()
    assert "from .moeut_kernels import" in source
    assert "from moeut_dist" not in source and "import moeut_dist" not in source


def test_the_export_loads_with_torch_and_transformers_alone(isolated, model_dir):
    request, results = isolated
    assert results["moeut_dist_importable"] is False
    reference = load_pretrained(model_dir)
    tokens = torch.tensor(request["tokens"])
    with torch.no_grad():
        expected = reference(tokens).logits
    error = (results["logits"] - expected).abs().max() / expected.abs().max()
    assert error <= 1e-5
    torch.testing.assert_close(results["loss"], lm_loss(expected[:, :-1], tokens[:, 1:]))
    torch.testing.assert_close(results["incremental"], expected[:, -1:])
    with torch.no_grad():
        expected_bf16 = reference.to(torch.bfloat16)(tokens).logits.float()
    # The export computes the experts with the reference, which rounds in another order than
    # our PyTorch path (it gates the products, ours the hidden layer): in bf16 the two are held
    # to the same accuracy against fp32 rather than to each other's bits.
    ours_bf16_error = (expected_bf16 - expected).abs().max()
    assert (results["bf16_logits"] - expected).abs().max() <= 1.5 * ours_bf16_error
    assert results["bf16_generated"].shape[1] > len(results["prompt_ids"])


def test_greedy_generation_equals_moeut_generate(isolated, model_dir, capsys):
    _, results = isolated
    model, tokenizer = load_model_and_tokenizer(model_dir)
    prompt_ids = [tokenizer.eod_id, *tokenizer.encode(PROMPT)]
    assert results["prompt_ids"].tolist() == prompt_ids
    ours = generate(
        model, torch.tensor([prompt_ids]), SamplingConfig(NEW_TOKENS, temperature=0),
        stop_token=tokenizer.eod_id, vocab_size=tokenizer.vocab_size,
    )  # fmt: skip
    assert results["greedy"].tolist() == [token.item() for token in ours]
    capsys.readouterr()
    moeut(["generate", str(model_dir), "--prompt", PROMPT, "--temperature", "0",
           "--max-tokens", str(NEW_TOKENS)])  # fmt: skip
    ours, theirs = capsys.readouterr().out.removesuffix("\n"), results["greedy_text"]
    # Byte-fallback pieces may form invalid UTF-8. transformers' ByteFallback decoder turns every
    # byte of such a run into U+FFFD, where SentencePiece (and so `moeut generate`) keeps the
    # ASCII bytes inside it: the texts agree up to the first U+FFFD.
    invalid = ours.find("\ufffd")
    if invalid < 0:
        assert ours == theirs
    else:
        assert ours[:invalid] == theirs[:invalid] and theirs[invalid] == "\ufffd"


def test_a_left_padded_batch_generates_what_each_row_does_alone(isolated):
    _, results = isolated
    assert results["padded"].all(0).sum() < results["padded"].shape[1]  # some row is padded
    for row, alone in zip(results["batch"], results["alone"], strict=True):
        assert row.tolist() == alone.tolist()
    assert results["sampled"].shape == (1, len(results["prompt_ids"]) + NEW_TOKENS)


def test_autotokenizer_in_the_export_encodes_as_sentencepiece(isolated, model_dir):
    request, results = isolated
    tokenizer = Tokenizer(model_dir / TOKENIZER_FILE)
    assert results["ids"] == [tokenizer.encode(text) for text in request["texts"]]
    for text, decoded in zip(request["texts"], results["decoded"], strict=True):
        if tokenizer.decode(tokenizer.encode(text)) == text:
            assert decoded == text


@pytest.mark.parametrize("byte_fallback", [False, True])
def test_autotokenizer_encodes_as_sentencepiece(byte_fallback, documents, tmp_path):
    from transformers import AutoTokenizer

    from moeut_dist.hf.tokenizer import write_hf_tokenizer

    corpus = write_jsonl(tmp_path / "corpus.jsonl", documents)
    vocab_size = 600 if byte_fallback else 300  # byte fallback takes 256 pieces
    tokenizer = train_tokenizer(
        [corpus], tmp_path / "tok.model", vocab_size=vocab_size, byte_fallback=byte_fallback
    )
    write_hf_tokenizer(tokenizer, tmp_path / "hf")
    hf = AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in EDGE_STRINGS + documents:
        ids = tokenizer.encode(text)
        assert hf.encode(text, add_special_tokens=False) == ids, text
        # Where SentencePiece gives the text back, so does the transformers tokenizer; its
        # unknown pieces decode as "<unk>", SentencePiece's as " ⁇ ".
        if tokenizer.decode(ids) == text or byte_fallback:
            assert hf.decode(ids) == tokenizer.decode(ids), text
    unknown = "漢字 😀"
    assert (hf.unk_token_id in tokenizer.encode(unknown)) != byte_fallback
    # Documents follow </s> in our shards: `tokenizer(text)` starts with it.
    assert hf("a b").input_ids == [tokenizer.eod_id, *tokenizer.encode("a b")]
    assert hf.eos_token_id == hf.bos_token_id == tokenizer.eod_id


def test_ours_to_transformers_and_back_is_bit_identical(model_dir, sharded_hf_dir, tmp_path):
    back = tmp_path / "back"
    assert moeut(["convert", "--from-hf", str(sharded_hf_dir), "--out", str(back)]) == 0
    original, returned = load_file(model_dir / WEIGHTS_FILE), load_file(back / WEIGHTS_FILE)
    assert original.keys() == returned.keys()
    for name, tensor in original.items():
        assert torch.equal(tensor, returned[name]) and tensor.dtype == returned[name].dtype, name
    assert json.loads((back / "config.json").read_text()) == json.loads(
        (model_dir / "config.json").read_text()
    )
    assert (back / TOKENIZER_FILE).read_bytes() == (model_dir / TOKENIZER_FILE).read_bytes()


def test_an_authors_checkpoint_converts_to_a_transformers_directory(model_dir, tmp_path):
    from moeut_dist.arch.moeut import to_official_state_dict

    torch.save(to_official_state_dict(load_pretrained(model_dir)), tmp_path / "official.pt")
    out = tmp_path / "hf"
    args = ["convert", "--from-official", str(tmp_path / "official.pt"), "--profile", "tiny"]
    assert (
        moeut([*args, "--out", str(out), "--hf", "--tokenizer", str(model_dir / TOKENIZER_FILE)])
        == 0
    )
    exported = load_file(out / WEIGHTS_FILE)
    for name, tensor in load_file(model_dir / WEIGHTS_FILE).items():
        assert torch.equal(exported[f"model.{name}"], tensor), name
    assert (out / "tokenizer.json").is_file() and (out / "modeling_moeut.py").is_file()


def test_a_bf16_model_directory_goes_there_and_back_in_bf16(model_dir, tmp_path):
    bf16 = tmp_path / "bf16"
    shutil.copytree(model_dir, bf16)
    weights = load_file(bf16 / WEIGHTS_FILE)
    save_file({name: t.to(torch.bfloat16) for name, t in weights.items()}, bf16 / WEIGHTS_FILE)
    export_hf(bf16, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert (
        moeut(["convert", "--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    )
    back = load_file(tmp_path / "back" / WEIGHTS_FILE)
    for name, tensor in back.items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, weights[name].bfloat16())


@pytest.mark.parametrize("profile", [n for n in profiles.names() if n.startswith("moeut-")])
def test_every_profile_builds_as_a_transformers_model(profile):
    from moeut_dist.export import expected_state_dict
    from moeut_dist.hf.configuration_moeut import MoEUTHFConfig
    from moeut_dist.hf.modeling_moeut import MoEUTForCausalLM

    config = profiles.get(profile)
    with torch.device("meta"):
        model = MoEUTForCausalLM(MoEUTHFConfig.from_moeut(config))
    expected = expected_state_dict(config, torch.float32)
    assert {name: t.shape for name, t in model.state_dict().items()} == {
        f"model.{name}": t.shape for name, t in expected.items()
    }
    assert model.config.to_moeut() == config


# --- bad input -------------------------------------------------------------------------


def refused(capsys, *args: str) -> str:
    capsys.readouterr()
    assert moeut(list(args)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def test_a_model_directory_without_tokenizer_is_refused(model_dir, tmp_path, capsys):
    bare = tmp_path / "bare"
    shutil.copytree(model_dir, bare)
    (bare / TOKENIZER_FILE).unlink()
    err = refused(capsys, "export", str(bare), str(tmp_path / "out"), "--hf")
    assert err.startswith("moeut export: ") and "has no tokenizer.model" in err
    assert not (tmp_path / "out").exists()


def test_a_transformers_directory_of_another_model_is_refused(sharded_hf_dir, tmp_path, capsys):
    other = tmp_path / "llama"
    shutil.copytree(sharded_hf_dir, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    err = refused(capsys, "convert", "--from-hf", str(other), "--out", str(tmp_path / "out"))
    assert "model_type 'llama', not 'moeut'" in err


def test_weights_that_do_not_fit_the_config_are_named(hf_dir, tmp_path, capsys):
    changed = tmp_path / "changed"
    shutil.copytree(hf_dir, changed)
    weights = load_file(changed / WEIGHTS_FILE)
    weights["model.out_norm.weight"] = torch.ones(3)
    save_file(weights, changed / WEIGHTS_FILE, metadata={"format": "pt"})
    err = refused(capsys, "convert", "--from-hf", str(changed), "--out", str(tmp_path / "out"))
    assert "'out_norm.weight'" in err


def test_the_export_never_replaces_a_directory_with_other_files(
    model_dir, hf_dir, tmp_path, capsys
):
    users = tmp_path / "users"
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    err = refused(capsys, "export", str(model_dir), str(users), "--hf")
    assert "notes.txt" in err and (users / "notes.txt").read_text() == "mine"
    again = tmp_path / "again"
    shutil.copytree(hf_dir, again)  # an earlier export is replaced whole
    (again / "moeut_stale_module.py").write_text("")
    assert moeut(["export", str(model_dir), str(again), "--hf"]) == 0
    assert not (again / "moeut_stale_module.py").exists()


def test_a_missing_extra_names_the_pip_install(model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    err = refused(capsys, "export", str(model_dir), str(tmp_path / "out"), "--hf")
    assert "pip install 'moeut-dist[hf]'" in err
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    err = refused(capsys, "eval", str(model_dir), "--lm-eval", "piqa=x.jsonl")
    assert "pip install 'moeut-dist[eval]'" in err


# --- lm-evaluation-harness -------------------------------------------------------------


@pytest.fixture(scope="module")
def harness_env(tmp_path_factory):
    """lm-eval's datasets cache in a temporary directory, not the user's."""
    cache = tmp_path_factory.mktemp("datasets_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_DATASETS_CACHE", str(cache))
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield


HARNESS_TASKS = ("piqa", "blimp", "lambada")


def our_scores(model, tokenizer, task_name: str) -> list[list[float]]:
    items = read_task_file(task_name, builtin_sample(task_name))
    requests = [
        ([tokenizer.eod_id, *tokenizer.encode(item.context)], tokenizer.encode(candidate))
        for item in items
        for candidate in item.candidates
    ]
    scores = iter(score_continuations(model_logits(model), requests, 4))
    return [[next(scores).logprob for _ in item.candidates] for item in items]


def harness_scores(results, task_name: str) -> list[list[float]]:
    samples = sorted(results["samples"][f"moeut_{task_name}"], key=lambda s: s["doc_id"])
    return [[float(logprob) for logprob, _ in s["filtered_resps"]] for s in samples]


def assert_agree(results, model, tokenizer, tasks) -> None:
    for task_name in tasks:
        ours, theirs = our_scores(model, tokenizer, task_name), harness_scores(results, task_name)
        assert len(ours) == len(theirs)
        for mine, harness in zip(ours, theirs, strict=True):
            torch.testing.assert_close(torch.tensor(harness), torch.tensor(mine), atol=1e-4, rtol=0)
        task = get_task(task_name)
        items = read_task_file(task_name, builtin_sample(task_name))
        if task.scoring == "choice":
            metrics = evaluate_task(task, items, model_logits(model), tokenizer).metrics
            reported = results["results"][f"moeut_{task_name}"]
            assert reported["acc,none"] == pytest.approx(metrics["acc"])
            if "acc_norm,none" in reported:
                assert reported["acc_norm,none"] == pytest.approx(metrics["acc_norm"])


def test_lm_eval_through_the_adapter_agrees_with_our_scorer(model_dir, harness_env):
    from moeut_dist.zeroshot.harness import resolve_tasks, run_lm_eval

    model, tokenizer = load_model_and_tokenizer(model_dir)
    tasks, manager = resolve_tasks([f"{name}={builtin_sample(name)}" for name in HARNESS_TASKS])
    results = run_lm_eval(model, tokenizer, tasks, manager, batch_size=4, bootstrap_iters=0)
    assert_agree(results, model, tokenizer, HARNESS_TASKS)
    lambada = [item for item in read_task_file("lambada", builtin_sample("lambada"))]
    greedy = [
        score.greedy
        for score in score_continuations(
            model_logits(model),
            [([tokenizer.eod_id, *tokenizer.encode(i.context)], tokenizer.encode(i.candidates[0]))
             for i in lambada],
        )
    ]  # fmt: skip
    assert results["results"]["moeut_lambada"]["acc,none"] == pytest.approx(
        sum(greedy) / len(greedy)
    )


def test_lm_eval_hf_model_on_the_export_agrees_with_our_scorer(model_dir, hf_dir, harness_env):
    from lm_eval import simple_evaluate

    from moeut_dist.zeroshot.harness import resolve_tasks

    tasks, manager = resolve_tasks([f"piqa={builtin_sample('piqa')}"])
    results = simple_evaluate(
        model="hf",
        model_args={
            "pretrained": str(hf_dir),
            "trust_remote_code": True,
            "add_bos_token": True,
            "dtype": "float32",
            "device": "cpu",
        },
        tasks=tasks,
        task_manager=manager,
        batch_size=2,
        bootstrap_iters=0,
    )
    model, tokenizer = load_model_and_tokenizer(model_dir)
    assert_agree(results, model, tokenizer, ["piqa"])


def test_the_adapter_generates_and_scores_whole_texts_like_our_code(model_dir, documents):
    from lm_eval.api.instance import Instance

    from moeut_dist.eval_cli import stream_text
    from moeut_dist.zeroshot.harness import MoEUTHarnessLM

    model, tokenizer = load_model_and_tokenizer(model_dir)
    adapter = MoEUTHarnessLM(model, tokenizer, batch_size=2, max_length=4096)

    def request(kind: str, arguments: tuple) -> Instance:
        return Instance(request_type=kind, doc={}, arguments=arguments, idx=0)

    prompt = [tokenizer.eod_id, *tokenizer.encode(PROMPT)]
    steps = generate(model, torch.tensor([prompt]), SamplingConfig(12, temperature=0),
                     stop_token=tokenizer.eod_id, vocab_size=tokenizer.vocab_size)  # fmt: skip
    text = "".join(stream_text(tokenizer, prompt, (step.item() for step in steps)))
    stop = text.strip()[3:5]
    generated = adapter.generate_until(
        [request("generate_until", (PROMPT, {"until": [stop], "max_gen_toks": 12})),
         request("generate_until", (PROMPT, {"until": ["never there"], "max_gen_toks": 12}))]
    )  # fmt: skip
    assert generated == [text[: text.index(stop)], text]
    ids = tokenizer.encode(documents[0])
    whole = score_continuations(model_logits(model), [([tokenizer.eod_id], ids)])[0].logprob
    rolled = adapter.loglikelihood_rolling([request("loglikelihood_rolling", (documents[0],))])
    assert rolled[0] == pytest.approx(whole, abs=1e-4)


def test_eval_command_runs_lm_eval_and_writes_results_beside_the_model(
    model_dir, tmp_path, capsys, harness_env
):
    evaluated = tmp_path / "model"
    shutil.copytree(model_dir, evaluated)
    args = ["eval", str(evaluated), "--lm-eval", f"piqa={builtin_sample('piqa')}", "--limit", "2"]
    assert moeut(args) == 0
    results = json.loads((evaluated / "lm_eval_results.json").read_text())
    assert results["versions"]["moeut_piqa"] == 1.0
    assert results["results"]["moeut_piqa"]["sample_len"] == 2
    assert "moeut_piqa" in capsys.readouterr().out
    err = refused(capsys, "eval", str(evaluated), "--lm-eval", "no_such_task_anywhere")
    assert "unknown lm-eval task 'no_such_task_anywhere'" in err
