"""Cache entries between the run's local working copy and the store (see `store.py` for the layout).

`pull` brings a sealed entry down (every file checked against its manifest as it arrives); `push` sends a local
entry up and seals it there with a conditional create of its manifest, which exactly one writer wins.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from .cache import MANIFEST
from .failpoints import failpoint
from .files import read_json, remove, sha256_file, tmp_name, write_json
from .store import Store, upload_id

log = logging.getLogger(__name__)

UPLOAD = "upload"  # the manifest's key naming the prefix its files were uploaded under


def manifest_key(stage: str, fingerprint: str) -> str:
    return f"{stage}/{fingerprint}/{MANIFEST}"


def pull(store: Store, stage: str, fingerprint: str, final: Path) -> bool:
    """Bring the entry sealed in the store into `final` (replacing what is there); False when there is none.
    A damaged entry (a file missing or not matching its manifest) is unsealed there, to be computed again."""
    manifest = store.get_json(manifest_key(stage, fingerprint))
    if manifest is None:
        return False
    tmp = final.parent / tmp_name("pull")
    tmp.mkdir(parents=True)
    try:
        for name, meta in manifest["files"].items():
            path = tmp / name
            path.parent.mkdir(parents=True, exist_ok=True)
            found = store.download(f"{stage}/{fingerprint}/{manifest[UPLOAD]}/{name}", path)
            if not found or path.stat().st_size != meta["size"] or sha256_file(path) != meta["sha256"]:
                log.warning("cache entry %s/%s in %s: %s does not match its manifest; computing it again",
                            stage, fingerprint[:12], store.url, name)
                store.delete(manifest_key(stage, fingerprint))
                return False
            os.utime(path, ns=(meta["mtime_ns"], meta["mtime_ns"]))  # so that verifying it is a stat
        write_json(tmp / MANIFEST, {k: v for k, v in manifest.items() if k != UPLOAD})
        remove(final)
        os.replace(tmp, final)
        return True
    finally:
        remove(tmp)


def push(store: Store, stage: str, fingerprint: str, final: Path) -> bool:
    """Seal the local entry `final` in the store; False when the store had it already (from another run)."""
    key = manifest_key(stage, fingerprint)
    if store.get(key) is not None:
        return False
    manifest = read_json(final / MANIFEST)
    upload = upload_id()
    for name in manifest["files"]:
        store.upload(final / name, f"{stage}/{fingerprint}/{upload}/{name}")
    failpoint("store.before_seal")
    if store.create(key, json.dumps({**manifest, UPLOAD: upload}).encode()):
        return True
    for name in manifest["files"]:  # another run sealed it between our check and our create
        store.delete(f"{stage}/{fingerprint}/{upload}/{name}")
    return False
