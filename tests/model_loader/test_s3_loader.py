"""Checkpoints in S3 (``s3://bucket/prefix``), against moto's S3 server on loopback.

* A checkpoint in a bucket gives the same greedy tokens as the same checkpoint on disk, model and tokenizer
  both read from ``s3://``; only the small files are mirrored locally (no ``*.safetensors`` on disk), and the
  server saw every weight byte fetched with a ranged GET.
* The API server serves ``--model s3://...`` (its engine core and worker in their own process) with the
  same greedy text.
* Sharded checkpoints stream every tensor exactly, in several coalesced ranges, none above the bound.
* The mirror is refreshed when an object changes and keeps no file the bucket no longer has; weights
  replaced after the listing are an error, never a mix of two checkpoints.
* A missing bucket, prefix, config.json or weights, no credentials, a Hub revision on an S3 URL and boto3
  not installed are each a clear error naming the URL (or the missing package).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from llmserve.entrypoints.llm import LLM
from llmserve.model_loader.loader import ModelNotFoundError, resolve_model_path
from llmserve.model_loader.s3_loader import MANIFEST, iterate_s3_weights
from llmserve.sampling_params import SamplingParams
from llmserve.testing.checkpoints import write_checkpoint
from tests.entrypoints.openai.conftest import launch

BUCKET = "models"
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def _upload(client, folder: Path, prefix: str) -> None:
    for file in sorted(folder.iterdir()):
        client.upload_file(str(file), BUCKET, f"{prefix}/{file.name}")


@pytest.fixture(scope="module")
def s3(tmp_path_factory, llama_dir) -> Iterator[SimpleNamespace]:
    """moto's S3 server on a loopback port, the environment pointing at it, and tiny checkpoints uploaded:
    ``llama`` (one file) and ``sharded`` (several shards and an index)."""
    import boto3

    recording = tmp_path_factory.mktemp("moto") / "recording.jsonl"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MOTO_RECORDER_FILEPATH", str(recording))   # read when moto is first imported
        from moto.server import ThreadedMotoServer

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_REGION"):
            env.delenv(name, raising=False)
        env.setenv("AWS_ENDPOINT_URL", endpoint)
        env.setenv("AWS_ACCESS_KEY_ID", "test-key")
        env.setenv("AWS_SECRET_ACCESS_KEY", "test-secret")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket=BUCKET)
        _upload(client, llama_dir, "llama")
        sharded = write_checkpoint(tmp_path_factory.mktemp("sharded"), family="llama", size="tiny", seed=1,
                                   max_shard_bytes=100_000)
        _upload(client, sharded, "sharded")
        yield SimpleNamespace(endpoint=endpoint, client=client, sharded=sharded, recording=recording)
        server.stop()


def _record(s3: SimpleNamespace, command: str) -> None:
    import urllib.request

    urllib.request.urlopen(urllib.request.Request(f"{s3.endpoint}/moto-api/recorder/{command}", method="POST"))


def _recorded_gets(s3: SimpleNamespace) -> list[tuple[str, str | None]]:
    """``(object path, Range header)`` of every GET the server saw since the recording started."""
    gets = []
    for line in s3.recording.read_text().splitlines():
        entry = json.loads(line)
        if entry["method"] == "GET" and "list-type" not in entry["url"]:
            headers = {k.lower(): v for k, v in entry["headers"].items()}
            gets.append((entry["url"].split("?")[0], headers.get("range")))
    return gets


def test_same_tokens_as_the_local_folder_weights_streamed_with_ranged_gets(s3, llama_dir, tmp_path):
    local = LLM(str(llama_dir), kv_cache_memory_bytes="8MiB").generate("Hello there", GREEDY)
    _record(s3, "reset-recording")
    _record(s3, "start-recording")
    try:
        remote = LLM(f"s3://{BUCKET}/llama", tokenizer=f"s3://{BUCKET}/llama/", download_dir=str(tmp_path),
                     kv_cache_memory_bytes="8MiB").generate("Hello there", GREEDY)
    finally:
        _record(s3, "stop-recording")
    assert remote[0].outputs[0].token_ids == local[0].outputs[0].token_ids
    assert remote[0].outputs[0].text == local[0].outputs[0].text
    mirror = tmp_path / BUCKET / "llama"
    assert (mirror / "config.json").is_file() and (mirror / "tokenizer.json").is_file()
    assert not list(tmp_path.rglob("*.safetensors")), "the weights must not be copied to disk"
    weight_gets = [(path, byte_range) for path, byte_range in _recorded_gets(s3) if path.endswith(".safetensors")]
    assert weight_gets, "the weights were not read from the server"
    assert all(byte_range and byte_range.startswith("bytes=") for _, byte_range in weight_gets), weight_gets


def test_server_serves_a_model_from_s3(s3, llama_dir, tmp_path):
    """``--model s3://...`` through the API server, whose engine core (and its worker) runs in a process of
    its own: the same greedy text as the local folder, under the URL as the model's name."""
    import httpx

    expected = LLM(str(llama_dir), kv_cache_memory_bytes="8MiB").generate("Hello there", GREEDY)[0].outputs[0].text
    server = launch(f"s3://{BUCKET}/llama", "--served-model-name", f"s3://{BUCKET}/llama", "--download-dir",
                    str(tmp_path / "mirror"), log_dir=tmp_path)
    try:
        models = httpx.get(f"{server.base_url}/v1/models").json()["data"]
        assert [m["id"] for m in models] == [f"s3://{BUCKET}/llama"]
        response = httpx.post(f"{server.base_url}/v1/completions", timeout=60, json={
            "model": f"s3://{BUCKET}/llama", "prompt": "Hello there", "max_tokens": 8, "temperature": 0,
            "ignore_eos": True})
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["text"] == expected
    finally:
        assert server.stop() == 0, server.log()
    assert not list((tmp_path / "mirror").rglob("*.safetensors"))


