"""Shards where large corpora live: real HTTP and S3-compatible servers on 127.0.0.1."""

from __future__ import annotations

import http.server
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from data_prep.shards import build_shards
from data_prep.synthetic import synthetic_documents, write_jsonl
from data_prep.tokenizer import train_tokenizer
from moeut_dist.data import ShardError, Tokenizer, TokenLoader, read_manifest
from moeut_dist.data.storage import RetryPolicy
from moeut_dist.train.config import check_run, load_config
from tests.distributed_utils import free_port
from tests.shard_server import serving

SEQ_LEN = 16
REPO = Path(__file__).resolve().parent.parent
NO_WAIT = RetryPolicy(attempts=3, backoff_seconds=0.0)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_jsonl(
        tmp_path_factory.mktemp("corpus") / "corpus.jsonl", synthetic_documents(120, seed=5)
    )


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, corpus) -> Tokenizer:
    return train_tokenizer([corpus], tmp_path_factory.mktemp("tok") / "tok.model", vocab_size=400)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory, corpus, tokenizer) -> Path:
    """A few hundred samples in shards of 30."""
    out = tmp_path_factory.mktemp("shards") / "shards"
    build_shards(
        [corpus], out, tokenizer.path, SEQ_LEN, shard_bytes=30 * 1024, val_fraction=0.1,
        progress=False,
    )  # fmt: skip
    return out


@pytest.fixture
def http_server(tmp_path) -> Iterator[tuple[str, Path, http.server.HTTPServer]]:
    """(base URL, the folder it serves, the server) on 127.0.0.1."""
    root = tmp_path / "served"
    root.mkdir()
    with serving(root) as (url, server):
        yield url, root, server


def _loader(location, tokenizer: Tokenizer, **options) -> TokenLoader:
    options = {"batch_size": 8, "epochs": 1, "retry": NO_WAIT, **options}
    return TokenLoader(str(location), seq_len=SEQ_LEN, tokenizer=tokenizer, **options)


def _same_batches(got: list[torch.Tensor], want: list[torch.Tensor]) -> bool:
    return len(got) == len(want) and all(a.equal(b) for a, b in zip(got, want, strict=True))


def test_http_batches_equal_local_ones_bit_for_bit(shard_dir, tokenizer, http_server):
    url, root, _ = http_server
    shutil.copytree(shard_dir, root / "shards")
    local = list(_loader(shard_dir, tokenizer, num_workers=2, dp_world_size=2, dp_rank=1))
    remote = _loader(f"{url}/shards", tokenizer, num_workers=2, dp_world_size=2, dp_rank=1)
    assert _same_batches(list(remote), local)
    assert remote.counters() == {"skipped_shards": 0, "read_retries": 0}


def test_connection_dropped_mid_shard_is_read_again_exactly(shard_dir, tokenizer, http_server):
    url, root, server = http_server
    shutil.copytree(shard_dir, root / "shards")
    server.cut_once.update(shard.name for shard in read_manifest(shard_dir).split("train").shards)
    server.cut_once = set(sorted(server.cut_once)[:2])
    local = list(_loader(shard_dir, tokenizer))
    remote = _loader(f"{url}/shards", tokenizer)
    with pytest.warns(RuntimeWarning, match=rf"reading again: .*{url}/shards/train-"):
        batches = list(remote)
    assert _same_batches(batches, local)
    assert remote.counters() == {"skipped_shards": 0, "read_retries": 2}
    assert not server.cut_once


def _shard_requests(server: http.server.HTTPServer) -> list[str]:
    return [name for name in server.requested if name.endswith(".tar")]


def test_workers_read_ahead_only_the_shards_they_need(shard_dir, tokenizer, http_server):
    """Each of 2 workers of 2 ranks reads 8 samples every 32 places, passing over some of the
    30-sample shards: prefetching reads the shards that reading each when needed reads."""
    url, root, server = http_server
    shutil.copytree(shard_dir, root / "shards")
    options = dict(num_workers=2, dp_world_size=2, dp_rank=1)
    requests = []
    for prefetch_shards in (0, 2):
        server.requested.clear()
        list(_loader(f"{url}/shards", tokenizer, prefetch_shards=prefetch_shards, **options))
        requests.append(Counter(_shard_requests(server)))
    assert requests[0] == requests[1]
    assert sum(requests[0].values()) < 2 * len(read_manifest(shard_dir).split("train").shards)


def test_the_next_shard_is_requested_before_a_batch_needs_it(shard_dir, tokenizer, http_server):
    url, root, server = http_server
    shutil.copytree(shard_dir, root / "shards")
    list(_loader(f"{url}/shards", tokenizer, prefetch_shards=0))
    order = _shard_requests(server)  # of the shards, as the batches need them
    server.requested.clear()
    stream = iter(_loader(f"{url}/shards", tokenizer, batch_size=1, prefetch_shards=1))
    next(stream)  # the first of the first shard's 30 samples
    deadline = time.monotonic() + 60
    while len(_shard_requests(server)) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _shard_requests(server) == order[:2]
    stream.close()


