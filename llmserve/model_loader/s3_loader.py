"""Checkpoints in S3 or any S3-compatible store, as ``s3://bucket/prefix``.

The small files (config, tokenizer, generation config, chat template) are mirrored into a local folder, so
everything that reads a checkpoint folder reads them unchanged. The safetensors weights stay in the bucket:
they are streamed tensor by tensor with ranged GETs (:mod:`~llmserve.model_loader.safetensors_stream`) and
never written to disk. The mirror records which objects hold the weights (:data:`MANIFEST`); that file is how
the loader knows a folder's weights are remote.

Credentials, region and endpoint come from boto3's usual sources: ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` (or ``AWS_PROFILE``), ``AWS_REGION`` / ``AWS_DEFAULT_REGION``, and
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` for S3-compatible stores (MinIO, Ceph, R2...), which are
addressed path-style since not every one of them serves bucket subdomains.
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import torch

from llmserve.config import cache_dir
from llmserve.errors import ModelNotFoundError
from llmserve.model_loader.safetensors_stream import DEFAULT_MAX_RANGE_BYTES, iterate_tensors

SCHEME = "s3://"
MANIFEST = "llmserve-s3-weights.json"
_INDEX = "model.safetensors.index.json"


def is_s3_url(model: str | Path) -> bool:
    return isinstance(model, str) and model.startswith(SCHEME)


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/a/b/`` -> ``("bucket", "a/b")``."""
    bucket, _, prefix = url[len(SCHEME):].partition("/")
    prefix = prefix.strip("/")
    if not bucket:
        raise ModelNotFoundError(f"{url} names no bucket: use s3://bucket/prefix")
    if prefix and any(part in ("", ".", "..") for part in prefix.split("/")):
        raise ModelNotFoundError(f"{url}: the prefix may not hold empty, '.' or '..' parts")
    return bucket, prefix


def download_s3_checkpoint(url: str, download_dir: str | None, file_patterns: list[str]) -> Path:
    """Mirror the small files under ``url`` that match ``file_patterns`` (safetensors excepted) into
    ``download_dir/bucket/prefix`` (default ``$LLMSERVE_CACHE_DIR/s3/...``) and return that folder.
    Files unchanged since the last mirror (same ETag) are not fetched again."""
    bucket, prefix = parse_s3_url(url)
    client = s3_client(url)
    objects = _list_objects(client, bucket, prefix, url)
    small = {name: etag for name, etag in objects.items()
             if not name.endswith(".safetensors") and any(fnmatch.fnmatch(name, p) for p in file_patterns)}
    if "config.json" not in small:
        raise ModelNotFoundError(f"{url} has no config.json: not a Hugging Face checkpoint")
    folder = (Path(download_dir).expanduser() if download_dir else cache_dir() / "s3") / bucket / prefix
    folder.mkdir(parents=True, exist_ok=True)
    previous = _read_manifest(folder)["etags"] if is_s3_mirror(folder) else {}
    for name, etag in small.items():
        if previous.get(name) != etag or not (folder / name).is_file():
            with _s3_errors(url):
                body = client.get_object(Bucket=bucket, Key=_key(prefix, name))["Body"].read()
            _write_atomically(folder / name, body)
    for stale in set(previous) - set(small):
        (folder / stale).unlink(missing_ok=True)
    shards = _weight_files(folder, objects, url)
    _write_atomically(folder / MANIFEST, json.dumps({
        "url": url, "bucket": bucket, "etags": small,
        "shards": [{"key": _key(prefix, name), "etag": objects[name]} for name in shards]}).encode())
    return folder


def is_s3_mirror(path: Path) -> bool:
    return (path / MANIFEST).is_file()


