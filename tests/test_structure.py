"""The completeness walk: every intact test object passes, every truncation is caught."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from appliance.archive.record import UnreadableObject, read_record
from appliance.dicom.structure import IncompleteDataset, check_part10
from tests.conftest import CHARSET_FILES, TEST_FILES

# pydicom's deliberately broken objects.
BROKEN = {"MR_truncated.dcm", "rtplan_truncated.dcm", "meta_missing_tsyntax.dcm", "SC_rgb_jpeg.dcm"}


def _part10_files() -> list[Path]:
    files = []
    for path in sorted([*TEST_FILES.glob("*.dcm"), *CHARSET_FILES.glob("*.dcm")]):
        with open(path, "rb") as fp:
            if fp.read(132)[128:132] == b"DICM" and path.name not in BROKEN:
                files.append(path)
    return files


PART10 = _part10_files()


def test_there_are_many_objects_to_check() -> None:
    assert len(PART10) > 80


@pytest.mark.parametrize("path", PART10, ids=lambda p: p.name)
def test_intact_objects_pass_and_truncations_fail(path: Path) -> None:
    data = path.read_bytes()
    walk = check_part10(io.BytesIO(data), len(data))
    assert walk.transfer_syntax
    deflated = walk.transfer_syntax in ("1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.1.100")
    cuts = [len(data) - 1, len(data) - 3] if not deflated else []
    for cut in cuts:
        with pytest.raises(IncompleteDataset):
            check_part10(io.BytesIO(data[:cut]), cut)


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_pydicoms_broken_objects_are_refused(name: str) -> None:
    data = (TEST_FILES / name).read_bytes()
    with pytest.raises(IncompleteDataset):
        check_part10(io.BytesIO(data), len(data))


def test_image_cut_exactly_before_its_pixel_data_is_refused() -> None:
    """A cut on an element boundary is invisible to the walk; the missing pixels are not."""
    data = (TEST_FILES / "CT_small.dcm").read_bytes()
    cut = data.index(b"\xe0\x7f\x10\x00")
    with pytest.raises(UnreadableObject, match="no pixel data"):
        read_record(io.BytesIO(data[:cut]), cut, "test")


def test_not_dicom() -> None:
    with pytest.raises(IncompleteDataset, match="not a DICOM Part 10 file"):
        check_part10(io.BytesIO(b"hello"), 5)
