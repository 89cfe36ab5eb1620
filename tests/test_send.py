"""The send rule on the wire: DCMTK storescp as a destination that takes little or everything."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import uid

from appliance.dicom.scu import Destination, StoreSender
from tests.conftest import STORESCP, TEST_FILES, dcmtk_env, free_port


@pytest.fixture
def storescp(tmp_path: Path):
    """start(options) -> (port, output folder): a DCMTK storescp with the given proposal policy."""
    started = []

    def start(*options: str) -> tuple[int, Path]:
        out = tmp_path / f"received{len(started)}"
        out.mkdir()
        port = free_port()
        proc = subprocess.Popen([STORESCP, *options, "-aet", "PACS", "-od", str(out), str(port)],
                                env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started.append(proc)
        deadline = time.monotonic() + 10
        while not _listening(port):  # not C-ECHO: a -xf profile may not take Verification
            assert proc.poll() is None, f"storescp {' '.join(options)} exited {proc.returncode}"
            assert time.monotonic() < deadline, "storescp did not start"
            time.sleep(0.1)
        return port, out

    yield start
    for proc in started:
        proc.terminate()
        proc.wait(timeout=10)


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _received(out: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in sorted(out.iterdir())]


def test_implicit_only_destination_gets_everything_uncompressed(storescp) -> None:
    port, out = storescp("+xi")
    files = [TEST_FILES / n for n in ("MR_small_jp2klossless.dcm", "CT_small.dcm", "SC_rgb_rle.dcm",
                                      "JPEG2000.dcm")]
    results = StoreSender("GATEWAY").send(files, Destination("PACS", "127.0.0.1", port, ("lossless",)))
    assert [r.status for r in results] == [0, 0, 0, 0]
    assert {r.transfer_syntax for r in results} == {uid.ImplicitVRLittleEndian}
    received = {ds.SOPInstanceUID: ds for ds in _received(out)}
    for path in files:
        source = pydicom.dcmread(path)
        got = received[source.SOPInstanceUID]
        assert got.file_meta.TransferSyntaxUID == uid.ImplicitVRLittleEndian
        assert np.array_equal(got.pixel_array, source.pixel_array)


def test_lossless_destination_gets_its_syntax(storescp) -> None:
    port, out = storescp("+xt")  # prefers JPEG-LS lossless
    results = StoreSender("GATEWAY").send([TEST_FILES / "CT_small.dcm"],
                                          Destination("PACS", "127.0.0.1", port, ("JPEGLSLossless",)))
    assert results[0].status == 0 and results[0].transfer_syntax == uid.JPEGLSLossless
    (got,) = _received(out)
    assert got.file_meta.TransferSyntaxUID == uid.JPEGLSLossless
    assert np.array_equal(got.pixel_array, pydicom.dcmread(TEST_FILES / "CT_small.dcm").pixel_array)
    assert got.SOPInstanceUID == pydicom.dcmread(TEST_FILES / "CT_small.dcm").SOPInstanceUID


def test_lossy_destination_gets_a_derived_instance(storescp) -> None:
    port, out = storescp("+xw")  # prefers JPEG 2000 (lossy)
    source = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    (result,) = StoreSender("GATEWAY").send([TEST_FILES / "CT_small.dcm"],
                                            Destination("PACS", "127.0.0.1", port, ("lossy",)))
    assert result.status == 0 and result.transfer_syntax == uid.JPEG2000
    (got,) = _received(out)
    assert got.LossyImageCompression == "01"
    assert got.SOPInstanceUID == result.sop_instance_uid != source.SOPInstanceUID


def test_stored_lossy_is_never_sent_as_a_lossless_reencode(storescp) -> None:
    port, out = storescp("+xa")
    source = TEST_FILES / "SC_rgb_dcmtk_+eb+cy+np.dcm"  # JPEG baseline
    (result,) = StoreSender("GATEWAY").send([source], Destination("PACS", "127.0.0.1", port,
                                                                 ("lossless",)))
    assert result.status == 0
    assert result.transfer_syntax == uid.ExplicitVRLittleEndian, "decompressed, not re-encoded lossless"
    (got,) = _received(out)
    assert got.file_meta.TransferSyntaxUID == uid.ExplicitVRLittleEndian


def test_unreachable_destination_is_a_clear_error() -> None:
    with pytest.raises(ConnectionError, match=r"PACS@127\.0\.0\.1"):
        StoreSender("GATEWAY", timeout=3).send([TEST_FILES / "CT_small.dcm"],
                                               Destination("PACS", "127.0.0.1", free_port()))


def test_big_endian_destination_gets_little_endian_with_the_same_pixels(storescp) -> None:
    port, out = storescp("+xb")  # prefers Explicit VR Big Endian
    source = TEST_FILES / "CT_small.dcm"
    (result,) = StoreSender("GATEWAY").send([source], Destination("PACS", "127.0.0.1", port,
                                                                 ("ExplicitVRBigEndian",)))
    assert result.status == 0 and result.transfer_syntax == uid.ExplicitVRLittleEndian, "never produced"
    (got,) = _received(out)
    assert np.array_equal(got.pixel_array, pydicom.dcmread(source).pixel_array)


def test_palette_colour_is_never_sent_lossy(storescp, tmp_path: Path) -> None:
    from tests import bad_inputs

    port, out = storescp("+xy")  # prefers JPEG Baseline
    source = bad_inputs.save(bad_inputs.palette(), tmp_path / "palette.dcm")
    (result,) = StoreSender("GATEWAY").send([source], Destination("PACS", "127.0.0.1", port,
                                                                 ("JPEGBaseline8Bit",)))
    assert result.status == 0 and result.transfer_syntax == uid.ExplicitVRLittleEndian
    (got,) = _received(out)
    assert got.PhotometricInterpretation == "PALETTE COLOR"
    assert got.PixelData == pydicom.dcmread(source).PixelData


def test_corrupt_stream_fails_alone_with_its_reason(storescp, tmp_path: Path) -> None:
    from tests import bad_inputs

    port, out = storescp()  # uncompressed only: the JPEG must be decoded to be sent
    corrupt = bad_inputs.save(bad_inputs.corrupt_jpeg("garbage"), tmp_path / "garbage.dcm")
    files = [TEST_FILES / "CT_small.dcm", corrupt, TEST_FILES / "MR_small.dcm"]
    results = StoreSender("GATEWAY").send(files, Destination("PACS", "127.0.0.1", port))
    assert [r.status for r in results] == [0, None, 0]
    assert results[1].refused and "rejected by the decoder" in results[1].refused[0][1]
    assert len(_received(out)) == 2


CT, SR = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.88.33"


def _profile(directory: Path, syntaxes: list[str], sop_classes: tuple[str, ...]) -> Path:
    """A storescp -xf configuration taking these SOP classes in exactly these syntaxes."""
    listed = "\n".join(f"TransferSyntax{n} = {s}" for n, s in enumerate(syntaxes, 1))
    contexts = "\n".join(f"PresentationContext{n} = {sop}\\Only" for n, sop in enumerate(sop_classes, 1))
    path = directory / f"profile{len(list(directory.glob('profile*')))}.cfg"
    path.write_text(f"[[TransferSyntaxes]]\n[Only]\n{listed}\n\n[[PresentationContexts]]\n[Picky]\n"
                    f"{contexts}\n\n[[Profiles]]\n[Picky]\nPresentationContexts = Picky\n", encoding="ascii")
    return path


def _sr(tmp_path: Path) -> Path:
    """A small Basic Text SR (no pixels), stored in Explicit VR Little Endian."""
    from pydicom.dataset import FileMetaDataset

    ds = pydicom.Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = SR, pydicom.uid.generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    ds.PatientID, ds.Modality, ds.ValueType, ds.ContinuityOfContent = "SR1", "SR", "CONTAINER", "SEPARATE"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = SR, ds.SOPInstanceUID
    path = tmp_path / "sr.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_readme_sample_to_an_implicit_only_peer_sends_plain_ct_and_sr(storescp, tmp_path: Path) -> None:
    """accepts = ["lossless", "uncompressed"] against storescp +xi (Implicit VR Little Endian only):
    the CT and the SR arrive, in Implicit VR, with the same pixels."""
    port, out = storescp("+xi")
    files = [TEST_FILES / "CT_small.dcm", _sr(tmp_path)]
    results = StoreSender("GATEWAY").send(files, Destination("PACS", "127.0.0.1", port,
                                                             ("lossless", "uncompressed")))
    assert [(r.status, r.transfer_syntax) for r in results] == [(0, uid.ImplicitVRLittleEndian)] * 2
    received = {ds.SOPInstanceUID: ds for ds in _received(out)}
    ct = pydicom.dcmread(files[0])
    assert np.array_equal(received[ct.SOPInstanceUID].pixel_array, ct.pixel_array)
    assert received[pydicom.dcmread(files[1]).SOPInstanceUID].file_meta.TransferSyntaxUID == \
        uid.ImplicitVRLittleEndian


@pytest.mark.parametrize("only", [uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian,
                                  uid.JPEGLSLossless, uid.JPEGLosslessSV1])
def test_a_peer_taking_one_syntax_gets_it(storescp, tmp_path: Path, only: str) -> None:
    """storescp -xf profiles that take exactly one syntax; the destination lists all three classes.
    Plain CT goes as stored when taken, else in the one syntax taken; pixels equal."""
    profile = _profile(tmp_path, [only], (CT, SR))
    port, out = storescp("-xf", str(profile), "Picky")
    source = TEST_FILES / "CT_small.dcm"
    (result,) = StoreSender("GATEWAY").send([source], Destination(
        "PACS", "127.0.0.1", port, ("lossless", "lossy", "uncompressed")))
    assert (result.status, result.transfer_syntax) == (0, only)
    (got,) = _received(out)
    assert got.file_meta.TransferSyntaxUID == only
    assert np.array_equal(got.pixel_array, pydicom.dcmread(source).pixel_array)


def test_sr_never_goes_big_endian(storescp, tmp_path: Path) -> None:
    """A peer that prefers Big Endian over Little Endian: an SR stored in Explicit VR LE arrives as
    stored; Big Endian is proposed only when `accepts` names it."""
    profile = _profile(tmp_path, [uid.ExplicitVRBigEndian, uid.DeflatedExplicitVRLittleEndian,
                                  uid.ExplicitVRLittleEndian], (SR,))
    port, out = storescp("-xf", str(profile), "Picky")
    (result,) = StoreSender("GATEWAY").send([_sr(tmp_path)], Destination(
        "PACS", "127.0.0.1", port, ("lossless", "lossy", "uncompressed")))
    assert (result.status, result.transfer_syntax) == (0, uid.ExplicitVRLittleEndian)
    (got,) = _received(out)
    assert got.file_meta.TransferSyntaxUID == uid.ExplicitVRLittleEndian


def test_an_object_no_context_takes_fails_alone_with_its_reason(storescp, tmp_path: Path) -> None:
    """A JPEG-Lossless-SV1-only peer and a lossy JPEG 2000 object (never re-encoded): that object
    alone is not accepted, with its SOP class and the syntaxes proposed; the CT goes."""
    profile = _profile(tmp_path, [uid.JPEGLosslessSV1], (CT, "1.2.840.10008.5.1.4.1.1.7"))
    port, out = storescp("-xf", str(profile), "Picky")
    files = [TEST_FILES / "JPEG2000.dcm", TEST_FILES / "CT_small.dcm"]
    lossy, ct = StoreSender("GATEWAY").send(files, Destination("PACS", "127.0.0.1", port,
                                                               ("lossless", "uncompressed")))
    assert lossy.status is None and lossy.not_accepted and not lossy.unsendable
    assert lossy.detail == ("no presentation context accepted for SOP class Secondary Capture Image "
                            "Storage (1.2.840.10008.5.1.4.1.1.7); proposed Explicit VR Little Endian, "
                            "Implicit VR Little Endian")
    assert (ct.status, ct.transfer_syntax) == (0, uid.JPEGLosslessSV1)
    (got,) = _received(out)
    assert np.array_equal(got.pixel_array, pydicom.dcmread(files[1]).pixel_array)
