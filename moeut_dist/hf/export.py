"""Model directories ↔ Hugging Face transformers directories, both ways lossless.

`export_hf` writes a directory that `AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)` and `AutoTokenizer.from_pretrained(dir)` load with torch and
transformers alone: `config.json` (`model_type` "moeut", `architectures`, `auto_map`,
`torch_dtype`), `generation_config.json`, the weights as safetensors (split into
`model-0000i-of-0000n.safetensors` with `model.safetensors.index.json` above `max_shard_bytes`,
as transformers writes them; tensor names gain the wrapper's `model.` prefix), the tokenizer
(`moeut_dist.hf.tokenizer`) and the model code (`moeut_dist.hf.packaging`). `import_hf` reads such
a directory back, also after fine-tuning elsewhere. Both stream tensor by tensor, so memory stays
bounded by the largest tensor, and write their directory whole (`write_model_dir`).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from moeut_dist.cli_errors import require_extra
from moeut_dist.config import ConfigError, MoEUTConfig
from moeut_dist.data import Tokenizer
from moeut_dist.export import (
    CONFIG_FILE,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    ModelDirectoryError,
    TensorSpecs,
    check_replaceable,
    expected_state_dict,
    read_config,
    safetensors_specs,
    verify_state_dict,
    write_model_dir,
    write_model_files,
    write_safetensors_streaming,
)

INDEX_FILE = "model.safetensors.index.json"
GENERATION_CONFIG_FILE = "generation_config.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # the Hub's recommended file size
WEIGHT_PREFIX = "model."  # `MoEUTForCausalLM.model` holds our `MoEUTLM`
ARCHITECTURE = "MoEUTForCausalLM"
AUTO_MAP = {
    "AutoConfig": "configuration_moeut.MoEUTHFConfig",
    "AutoModelForCausalLM": "modeling_moeut.MoEUTForCausalLM",
}
_SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_HF_FILES = frozenset(
    {CONFIG_FILE, GENERATION_CONFIG_FILE, WEIGHTS_FILE, INDEX_FILE, TOKENIZER_FILE}
    | {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
)


def is_hf_dir_file(name: str) -> bool:
    """A file an export writes (any version of it): what may be replaced without asking."""
    return (
        name in _HF_FILES
        or _SHARD_NAME.fullmatch(name) is not None
        or (name.endswith(".py") and (name.startswith("moeut_") or name.endswith("_moeut.py")))
    )


# --- ours → transformers ---------------------------------------------------------------


def export_hf(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write the transformers directory of the model directory `model_dir` (see the module
    docstring); everything is checked before anything is written."""
    require_extra("transformers", "hf", "a transformers directory")
    model_dir = Path(model_dir)
    if not (model_dir / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{model_dir} has no {WEIGHTS_FILE}: not a moeut model directory")
    if not (model_dir / TOKENIZER_FILE).is_file():
        raise ModelDirectoryError(
            f"{model_dir} has no {TOKENIZER_FILE}: a transformers directory needs the model's "
            "tokenizer (save the model with its SentencePiece model)"
        )
    config = read_config(model_dir)
    if not isinstance(config, MoEUTConfig):
        raise ConfigError(f"{model_dir} holds a {type(config).__name__} model; --hf exports MoEUTs")
    tokenizer = Tokenizer(model_dir / TOKENIZER_FILE)
    if tokenizer.vocab_size > config.vocab_size:
        raise ModelDirectoryError(
            f"{model_dir}: the tokenizer has {tokenizer.vocab_size} pieces, more than the "
            f"model's vocabulary of {config.vocab_size}"
        )
    specs = safetensors_specs(model_dir / WEIGHTS_FILE)
    dtype = _check_weights(specs, config)

    def write(directory: Path) -> None:
        _write_weights(model_dir / WEIGHTS_FILE, specs, directory, max_shard_bytes)
        _write_configs(directory, config, tokenizer, dtype)
        from moeut_dist.hf.packaging import write_sources
        from moeut_dist.hf.tokenizer import write_hf_tokenizer

        write_hf_tokenizer(tokenizer, directory)
        write_sources(directory)

    return write_model_dir(out_dir, write, is_hf_dir_file)


def export_hf_via(
    out_dir: str | os.PathLike,
    write_ours: Callable[[Path], object],
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """`export_hf` of the model directory that `write_ours(directory)` writes first (from a
    checkpoint, say), in a temporary directory beside `out_dir`."""
    require_extra("transformers", "hf", "a transformers directory")
    out = Path(out_dir)
    check_replaceable(out, is_hf_dir_file)  # before the work, not only after it
    out.resolve().parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.resolve().parent, prefix=f".{out.name}.") as tmp:
        write_ours(Path(tmp) / "model")
        return export_hf(Path(tmp) / "model", out, max_shard_bytes)


def is_model_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / CONFIG_FILE).is_file() and (Path(path) / WEIGHTS_FILE).is_file()


def _check_weights(specs: TensorSpecs, config: MoEUTConfig) -> torch.dtype:
    """The weights' dtype, once every tensor is checked against the config (by name)."""
    dtype = next(iter(specs.values()))[1] if specs else torch.float32
    verify_state_dict(
        expected_state_dict(config, dtype),
        {name: torch.empty(shape, dtype=d, device="meta") for name, (shape, d) in specs.items()},
    )
    return dtype


