"""The one exception type that means "the user gave us something wrong" (exit code 2)."""

from __future__ import annotations


class BadInput(Exception):
    """Bad input or usage: the CLI prints the message (no traceback) and exits with code 2.

    The message must name what is wrong and where: the file, the record (line or id) and the field.
    """

    def __init__(self, message: str, *, path: object = None, record: object = None, field: str | None = None):
        where = []
        if path is not None:
            where.append(str(path))
        if record is not None:
            where.append(f"record {record}")
        if field is not None:
            where.append(f"field {field!r}")
        self.path, self.record, self.field = path, record, field
        self.message = message
        super().__init__(f"{': '.join([', '.join(where), message]) if where else message}")

    def __reduce__(self) -> tuple:
        """Pickled whole (path, record and field too): a worker process hands it back as it is."""
        return _rebuild_bad_input, (type(self), self.message, self.path, self.record, self.field)


def _rebuild_bad_input(cls: type, message: str, path: object, record: object, field: str | None) -> BadInput:
    return cls(message, path=path, record=record, field=field)


class EndpointError(RuntimeError):
    """A model endpoint request that failed for good (retries exhausted, a reply that is not an
    answer, a 400 the server will not accept): exit code 1, one line. Raised by the OpenAI path.

    The message names the model, the base URL and the HTTP status, never the key.
    """

    def __init__(self, message: str, *, status: int | None = None, retryable: bool = False):
        super().__init__(message)
        self.status = status
        self.retryable = retryable
