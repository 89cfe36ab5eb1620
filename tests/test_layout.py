"""Archive layout: hostile values from senders stay inside the archive and never collide."""

from __future__ import annotations

import datetime as dt
from pathlib import PurePosixPath

import pytest

from appliance.archive.layout import MAX_COMPONENT, instance_path, safe_component

RECEIVED = dt.datetime(2026, 11, 23, 10, 0)


def path_for(patient_id: str, modality: str = "CR", study_date: str = "20261120",
             uid: str = "1.2.3.4") -> PurePosixPath:
    return instance_path(study_date=study_date, modality=modality, patient_id=patient_id,
                         sop_instance_uid=uid, received=RECEIVED)


def test_clinic_layout() -> None:
    assert path_for("12345") == PurePosixPath("20261120/CR-12345/1.2.3.4.dcm")


HOSTILE = ["../../etc", "..", ".", "/etc/passwd", "a/b", "a\\b", "山田太郎", "ID\x00X", "x" * 300,
           "", " ", "~", "NOID", "NOID~", "C:\\x", "a\nb", "\u202eevil", "%2e%2e"]


@pytest.mark.parametrize("patient_id", HOSTILE)
def test_hostile_ids_stay_inside_the_archive(patient_id: str) -> None:
    path = path_for(patient_id)
    assert len(path.parts) == 3
    folder = path.parts[1]
    assert "/" not in folder and "\\" not in folder and "\x00" not in folder
    assert not folder.startswith(".") and folder not in ("", ".", "..")
    assert len(folder.encode()) <= MAX_COMPONENT + 3  # "CR-" + component
    assert folder.isascii() and folder.isprintable()


def test_different_ids_never_share_a_folder() -> None:
    ids = [*HOSTILE, "../../etd", "x" * 299, "x" * 301, "山田花子", "ID\x00Y", "ID_X", "a_b", "a b"]
    folders = {}
    for patient_id in ids:
        folder = safe_component(patient_id, "NOID")
        stripped = patient_id.strip()
        assert folders.setdefault(folder, stripped) == stripped, (patient_id, folders[folder])


def test_bad_study_date_falls_back_to_the_day_received() -> None:
    assert path_for("1", study_date="").parts[0] == "20261123"
    assert path_for("1", study_date="20261340").parts[0] == "20261123"
    assert path_for("1", study_date="../../").parts[0] == "20261123"


def test_hostile_uid_and_modality() -> None:
    path = path_for("1", modality="../CT", uid="../../../x")
    assert path.parts[1].startswith("_CT~") or path.parts[1].startswith("__CT~")
    assert path.name.endswith(".dcm") and "/" not in path.name and not path.name.startswith(".")
