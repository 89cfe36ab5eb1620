"""`appliance import` on folders that are not a clean CD: a FIFO, what it cannot read, a huge sparse file.

The unreadable cases run the import as the user `nobody` (the tests run as
root, who reads everything): a subprocess loads the appliance, then drops
to uid 65534 before importing from a folder under /tmp.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, TEST_FILES, run_cli, write_config

NOBODY = 65534
AS_NOBODY = """
import os, sys
import appliance.cli, appliance.commands.importer, appliance.archive.ingest, appliance.transcode.pipeline
import pydicom, numpy, json, tomllib, encodings.idna
os.setgroups([]); os.setgid(65534); os.setuid(65534)
sys.exit(appliance.cli.main(sys.argv[1:]))
"""


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A folder `nobody` can reach (pytest's tmp_path lies under a root-only folder)."""
    path = Path(tempfile.mkdtemp(prefix="import-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    for folder, _dirs, _files in os.walk(path):
        os.chmod(folder, 0o755)
    shutil.rmtree(path)


def test_a_fifo_is_skipped_and_the_rest_imported(tmp_path: Path) -> None:
    folder = tmp_path / "share"
    folder.mkdir()
    os.mkfifo(folder / "A_PIPE")  # sorted first: the import used to hang on it forever
    shutil.copy(TEST_FILES / "CT_small.dcm", folder / "B_CT")
    config = write_config(tmp_path / "a.toml", {"data_dir": str(tmp_path / "data"), "min_free_mb": 1})
    started = time.monotonic()
    result = run_cli(config, "import", str(folder), check=False, timeout=60)
    assert time.monotonic() - started < 30
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"skipped   {folder / 'A_PIPE'}: not a regular file (a FIFO)" in result.stdout
    assert "imported 1, already present 0, replaced 0, skipped 1, rejected 0, failed 0" in result.stdout


def test_unreadable_file_and_folder_fail_the_import_as_nobody(public_dir: Path) -> None:
    share = public_dir / "share"
    (share / "locked").mkdir(parents=True)
    shutil.copy(TEST_FILES / "CT_small.dcm", share / "locked" / "IM1")
    shutil.copy(TEST_FILES / "MR_small.dcm", share / "IM2")
    shutil.copy(TEST_FILES / "JPEG2000.dcm", share / "IM3")
    (share / "IM3").chmod(0o000)
    (share / "locked").chmod(0o000)
    data = public_dir / "data"
    data.mkdir()
    os.chown(data, NOBODY, NOBODY)
    config = write_config(public_dir / "a.toml", {"data_dir": str(data), "min_free_mb": 1})
    config.chmod(0o644)
    result = subprocess.run([sys.executable, "-c", AS_NOBODY, "--config", str(config), "import", str(share)],
                            capture_output=True, text=True, timeout=120, cwd=REPO)
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert f"failed    {share / 'IM3'}: cannot read: Permission denied" in out
    assert f"failed    {share / 'locked'}: cannot list folder: Permission denied" in out
    assert "imported 1, already present 0, replaced 0, skipped 0, rejected 0, failed 2" in out


def test_a_huge_sparse_file_is_refused_without_a_copy(tmp_path: Path) -> None:
    """2 GB of holes with DICM at byte 128: refused with the reason, nothing in quarantine or temp."""
    folder = tmp_path / "stick"
    folder.mkdir()
    huge = folder / "HUGE"
    with open(huge, "wb") as fp:
        fp.write(b"\0" * 128 + b"DICM")
        fp.truncate(2 * 1024**3)
    assert os.stat(huge).st_blocks * 512 < 1_000_000, "the test file must be sparse"
    shutil.copy(TEST_FILES / "CT_small.dcm", folder / "IM1")
    data = tmp_path / "data"
    config = write_config(tmp_path / "a.toml", {"data_dir": str(data), "min_free_mb": 1})
    result = run_cli(config, "import", str(folder), check=False, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    (line,) = [line for line in result.stdout.splitlines() if "HUGE" in line]
    assert line.startswith(f"rejected  {huge}: ") and "over the quarantine limit" in line, line
    assert line.endswith("over the quarantine limit of 256,000,000: nothing copied"), line
    assert "imported 1, already present 0, replaced 0, skipped 0, rejected 1, failed 0" in result.stdout
    used = sum(p.stat().st_blocks * 512 for p in data.rglob("*") if p.is_file())
    assert used < 10_000_000, f"{used} bytes written under the data folder"
    assert [p.name for p in data.rglob("*.dcm")] == [p.name for p in (data / "archive").rglob("*.dcm")]


def test_an_oversized_rejected_object_is_not_kept_in_quarantine(tmp_path: Path, monkeypatch, caplog) -> None:
    """The same limit guards the door for every producer (a C-STORE of a huge broken object too)."""
    from appliance.archive import ingest, quarantine

    monkeypatch.setattr(quarantine, "MAX_BYTES", 1000)
    archive = ingest.Archive(tmp_path / "data")
    broken = (TEST_FILES / "rtdose.dcm").read_bytes()[:-2000]
    with pytest.raises(ingest.Rejected) as caught:
        archive.ingest_bytes(broken, source="test")
    assert caught.value.quarantined is None
    assert not list((tmp_path / "data").rglob("*.dcm")) and not list(archive.temp_dir.iterdir())
    assert "over the quarantine limit of 1,000: not kept" in caplog.text