def test_sharded_checkpoint_streams_exactly_in_bounded_ranges(s3, tmp_path):
    mirror = resolve_model_path(f"s3://{BUCKET}/sharded", download_dir=str(tmp_path))
    expected = {}
    for shard in s3.sharded.glob("*.safetensors"):
        expected.update(load_file(str(shard)))
    _record(s3, "reset-recording")
    _record(s3, "start-recording")
    try:
        streamed = dict(iterate_s3_weights(mirror, max_range_bytes=40_000))
    finally:
        _record(s3, "stop-recording")
    assert streamed.keys() == expected.keys()
    for name, tensor in expected.items():
        assert streamed[name].dtype == tensor.dtype and torch.equal(streamed[name], tensor), name
    largest = max(t.numel() * t.element_size() for t in expected.values())
    ranges = [byte_range for path, byte_range in _recorded_gets(s3) if path.endswith(".safetensors")]
    data_ranges = [tuple(map(int, r.removeprefix("bytes=").split("-"))) for r in ranges]
    shards = len(list(s3.sharded.glob("*.safetensors")))
    assert len(data_ranges) > 3 * shards   # two header reads per shard, then more than one data range
    assert all(stop - start + 1 <= max(40_000, largest) for start, stop in data_ranges)


def test_mirror_follows_changes_in_the_bucket(s3, llama_dir, tmp_path):
    _upload(s3.client, llama_dir, "changing")
    s3.client.put_object(Bucket=BUCKET, Key="changing/notes.txt", Body=b"first")
    mirror = resolve_model_path(f"s3://{BUCKET}/changing", download_dir=str(tmp_path))
    assert (mirror / "notes.txt").read_text() == "first"
    s3.client.put_object(Bucket=BUCKET, Key="changing/notes.txt", Body=b"second")
    s3.client.delete_object(Bucket=BUCKET, Key="changing/generation_config.json")
    assert resolve_model_path(f"s3://{BUCKET}/changing", download_dir=str(tmp_path)) == mirror
    assert (mirror / "notes.txt").read_text() == "second"
    assert not (mirror / "generation_config.json").exists()
    assert json.loads((mirror / MANIFEST).read_text())["url"] == f"s3://{BUCKET}/changing"


def test_weights_replaced_after_the_listing_are_an_error_not_a_mix(s3, llama_dir, tmp_path):
    _upload(s3.client, llama_dir, "replaced")
    mirror = resolve_model_path(f"s3://{BUCKET}/replaced", download_dir=str(tmp_path))
    other = min(s3.sharded.glob("*.safetensors"))
    s3.client.upload_file(str(other), BUCKET, "replaced/model.safetensors")
    with pytest.raises(ModelNotFoundError, match=f"s3://{BUCKET}/replaced/model.safetensors changed while"):
        next(iterate_s3_weights(mirror))


@pytest.mark.parametrize("url,message", [
    ("s3://no-such-bucket/llama", "the bucket of s3://no-such-bucket/llama does not exist"),
    (f"s3://{BUCKET}/missing", f"no objects under s3://{BUCKET}/missing"),
    ("s3:///llama", "names no bucket"),
])
def test_missing_bucket_or_prefix_names_the_url(s3, tmp_path, url, message):
    with pytest.raises(ModelNotFoundError, match=message):
        resolve_model_path(url, download_dir=str(tmp_path))


def test_prefix_without_config_or_weights_is_a_clear_error(s3, tmp_path):
    s3.client.put_object(Bucket=BUCKET, Key="no-config/tokenizer.json", Body=b"{}")
    with pytest.raises(ModelNotFoundError, match=f"s3://{BUCKET}/no-config has no config.json"):
        resolve_model_path(f"s3://{BUCKET}/no-config", download_dir=str(tmp_path))
    s3.client.put_object(Bucket=BUCKET, Key="no-weights/config.json", Body=b"{}")
    with pytest.raises(ModelNotFoundError, match=f"no \\*.safetensors weights under s3://{BUCKET}/no-weights"):
        resolve_model_path(f"s3://{BUCKET}/no-weights", download_dir=str(tmp_path))


def test_no_credentials_names_the_url_and_the_variables(s3, tmp_path, monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(ModelNotFoundError, match=f"no AWS credentials to read s3://{BUCKET}/llama: set "
                                                 "AWS_ACCESS_KEY_ID"):
        resolve_model_path(f"s3://{BUCKET}/llama", download_dir=str(tmp_path))


def test_hub_revision_on_an_s3_url_is_refused(s3, tmp_path):
    with pytest.raises(ModelNotFoundError, match="Hub revision"):
        resolve_model_path(f"s3://{BUCKET}/llama", revision="main", download_dir=str(tmp_path))


def test_without_boto3_the_error_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "boto3", None)
    with pytest.raises(ImportError, match=r"pip install 'llmserve\[s3\]'"):
        resolve_model_path(f"s3://{BUCKET}/llama", download_dir=str(tmp_path))
