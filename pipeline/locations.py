"""Where the cache and the run's outputs live: local folders, or object storage (`s3://`, `gs://`).

On object storage the run works in local temporary folders and the store holds what lasts: the cache through the
runner's mirror (`engine/store.py`), the outputs uploaded when the run is done, one PUT per file, so a reader sees
each file whole or not at all, and `res.json` last (its presence says the others are current). Credentials and
endpoints come from the standard environment (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, ...), never the config.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .engine.files import has_exited, owner_tag, remove
from .engine.store import Store
from .errors import UserError
from .sources.remote import is_url, missing_plugin

log = logging.getLogger(__name__)

LAST = "res.json"
WORKING_COPY = "pipeline-cache-"  # + owner tag: a run's local working copy of a cache in a store


@dataclass
class Place:
    """A folder the run writes into, and the store it stands for when the user named one."""

    local: Path
    store: Store | None = None

    def cleanup(self) -> None:
        """Remove the local working folder of a store (the store keeps what matters)."""
        if self.store is not None:
            remove(self.local)


def cache_place(value: str) -> Place:
    """CACHE=: a folder, or a bucket prefix with a local working copy in a temporary folder of this run."""
    if not is_url(value):
        return Place(check_writable(Path(value), "cache_dir (CACHE=)"))
    store = _reachable(value, "cache_dir (CACHE=)")
    _sweep_working_copies()
    return Place(Path(tempfile.mkdtemp(prefix=f"{WORKING_COPY}{owner_tag()}-")), store)


def _sweep_working_copies() -> None:
    """Remove the working copies that killed runs on this host left (an export in one can be gigabytes)."""
    for leftover in Path(tempfile.gettempdir()).glob(f"{WORKING_COPY}*"):
        parts = leftover.name[len(WORKING_COPY):].split("-")
        if len(parts) == 3 and has_exited(f"{parts[0]}-{parts[1]}"):
            log.info("removing %s, the cache working copy of a run that has exited", leftover)
            remove(leftover)


def output_place(value: str, local_run_dir: str | None) -> Place:
    """OUT=: a folder, or a bucket prefix that the run's folder (Hydra's, or a temporary one) is uploaded to."""
    if not is_url(value):
        return Place(check_writable(Path(value), "the run directory (OUT=)"))
    store = _reachable(value, "the run directory (OUT=)")
    local = Path(local_run_dir) if local_run_dir else Path(tempfile.mkdtemp(prefix="pipeline-out-"))
    return Place(check_writable(local, "the local run directory"), store)


def upload_outputs(place: Place) -> None:
    """Every file of the local run folder into the store, `res.json` last."""
    files = sorted((p for p in place.local.rglob("*") if p.is_file()), key=lambda p: (p.name == LAST, str(p)))
    for path in files:
        place.store.upload(path, path.relative_to(place.local).as_posix())
    log.info("outputs uploaded to %s: %d files; %s", place.store.url, len(files), place.store.request_line())


def check_writable(directory: Path, what: str) -> Path:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        raise UserError(f"cannot write to {what} '{directory}': {exc.strerror or exc}; choose a writable "
                        "folder") from None
    return directory


def _reachable(url: str, what: str) -> Store:
    store = Store(url)
    try:
        store.check()
    except ImportError as exc:
        raise missing_plugin(store.protocol, exc) from None
    except Exception as exc:  # noqa: BLE001 - a store fails in many ways (no bucket, no endpoint, no credentials)
        raise UserError(f"cannot reach {what} {url}: {exc}. Check the bucket name, and the endpoint and "
                        "credentials in the environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...)") from None
    return store