def iterate_s3_weights(path: Path, max_range_bytes: int = DEFAULT_MAX_RANGE_BYTES
                       ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` from every remote shard of the mirror folder ``path``, one at a time."""
    manifest = _read_manifest(path)
    client = s3_client(manifest["url"])
    for shard in manifest["shards"]:
        shard_url = f"{SCHEME}{manifest['bucket']}/{shard['key']}"

        def read_range(start: int, stop: int, key: str = shard["key"], etag: str = shard["etag"],
                       shard_url: str = shard_url) -> BinaryIO:
            if stop <= start:
                return io.BytesIO(b"")
            with _s3_errors(shard_url):
                return client.get_object(Bucket=manifest["bucket"], Key=key, Range=f"bytes={start}-{stop - 1}",
                                         IfMatch=etag)["Body"]

        with _s3_errors(shard_url):
            yield from iterate_tensors(read_range, shard_url, max_range_bytes)


def s3_client(url: str) -> Any:
    """A boto3 S3 client configured from the environment (see the module docstring)."""
    try:
        import boto3
        from botocore.config import Config
        from botocore.exceptions import ProfileNotFound
    except ImportError:
        raise ImportError(f"{url}: s3:// models need boto3: pip install 'llmserve[s3]'") from None
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    config = Config(retries={"max_attempts": 5, "mode": "standard"},
                    s3={"addressing_style": "path" if endpoint else "auto"})
    try:
        session = boto3.Session(region_name=os.environ.get("AWS_REGION") or None)
    except ProfileNotFound as exc:
        raise ModelNotFoundError(f"cannot read {url}: {exc}") from None
    return session.client("s3", endpoint_url=endpoint, config=config)


@contextlib.contextmanager
def _s3_errors(url: str) -> Iterator[None]:
    """botocore's exceptions as a :class:`ModelNotFoundError` that names the URL and what to fix."""
    from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

    try:
        yield
    except NoCredentialsError:
        raise ModelNotFoundError(f"no AWS credentials to read {url}: set AWS_ACCESS_KEY_ID and "
                                 "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE") from None
    except EndpointConnectionError as exc:
        raise ModelNotFoundError(f"could not reach the S3 endpoint for {url}: {exc}") from None
    except ClientError as exc:
        error = exc.response.get("Error", {})
        code, message = error.get("Code", "?"), error.get("Message", str(exc))
        if code == "NoSuchBucket":
            raise ModelNotFoundError(f"the bucket of {url} does not exist") from None
        if code in ("NoSuchKey", "404"):
            raise ModelNotFoundError(f"{url} does not exist") from None
        if code == "PreconditionFailed":
            raise ModelNotFoundError(f"{url} changed while the model was loading; start again") from None
        raise ModelNotFoundError(f"cannot read {url}: {code}: {message}") from None
    except BotoCoreError as exc:
        raise ModelNotFoundError(f"cannot read {url}: {exc}") from None


def _list_objects(client: Any, bucket: str, prefix: str, url: str) -> dict[str, str]:
    """The objects directly under the prefix: ``{file name: ETag}``."""
    objects = {}
    with _s3_errors(url):
        pages = client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=f"{prefix}/" if prefix else "", Delimiter="/")
        for page in pages:
            for item in page.get("Contents", []):
                name = item["Key"].rpartition("/")[2]
                if name:
                    objects[name] = item["ETag"]
    if not objects:
        raise ModelNotFoundError(f"no objects under {url}")
    return objects


def _weight_files(folder: Path, objects: dict[str, str], url: str) -> list[str]:
    """The safetensors shards: those the index lists when there is one, else every ``*.safetensors``."""
    if (folder / _INDEX).is_file() and _INDEX in objects:
        files = sorted(set(json.loads((folder / _INDEX).read_text())["weight_map"].values()))
        missing = [f for f in files if f not in objects]
        if missing:
            raise ModelNotFoundError(f"{_INDEX} lists shards that are not under {url}: {', '.join(missing)}")
        return files
    files = sorted(name for name in objects if name.endswith(".safetensors"))
    if not files:
        raise ModelNotFoundError(f"no *.safetensors weights under {url} (only safetensors checkpoints are "
                                 "read from S3)")
    return files


def _key(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix else name


def _read_manifest(folder: Path) -> dict[str, Any]:
    return json.loads((folder / MANIFEST).read_text())


def _write_atomically(path: Path, data: bytes) -> None:
    """Write then rename, so a process reading the mirror (a worker next to the front end) never sees half."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_bytes(data)
    os.replace(partial, path)
