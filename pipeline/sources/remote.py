"""Remote storage through fsspec: one filesystem per process, reads with timeouts and bounded retries.

Credentials and endpoints come from the standard environment (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`; `GOOGLE_APPLICATION_CREDENTIALS` for GCS), anything else from
`dataset.storage_options`. A filesystem is made lazily in the process that uses it: async filesystems (s3fs,
gcsfs, http) hold an event loop that does not survive a fork into a decode worker.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Iterator, TypeVar

from ..errors import ImageReadError, UserError

log = logging.getLogger(__name__)

T = TypeVar("T")
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "http": "http", "https": "http"}
PACKAGES = {"s3": "s3fs", "gcs": "gcsfs", "http": "aiohttp"}


def is_url(location: str) -> bool:
    return "://" in str(location) and not str(location).startswith("file://")


def scheme(url: str) -> str:
    return str(url).split("://", 1)[0].lower()


class Remote:
    """Picklable access to one fsspec protocol: reads with retries, the filesystem made per process."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None, retries: int, timeout: float) -> None:
        self.protocol = scheme(url)
        self.options = dict(storage_options or {})
        self.retries, self.timeout = retries, timeout
        self._fs, self._pid = None, None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fs": None, "_pid": None}

    @property
    def fs(self):
        if self._fs is None or self._pid != os.getpid():
            self._fs, self._pid = _filesystem(self.protocol, self.options, self.timeout), os.getpid()
        return self._fs

    def with_retries(self, what: str, call: Callable[[], T]) -> T:
        """`call()`, tried again with backoff (0.5 s, 1 s, 2 s, ...) on failures that may pass; ImageReadError
        when it keeps failing (transient) or cannot succeed (a missing object: not transient)."""
        for attempt in range(self.retries + 1):
            try:
                return call()
            except FileNotFoundError as exc:
                raise ImageReadError("FileNotFoundError", f"{what}: not found ({exc})", transient=False) from None
            except IsADirectoryError as exc:
                raise ImageReadError("IsADirectoryError", f"{what}: {exc}", transient=False) from None
            except Exception as exc:  # noqa: BLE001 - network errors come in many types; all are worth a retry
                if attempt == self.retries:
                    raise ImageReadError(type(exc).__name__, f"{what}: {exc or repr(exc)} (after {attempt + 1} "
                                         "attempts)", transient=True) from None
                log.debug("retrying %s after %s", what, exc)
                time.sleep(0.5 * 2 ** attempt)
        raise AssertionError("unreachable")

    def read(self, path: str) -> bytes:
        return self.with_retries(_shown(self.protocol, path), lambda: self.fs.cat_file(path))


def list_objects(remote: Remote, prefix: str, page: int = 1000) -> Iterator[tuple[str, dict]]:
    """(path, info) of every object under `prefix`, in no promised order. On S3 a page of the listing at a time
    (a 100M-object bucket is never held whole); other stores through fsspec's `find`, which lists them whole."""
    if remote.protocol not in ("s3", "s3a"):
        yield from remote.fs.find(prefix, detail=True).items()
        return
    from fsspec.asyn import sync

    bucket, _, key = prefix.strip("/").partition("/")
    objects = remote.fs._iterdir(bucket, delimiter="", prefix=key + "/" if key else "")  # noqa: SLF001 - s3fs's paged listing

    async def next_page() -> list[dict]:
        found: list[dict] = []
        async for info in objects:
            found.append(info)
            if len(found) == page:
                break
        return found

    while found := sync(remote.fs.loop, next_page):
        yield from ((info["name"], info) for info in found)


def _filesystem(protocol: str, options: dict[str, Any], timeout: float):
    import fsspec

    kind = EXTRAS.get(protocol)
    # A fresh instance: fsspec's cache keys on the arguments, not on the environment the credentials come from.
    options = {"skip_instance_cache": True, **options}
    try:
        if kind == "s3":
            defaults = {"config_kwargs": {"connect_timeout": timeout, "read_timeout": timeout,
                                          "retries": {"max_attempts": 1}}}  # our own retries, with backoff
            return fsspec.filesystem(protocol, **_merge(defaults, options))
        if kind == "http":
            import aiohttp

            defaults = {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=timeout)}}
            return fsspec.filesystem(protocol, **_merge(defaults, options))
        return fsspec.filesystem(protocol, **options)
    except ImportError as exc:
        raise missing_plugin(protocol, exc) from None
    except ValueError as exc:
        raise UserError(f"no fsspec filesystem for {protocol}:// ({exc})") from None


def missing_plugin(protocol: str, exc: ImportError) -> UserError:
    """The error for a protocol whose fsspec plug-in is not installed, naming the extra that brings it."""
    kind = EXTRAS.get(protocol)
    return UserError(f"{protocol}:// needs {PACKAGES.get(kind, 'an fsspec plug-in')}: pip install -e "
                     f"'.[{kind or protocol}]' ({exc})")


def _merge(defaults: dict, options: dict) -> dict:
    merged = dict(defaults)
    for key, value in options.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def strip_protocol(url: str) -> str:
    """The path a filesystem of the URL's protocol takes: the URL without its scheme for object stores, the
    whole URL for http(s) (fsspec's own rule)."""
    import fsspec

    try:
        return fsspec.get_filesystem_class(scheme(url))._strip_protocol(str(url))
    except (ImportError, ValueError):
        return str(url).split("://", 1)[1]


def _shown(protocol: str, path: str) -> str:
    return path if "://" in path else f"{protocol}://{path}"


def check_reachable(remote: Remote, path: str, what: str) -> None:
    """Global problems stop the run here, before any image is read: a missing bucket, refused credentials,
    an unreachable endpoint."""
    try:
        remote.fs.info(path)
    except FileNotFoundError:
        bucket = path.split("/", 1)[0]
        if remote.protocol in ("s3", "s3a", "gs", "gcs") and not _bucket_exists(remote, bucket):
            raise UserError(f"{what}: bucket '{bucket}' does not exist ({_shown(remote.protocol, path)}); check "
                            "the name, and AWS_ENDPOINT_URL / storage_options if it lives on another "
                            "endpoint") from None
        raise UserError(f"{what}: {_shown(remote.protocol, path)} not found") from None
    except PermissionError as exc:
        raise UserError(f"{what}: access to {_shown(remote.protocol, path)} refused ({exc}); check the credentials "
                        "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS) or "
                        "dataset.storage_options") from None
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - connection refused, DNS, TLS...
        raise UserError(f"{what}: cannot reach {_shown(remote.protocol, path)}: {type(exc).__name__}: {exc}") from None


def _bucket_exists(remote: Remote, bucket: str) -> bool:
    try:
        remote.fs.ls(bucket)
        return True
    except FileNotFoundError:
        return False
    except Exception:  # noqa: BLE001 - refused or unreachable: reported by the caller's own message
        return True