def _shards(specs: TensorSpecs, max_bytes: int) -> list[list[str]]:
    """Tensor names grouped in order into shards of at most `max_bytes` (a larger tensor
    gets a shard of its own), as transformers splits them."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, (shape, dtype) in specs.items():
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _write_weights(source: Path, specs: TensorSpecs, directory: Path, max_bytes: int) -> None:
    shards = _shards(specs, max_bytes)
    names = (
        [WEIGHTS_FILE]
        if len(shards) == 1
        else [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    )
    weight_map = {}
    with safe_open(source, framework="pt") as weights:
        for file_name, shard in zip(names, shards, strict=True):
            write_safetensors_streaming(
                directory / file_name,
                {WEIGHT_PREFIX + name: specs[name] for name in shard},
                ((WEIGHT_PREFIX + name, weights.get_tensor(name)) for name in shard),
                metadata={"format": "pt"},
            )
            weight_map.update({WEIGHT_PREFIX + name: file_name for name in shard})
    if len(shards) > 1:
        total = sum(torch.Size(shape).numel() * d.itemsize for shape, d in specs.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _write_configs(
    directory: Path, config: MoEUTConfig, tokenizer: Tokenizer, dtype: torch.dtype
) -> None:
    from transformers import GenerationConfig

    from moeut_dist.hf.configuration_moeut import MoEUTHFConfig

    eod = tokenizer.eod_id
    hf_config = MoEUTHFConfig.from_moeut(
        config,
        architectures=[ARCHITECTURE],
        auto_map=AUTO_MAP,
        bos_token_id=eod,
        eos_token_id=eod,
        pad_token_id=eod,
        dtype=dtype,
    )
    values = hf_config.to_diff_dict()
    values["torch_dtype"] = values["dtype"]  # the name transformers 4 and other readers know
    (directory / CONFIG_FILE).write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")
    # Ids past the tokenizer's pieces (a vocabulary padded for tensor parallelism) stand for no
    # text: never generated, as in `moeut generate`.
    padding_ids = list(range(tokenizer.vocab_size, config.vocab_size))
    GenerationConfig(
        bos_token_id=eod,
        eos_token_id=eod,
        pad_token_id=eod,
        suppress_tokens=padding_ids or None,
    ).save_pretrained(directory)


# --- transformers → ours ---------------------------------------------------------------


def read_hf_config(hf_dir: Path) -> MoEUTConfig:
    """Our config from a transformers directory's `config.json`, refusing another model type."""
    path = hf_dir / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{hf_dir} has no {CONFIG_FILE}: not a transformers directory")
    try:
        values = json.loads(path.read_bytes())
    except ValueError as error:
        raise ConfigError(f"{path} is not valid JSON: {error}") from error
    model_type = values.get("model_type") if isinstance(values, dict) else None
    if model_type != "moeut":
        raise ConfigError(f"{hf_dir} holds a model of model_type {model_type!r}, not 'moeut'")
    from dataclasses import fields

    names = {field.name for field in fields(MoEUTConfig)}
    try:
        return MoEUTConfig.from_dict({k: v for k, v in values.items() if k in names})
    except (ValueError, TypeError) as error:
        raise ConfigError(f"{path}: {error}") from error


def _hf_weight_files(hf_dir: Path) -> list[Path]:
    if (hf_dir / INDEX_FILE).is_file():
        try:
            weight_map = json.loads((hf_dir / INDEX_FILE).read_bytes())["weight_map"]
        except (ValueError, KeyError, TypeError) as error:
            raise ModelDirectoryError(f"{hf_dir / INDEX_FILE} is damaged: {error}") from error
        return [hf_dir / name for name in dict.fromkeys(weight_map.values())]
    if (hf_dir / WEIGHTS_FILE).is_file():
        return [hf_dir / WEIGHTS_FILE]
    raise FileNotFoundError(f"{hf_dir} has neither {INDEX_FILE} nor {WEIGHTS_FILE}")


def import_hf(hf_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Our model directory (for `load_pretrained`, `init_from`) from a transformers directory
    written by `export_hf`; the weights are copied bit for bit."""
    hf_dir = Path(hf_dir)
    config = read_hf_config(hf_dir)
    files = _hf_weight_files(hf_dir)
    specs, file_of = {}, {}
    for path in files:
        for name, spec in safetensors_specs(path).items():
            ours = name.removeprefix(WEIGHT_PREFIX)
            specs[ours], file_of[ours] = spec, path
    _check_weights(specs, config)
    order = {name: specs[name] for name in expected_state_dict(config, torch.float32)}
    tokenizer = hf_dir / TOKENIZER_FILE

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for name in order:
            with safe_open(file_of[name], framework="pt") as file:
                yield name, file.get_tensor(WEIGHT_PREFIX + name)

    return write_model_dir(
        out_dir,
        lambda directory: write_model_files(
            directory,
            config,
            lambda path: write_safetensors_streaming(path, order, tensors()),
            tokenizer if tokenizer.is_file() else None,
        ),
    )
