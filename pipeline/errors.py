"""Errors a user can act on, and the two kinds of per-image failure.

`UserError` carries a message that names the input at fault and what to do about it; entry points print it
without a traceback and exit with `EXIT_USER_ERROR`. Anything else is a bug and keeps its traceback.

`ImageError` is one image that could not be classified. It never stops a run: the image is listed in
errors.parquet. `transient` says whether the failure lies outside the image's bytes (I/O error, permission
denied, a timeout: the next run tries again) or in them (they do not decode: not tried again until they change).
"""

EXIT_USER_ERROR = 2
EXIT_NOT_CLASSIFIED = 1  # single-image mode: the image could not be classified


class UserError(Exception):
    """Bad input or configuration, found before (or instead of) heavy work."""


class ImageError(Exception):
    def __init__(self, kind: str, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.kind = kind  # e.g. UnidentifiedImageError, PermissionError, DecodeTimeout
        self.transient = transient


class ImageDecodeError(ImageError):
    """The bytes were read but are not an image we can classify."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(kind, message, transient=False)


class ImageReadError(ImageError):
    """The bytes could not be read."""
