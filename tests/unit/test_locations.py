"""Where the cache and outputs live: a killed run's local working copy of a cache in a bucket is swept by the next
run on the same host; a live run's, and another host's, are left alone."""

import subprocess
import tempfile
from pathlib import Path

from pipeline import locations
from pipeline.engine.files import owner_tag


def test_working_copies_of_exited_runs_are_swept(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.Popen(["true"])
    gone.wait()
    host = owner_tag().rsplit("-", 1)[0]
    dead = Path(tempfile.mkdtemp(prefix=f"{locations.WORKING_COPY}{host}-{gone.pid}-"))
    (dead / "export_towers").mkdir()
    live = Path(tempfile.mkdtemp(prefix=f"{locations.WORKING_COPY}{owner_tag()}-"))
    elsewhere = Path(tempfile.mkdtemp(prefix=f"{locations.WORKING_COPY}other_host-1-"))
    locations._sweep_working_copies()
    assert not dead.exists() and live.exists() and elsewhere.exists()
