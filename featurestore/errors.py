"""Errors a user can cause. The CLI prints their message as one line and exits non-zero."""


class UserError(Exception):
    """Something the user can fix (bad path, unknown name, missing weights...). Message says what to do."""

    exit_code = 2


class StoreError(UserError):
    """The feature store is missing, incomplete, or incompatible."""


class BackboneError(UserError):
    """Unknown backbone, or its weights cannot be found."""


class DatasetError(UserError):
    """Unknown dataset, missing root, empty dataset."""


def one_line(exc: BaseException, limit: int = 160, *, with_type: bool = True) -> str:
    """An exception as one short line, for messages that quote it (torch's load errors, zarr's and PIL's
    span many lines or quote raw bytes): whitespace collapsed, `TypeName: message` (only the message with
    `with_type=False`; the type name alone when there is no message), cut to `limit` characters."""
    text = " ".join(str(exc).split())
    if not text:
        text = type(exc).__name__
    elif with_type:
        text = f"{type(exc).__name__}: {text}"
    return text if len(text) <= limit else text[:limit - 3] + "..."
