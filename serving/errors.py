"""The one error type of the serving package and its mapping to gRPC and HTTP statuses."""

import logging

import grpc

logger = logging.getLogger("serving")

GRPC_CODES = {code.value[0]: code for code in grpc.StatusCode}
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
INTERNAL_MESSAGE = "Internal error while serving the request; the server log has the details."


class ServingError(Exception):
    """An error answered to the client with a gRPC status code and a message.

    Args:
        code: a `grpc.StatusCode`.
        message: the text the client receives; it says what was received, what was expected
            and how to fix it, and never holds internal exception text.
    """

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message):
    return ServingError(grpc.StatusCode.INVALID_ARGUMENT, message)


def exhausted(message):
    return ServingError(grpc.StatusCode.RESOURCE_EXHAUSTED, message)


def unavailable(message):
    return ServingError(grpc.StatusCode.UNAVAILABLE, message)


def deadline_exceeded():
    return ServingError(
        grpc.StatusCode.DEADLINE_EXCEEDED,
        "Deadline exceeded while the request waited for its batch or ran; raise the client's "
        "timeout, or lower --batch_timeout_ms.",
    )


def internal(error, where):
    """Log an unexpected exception with its traceback; return the generic INTERNAL error."""
    logger.error("Unexpected error in %s", where, exc_info=error)
    return ServingError(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)
