"""What a failure means: UsageError for user mistakes (exit 2), and Spark's errors sorted into user
mistakes, storage failures (exit 3) and bugs."""

from __future__ import annotations

import re


class UsageError(Exception):
    """A user mistake or bad input: printed as one line, exit code 2, no traceback."""

    exit_code = 2


class StorageError(Exception):
    """Storage down or failing after its client's retries: one line, exit code 3; running again is safe."""

    exit_code = 3


# Java exceptions that mean storage could not be reached or kept failing after the client's own retries
STORAGE_FAILURE = re.compile(
    r"(?:org\.apache\.hadoop\.fs\.s3a\.AWS\w*Exception|com\.amazonaws\.SdkClientException"
    r"|java\.net\.(?:Connect|NoRouteToHost|SocketTimeout)Exception): (?P<message>[^\n]+)"
)
STORAGE_DENIED = re.compile(
    r"(?:java\.nio\.file\.AccessDeniedException|java\.io\.FileNotFoundException): (?P<message>(?:Bucket |s3a://)[^\n]+)"
)
# What a cluster user meets first, as one line each: the pattern in Spark's error text, and what it means
CLUSTER_MISTAKES = (
    (
        r"ClassNotFoundException: Class org\.apache\.hadoop\.fs\.s3a\.S3AFileSystem not found"
        r"|No FileSystem for scheme \"s3a\"",
        "no s3a connector: run `make s3a-jars` and keep the conf file's spark.jars line (or pass --packages "
        "org.apache.hadoop:hadoop-aws:VERSION for your Spark's Hadoop: README, Run on a cluster)",
    ),
    (
        r"NumberFormatException: For input string: \"\d+[a-z]+\"|ClassNotFoundException: Class software\.amazon\.awssdk"
        r"|NoSuchMethodError: '[^']*org\.apache\.hadoop\.fs\.s3a",
        "the s3a connector does not match this Spark's Hadoop: use the hadoop-aws of README's table, or keep the conf "
        "file's fs.s3a.* lines and credentials provider with `make s3a-jars`'s 3.3.1",
    ),
    (
        r"NoAuthWithAWSException|No AWS Credentials provided|Unable to load AWS credentials|No AWS credentials in",
        "no S3 credentials: export AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY where you submit, or give the nodes an "
        "instance profile",
    ),
    (
        r"PYTHON_VERSION_MISMATCH|Python in worker has different (?:minor )?version",
        "the executors run another Python than the driver: ship dist/env.tar.gz (spark.archives, in the conf files) "
        "and make pack-env with the driver's Python version, or point spark.pyspark.python at a matching one",
    ),
    (
        r"MemoryError|Cannot allocate memory|exceeding memory limits|Container killed .* memory"
        r"|Python worker exited unexpectedly \(crashed\)",
        "an executor's Python worker crashed, most often for want of memory: keep spark.executor.pyspark.memory >= "
        "2304m x spark.executor.cores (the conf files show the arithmetic), and the containers large enough",
    ),
    (
        r"All masters are unresponsive|InvalidClassException|local class incompatible"
        r"|Application has been killed\. Reason: Master removed",
        "the cluster did not accept this driver: is the master's address right, and does it run this pyspark's "
        "Spark version (README: Run on a cluster)?",
    ),
)
TASK_USAGE_ERROR = re.compile(r"jobs\.errors\.UsageError: (?P<message>[^\n]+)")  # raised in a task, on an executor
JAVA_CLASS_PREFIX = re.compile(r"\b(?:[a-z]\w*\.)+[A-Z]\w*(?:Exception|Error): ")
SDK_DETAILS = re.compile(r" \(Service: [^)]*\)|, S3 Extended Request ID: [^:]*")


def one_line(message: str, limit: int = 400) -> str:
    """A Java exception message without class names or the repeated cause S3A appends to it."""
    message = SDK_DETAILS.sub("", JAVA_CLASS_PREFIX.sub("", message.strip()))
    message = re.sub(r": (?P<cause>.+): (?P=cause)$", r": \g<cause>", message)
    return message[:limit]


def known_error_from_spark(error: Exception) -> UsageError | StorageError | None:
    """Spark's errors that are not bugs, as our own: bad input paths, storage refusing or failing."""
    name = type(error).__name__
    text = str(error)
    if name in ("AnalysisException", "IllegalArgumentException") and (
        "PATH_NOT_FOUND" in text or "Path does not exist" in text or "UNABLE_TO_INFER_SCHEMA" in text
    ):
        return UsageError(text.strip().splitlines()[0][:400])
    if raised := TASK_USAGE_ERROR.search(text):
        return UsageError(raised["message"])
    return cluster_mistake(f"{name}: {text}") or storage_error(text)  # pyspark names some Java errors by type alone


def cluster_mistake(text: str) -> UsageError | None:
    """A setup mistake of a cluster run (connector, credentials, Python, memory, Spark version) as one line."""
    for pattern, meaning in CLUSTER_MISTAKES:
        if found := re.search(pattern, text):
            return UsageError(f"{meaning} [{one_line(found.group(0), 120)}]")
    return None


def storage_error(text: str) -> UsageError | StorageError | None:
    """A Java error text as storage refusing access (a user mistake) or storage failing; None if neither."""
    if denied := STORAGE_DENIED.search(text):
        return UsageError(f"storage refused access: {one_line(denied['message'])}")
    if failure := STORAGE_FAILURE.search(text):
        return StorageError(
            f"storage failed after retries: {one_line(failure['message'])}; "
            "committed work is kept, run the same command again when storage is back"
        )
    return None


def is_storage_failure(error: Exception) -> bool:
    """True when error is storage refusing or failing, which must not be reported as bad input."""
    return storage_error(str(error)) is not None
