"""Find, fetch, verify and load pretrained weights: a local path, s3:// (boto3), https (into torchvision's cache), or
any URI Spark's Hadoop filesystems read (s3a://, gs://, hdfs://, abfs://), with the job's own settings."""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from jobs.errors import StorageError, UsageError, known_error_from_spark

if TYPE_CHECKING:
    import torch

TORCHVISION_URLS = {
    "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "mobilenet_v2": "https://download.pytorch.org/models/mobilenet_v2-b0353104.pth",
}
# torchvision names checkpoints NAME-<first hex digits of sha256>.pth and checks them the same way
HASH_IN_NAME = re.compile(r"-([a-f0-9]{6,})\.")


@dataclass(frozen=True)
class Weights:
    """A verified checkpoint: its bytes (broadcast to executors), where it came from and its sha256."""

    model: str
    source: str
    sha256: str
    data: bytes


def torchvision_cache_dir() -> str:
    """Where torchvision caches checkpoints: $TORCH_HOME/hub/checkpoints (default ~/.cache/torch)."""
    import torch

    return os.path.join(torch.hub.get_dir(), "checkpoints")


def how_to_pass(model: str) -> str:
    name = os.path.basename(TORCHVISION_URLS[model])
    return (
        f"run `make weights MODEL={model}` where you have internet (or download {TORCHVISION_URLS[model]}) and pass "
        f"--weights /path/to/{name} (or its s3://, s3a://, gs:// or hdfs:// copy), or copy it to "
        f"{torchvision_cache_dir()}/"
    )


def _download(url: str, dest: str) -> None:
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=os.path.dirname(dest), delete=False) as tmp:
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                shutil.copyfileobj(response, tmp)
        except BaseException:
            os.unlink(tmp.name)
            raise
    os.replace(tmp.name, dest)  # a half-downloaded file never sits in the cache under the real name


def _read_s3(uri: str) -> bytes:
    import boto3  # imported here: only drivers that read weights from S3 need it

    parsed = urlparse(uri)
    client = boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None)
    return client.get_object(Bucket=parsed.netloc, Key=parsed.path.lstrip("/"))["Body"].read()


def _read_hadoop(spark: Any, uri: str) -> bytes:
    """One file through Spark's Hadoop filesystems (gs://, hdfs://, s3a:// with the job's fs.* settings): a binaryFile
    read, whose one row reaches the driver faster than the bytes would through py4j."""
    if spark is None:
        raise UsageError(f"weights at {uri} are read through Spark: run a job, not this helper, on them")
    try:
        rows = spark.read.format("binaryFile").load(uri).select("content").head(2)
    except Exception as e:
        known = known_error_from_spark(e)
        if known is None:
            raise
        raise known from e
    if len(rows) != 1:
        raise UsageError(f"{uri} is {'a folder' if rows else 'empty'}, not one weights file")
    return bytes(rows[0][0])


def fetch_bytes(model: str, weights: str | None, spark: Any = None) -> tuple[str, bytes]:
    """The checkpoint's bytes and a printable source, fetching into torchvision's cache when needed; URIs other than
    local, s3:// and http(s) are read with `spark`'s Hadoop filesystems."""
    source = weights or TORCHVISION_URLS[model]
    scheme = urlparse(source).scheme
    try:
        if scheme in ("s3", "s3n"):
            return source, _read_s3(source)
        if scheme not in ("", "file", "http", "https"):
            return source, _read_hadoop(spark, source)
        if scheme in ("http", "https"):
            cached = os.path.join(torchvision_cache_dir(), os.path.basename(urlparse(source).path))
            if not os.path.exists(cached):
                _download(source, cached)
            source = cached
        with open(source.removeprefix("file://"), "rb") as f:
            return source, f.read()
    except (OSError, urllib.error.URLError, UsageError) as e:
        raise UsageError(f"cannot get {model} weights from {source}: {e}. {how_to_pass(model)}") from e
    except Exception as e:  # boto3's errors: no credentials, no such bucket or key, endpoint down
        if type(e).__module__.startswith(("botocore", "boto3")):
            if _is_s3_outage(e):
                raise StorageError(f"cannot get {model} weights from {source} after retries: {e}") from e
            raise UsageError(f"cannot get {model} weights from {source}: {e}. {how_to_pass(model)}") from e
        raise


def _is_s3_outage(error: Exception) -> bool:
    """Endpoint unreachable, timed out, or answering 5xx (boto3 has retried already)."""
    from botocore import exceptions

    if isinstance(error, exceptions.ClientError):
        return int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0) >= 500
    return isinstance(error, (exceptions.ConnectionError, exceptions.HTTPClientError))


def verify_hash(source: str, data: bytes) -> str:
    """The sha256 of data; raises if the file name carries a torchvision hash prefix that differs."""
    digest = hashlib.sha256(data).hexdigest()
    match = HASH_IN_NAME.search(os.path.basename(urlparse(source).path or source))
    if match and not digest.startswith(match.group(1)):
        raise UsageError(
            f"weights file {source} is corrupt or not the one its name promises: sha256 {digest[:12]}… "
            f"does not start with {match.group(1)}; delete it and fetch it again"
        )
    return digest


def state_dict_from_bytes(data: bytes) -> dict[str, torch.Tensor]:
    """Tensors only: weights_only=True refuses any pickled code."""
    import torch

    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"expected a state_dict, found {type(state).__name__}")
    return state


def build_model(model: str, data: bytes) -> torch.nn.Module:
    """The backbone with these weights loaded strictly, in eval mode."""
    from jobs.backbones import build_backbone  # torch: on the driver only

    net = build_backbone(model)
    net.load_state_dict(state_dict_from_bytes(data), strict=True)
    return net


def load_weights(model: str, weights: str | None, spark: Any = None) -> Weights:
    """Fetch, verify and test-load the checkpoint on the driver, so a bad file fails before any task runs."""
    source, data = fetch_bytes(model, weights, spark)
    digest = verify_hash(source, data)
    try:
        build_model(model, data)
    except Exception as e:
        reason = " ".join(str(e).split())[:300] or type(e).__name__
        raise UsageError(
            f"{source} is not a usable {model} checkpoint ({reason}). "
            f"Pass torchvision's {model} weights with --weights; {how_to_pass(model)}"
        ) from e
    return Weights(model=model, source=source, sha256=digest, data=data)
