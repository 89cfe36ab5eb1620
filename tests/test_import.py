"""`appliance import`: a CD from another hospital goes through the same door as C-STORE."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from tests.conftest import TEST_FILES, dataset_bytes, run_cli, storescu, write_config


def _make_cd(root: Path) -> dict[str, int]:
    """A CD as hospitals burn them: DICOMDIR, files without extension, a viewer, a README."""
    (root / "DICOM" / "ST000001").mkdir(parents=True)
    for n, name in enumerate(["CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "SC_rgb_rle.dcm"]):
        shutil.copy(TEST_FILES / name, root / "DICOM" / "ST000001" / f"IM{n:05d}")
    # A dataset without preamble and file meta, as older media have them.
    raw = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    raw.SOPInstanceUID = generate_uid()
    del raw.file_meta
    raw.preamble = None
    pydicom.dcmwrite(root / "DICOM" / "ST000001" / "RAW00001", raw, enforce_file_format=False)
    shutil.copy(TEST_FILES / "dicomdirtests" / "DICOMDIR", root / "DICOMDIR")
    (root / "README.TXT").write_text("Viewer: run VIEWER.EXE\n")
    (root / "VIEWER.EXE").write_bytes(b"MZ" + b"\0" * 500)
    data = (TEST_FILES / "rtdose.dcm").read_bytes()
    (root / "DICOM" / "BROKEN01").write_bytes(data[:-2000])
    return {"imported": 5, "skipped": 3, "rejected": 1}


def test_import_a_cd(tmp_path: Path) -> None:
    cd = tmp_path / "cd"
    expected = _make_cd(cd)
    summary = ", ".join(f"{k} {expected[k]}" for k in ("imported", "skipped", "rejected"))
    assert summary == "imported 5, skipped 3, rejected 1"
    config = write_config(tmp_path / "a.toml", {"data_dir": str(tmp_path / "data"), "min_free_mb": 1})
    result = run_cli(config, "import", str(cd), check=False)
    assert result.returncode == 1, "a rejected file must show in the exit code"
    out = result.stdout
    assert "imported 5, already present 0, replaced 0, skipped 3, rejected 1, failed 0" in out
    assert "skipped" in out and "DICOMDIR (media index, not an image)" in out
    assert "README.TXT: not a DICOM file" in out
    assert "BROKEN01" in out and "truncated" in out
    rows = [json.loads(line) for line in run_cli(config, "find", "--json").stdout.splitlines()]
    assert len(rows) == 5
    assert {r["source"].split(" ", 1)[0] for r in rows} == {"import"}
    for row in rows:
        assert Path(row["path"]).is_relative_to(tmp_path / "data" / "archive")
    assert list((tmp_path / "data" / "quarantine").rglob("*.dcm"))
    # A second import of the same CD changes nothing.
    again = run_cli(config, "import", "--json", str(cd), check=False)
    assert json.loads(again.stdout) == {"imported": 0, "present": 5, "replaced": 0, "skipped": 3,
                                        "rejected": 1, "failed": 0}


def test_import_while_the_service_runs(appliance, tmp_path: Path) -> None:
    """The same dataset under another file meta (another implementation) is the same image."""
    assert storescu(appliance.port, [TEST_FILES / "CT_small.dcm"]).returncode == 0
    (stored,) = appliance.find()
    copy = tmp_path / "copy.dcm"
    ds = pydicom.dcmread(stored["path"])
    ds.file_meta.ImplementationVersionName = "OTHER_VIEWER"
    ds.file_meta.SourceApplicationEntityTitle = "HOSPITAL_B"
    ds.save_as(copy)
    assert dataset_bytes(copy) == dataset_bytes(Path(stored["path"]))
    result = appliance.cli("import", str(copy), str(TEST_FILES / "MR_small.dcm"))
    assert "imported 1, already present 1, replaced 0" in result.stdout
    rows = appliance.find()
    assert len(rows) == 2 and stored in rows


def test_import_names_a_missing_path(tmp_path: Path) -> None:
    config = write_config(tmp_path / "a.toml", {"data_dir": str(tmp_path / "data")})
    result = run_cli(config, "import", str(tmp_path / "nope"), check=False)
    assert result.returncode == 2 and "no such file or folder" in result.stderr
