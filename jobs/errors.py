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
    return storage_error(text)


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