def test_missing_shard_is_a_named_permanent_error(shard_dir, tokenizer, http_server):
    url, root, _ = http_server
    shutil.copytree(shard_dir, root / "shards")
    missing = read_manifest(shard_dir).split("train").shards[2].name
    (root / "shards" / missing).unlink()
    with pytest.raises(ShardError, match=rf"{url}/shards/{missing}: HTTP 404"):
        list(_loader(f"{url}/shards", tokenizer))
    skipping = _loader(f"{url}/shards", tokenizer, skip_corrupt=True)
    with pytest.warns(RuntimeWarning, match=rf"skipping corrupt shard: .*{missing}: HTTP 404"):
        list(skipping)
    assert skipping.counters() == {"skipped_shards": 1, "read_retries": 0}  # never retried
    with pytest.raises(FileNotFoundError, match=rf"{url}/nothing/manifest.json not found"):
        _loader(f"{url}/nothing", tokenizer)


def test_locations_with_a_password_are_refused(tokenizer):
    with pytest.raises(ValueError, match="password in it: give credentials through"):
        _loader("https://user:secret@example.com/shards", tokenizer)


def test_pipe_command_reads_the_shards(shard_dir, tokenizer):
    local = list(_loader(shard_dir, tokenizer))
    assert _same_batches(list(_loader(f"pipe:cat {shard_dir}/{{}}", tokenizer)), local)


@pytest.fixture(scope="module")
def s3_bucket() -> Iterator[str]:
    """A bucket on moto's S3-compatible server on 127.0.0.1, reached through the standard AWS
    environment variables (the endpoint in AWS_ENDPOINT_URL); tests use their own prefixes."""
    moto_server = pytest.importorskip("moto.server")
    s3fs = pytest.importorskip("s3fs")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    environment = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    with pytest.MonkeyPatch.context() as patch:
        for name, value in environment.items():
            patch.setenv(name, value)
        s3fs.S3FileSystem.clear_instance_cache()
        s3fs.S3FileSystem().mkdir("bucket")
        try:
            yield "s3://bucket"
        finally:
            s3fs.S3FileSystem.clear_instance_cache()
            server.stop()


def test_prep_writes_to_s3_and_the_loader_reads_it(corpus, shard_dir, tokenizer, s3_bucket):
    out = f"{s3_bucket}/corpus/shards"
    command = [
        sys.executable, "-m", "moeut_dist.cli", "prep", "shards", str(corpus),
        "--tokenizer", str(tokenizer.path), "--out", out, "--seq-len", str(SEQ_LEN),
        "--shard-size", "30KB", "--val-fraction", "0.1", "--no-progress",
    ]  # fmt: skip
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert read_manifest(out) == read_manifest(shard_dir)
    local = list(_loader(shard_dir, tokenizer, num_workers=2))
    assert _same_batches(list(_loader(out, tokenizer, num_workers=2)), local)
    # A run's checks read the manifest there too, and a rerun of the build keeps it.
    config = load_config(None, [f"data.shard_dir={out}", f"data.tokenizer={tokenizer.path}"])
    check_run(replace(config, data=replace(config.data, seq_len=SEQ_LEN, micro_batch_size=2)), 1)
    rerun = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr


def test_killed_build_into_s3_completes_on_rerun_identically(tmp_path, tokenizer, s3_bucket):
    import s3fs

    big = write_jsonl(tmp_path / "big.jsonl", synthetic_documents(800, seed=2))
    out = f"{s3_bucket}/killed"
    command = [
        sys.executable, "-m", "moeut_dist.cli", "prep", "shards", str(big),
        "--tokenizer", str(tokenizer.path), "--out", out, "--seq-len", str(SEQ_LEN),
        "--shard-size", "256KB", "--no-progress",
    ]  # fmt: skip
    build = subprocess.Popen(command, env={**os.environ, "PYTHONPATH": str(REPO)})
    bucket = s3fs.S3FileSystem()
    deadline = time.monotonic() + 60
    while build.poll() is None and time.monotonic() < deadline:
        bucket.invalidate_cache()
        if bucket.exists("bucket/killed/progress.json") and bucket.glob("bucket/killed/*.tar"):
            break
        time.sleep(0.01)
    build.kill()  # SIGKILL
    build.wait()
    bucket.invalidate_cache()
    assert not bucket.exists("bucket/killed/manifest.json"), "finished before it was killed"
    assert bucket.glob("bucket/killed/*.tar"), "killed before its first shard"

    build_shards([big], out, tokenizer.path, SEQ_LEN, shard_bytes=256 << 10, progress=False)
    local = tmp_path / "local"
    build_shards([big], local, tokenizer.path, SEQ_LEN, shard_bytes=256 << 10, progress=False)
    bucket.invalidate_cache()
    assert sorted(p.rsplit("/", 1)[1] for p in bucket.ls("bucket/killed")) == sorted(
        p.name for p in local.iterdir()
    )
    for shard in local.glob("*.tar"):
        assert bucket.cat_file(f"bucket/killed/{shard.name}") == shard.read_bytes(), shard.name
    assert read_manifest(out) == read_manifest(local)
