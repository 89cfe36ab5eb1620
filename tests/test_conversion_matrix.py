"""The conversion matrix: every input kind × every syntax the appliance writes × each path.

Every result is either the same image as the source, as DCMTK or GDCM and
pydicom decode both (tests/matrix_judge.py), or nothing changed: the
original kept as received with one WARNING naming the object (for
`appliance transcode`: a non-zero exit, a one-line error, no output file).
dciodvfy finds no error in an output that it did not find in its input.

Paths and how much of the matrix each runs (58 kinds; about a minute and a
half in all on two cores, most of it DCMTK/GDCM/dciodvfy subprocesses):

- shared conversion (`convert.convert`, what every path calls): the full
  cross product, 58 kinds × 16 target syntaxes, in process;
- store format (`[storage] format`, the convert service's `Converter` in
  process on a real archive): the full cross product of the 13
  configurations a site can write (uncompressed; lossless and lossy with
  each syntax);
- forward: a 20-cell slice through the network, the forwarder's worker
  (`DestinationWorker`, whose `StoreSender` converts) sending to a DCMTK
  storescp that accepts the one target syntax only (an association
  profile); HTJ2K is not in it, DCMTK 3.6.7 cannot receive it;
- `appliance transcode IN OUT --to SYNTAX` as a subprocess: a 28-cell
  slice, one cell per trap (byte order, sign, high bits, colour, palette,
  corrupt, mislabelled and size-mismatched streams, 32-bit and float data).

Refusing everything is not a pass: every image the decoders agree on must
be written uncompressed (Explicit VR Big Endian excepted: retired, PS3.5
A.3, a writer may decline it), and plain images (8/12/16-bit grey, RGB)
must take every lossless target and the lossy ones their depth allows.
Lossless results must keep the values sample for sample in the same
colour space; the Planar Configuration may change (compressed syntaxes fix
it), which the comparison allows by reading each file by its own.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom import uid

from appliance.archive.ingest import Archive
from appliance.config import DestinationSettings, ForwardSettings, StorageSettings
from appliance.forward.forwarder import DestinationWorker
from appliance.forward.queue import ForwardQueue
from appliance.transcode.convert import CannotConvert, Quality, convert
from appliance.transcode.pipeline import Converter, StorePolicy
from appliance.transcode.policy import send_candidates
from appliance.transcode.syntaxes import LOSSLESS, LOSSY, UNCOMPRESSED
from tests.conftest import run_cli, write_config
from tests.conversion_inputs_encoded import KINDS
from tests.matrix_judge import Source, Sources, output_problems, read, same_pixels
from tests.one_syntax_peer import OneSyntaxPeers

TARGETS = [*UNCOMPRESSED, *LOSSLESS, *LOSSY]
QUALITY = Quality(90)


def name(syntax: str) -> str:
    return uid.UID(syntax).keyword or syntax


# Plain images every lossless target and the matching lossy ones must take.
PLAIN = {"u8": 8, "u12": 12, "u16": 16, "rgb_planar0": 8}
# 12-bit data to HTJ2K lossy is not required: the only HTJ2K encoder here (OpenJPH through
# imagecodecs) codes 12-bit samples at 16-bit precision and cannot be told otherwise, so a
# 4095 pixel may come back as 4099, outside Bits Stored; the check refuses such a result and
# the original is kept with the WARNING, which the judge still demands of that cell.
LOSSY_FOR_BITS = {8: (uid.JPEGBaseline8Bit, uid.JPEGLSNearLossless, uid.JPEG2000, uid.HTJ2K),
                  12: (uid.JPEGExtended12Bit, uid.JPEGLSNearLossless, uid.JPEG2000),
                  16: (uid.JPEGLSNearLossless, uid.JPEG2000, uid.HTJ2K)}


def must_convert(source: Source, target: str) -> bool:
    """Cells where keeping the original would be a failure to do the job."""
    if source.untrusted:
        return False
    if target in UNCOMPRESSED and target != uid.ExplicitVRBigEndian:
        return True  # every image the decoders agree on can be written uncompressed
    bits = PLAIN.get(source.kind)
    return bits is not None and (target in LOSSLESS or target in LOSSY_FOR_BITS[bits])


@pytest.fixture
def archive(tmp_path: Path) -> Iterator[Archive]:
    """A fresh archive; its index connection closed after the test (hundreds of cells)."""
    made = Archive(tmp_path / "data")
    yield made
    made.index.close()


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Sources:
    return Sources(tmp_path_factory.mktemp("inputs"))


# --- the inputs themselves -----------------------------------------------------------

# Kinds the decoders must disagree on (or one refuse): if they ever agreed, the cells
# asserting these are kept as received would prove nothing.
UNTRUSTED = {"corrupt_jpeg_truncated", "corrupt_jpeg_garbled", "corrupt_rle_truncated",
             "corrupt_jpegls_truncated", "corrupt_j2k_truncated", "corrupt_htj2k_truncated",
             "mislabelled_jpegls_as_baseline", "mislabelled_j2k_as_jpegls", "jpeg_size_mismatch",
             "htj2k_lossy_u8_overshoot",  # OpenJPH wraps a 256 to 0, OpenJPEG clips it to 255
             "jpegls_s12_unextended"}  # DCMTK sign-extends the 12-bit samples; pydicom does not
# Kinds dciodvfy objects to, made all the same because modalities send them.
UNCLEAN = {
    "ybr_full_422": "native 4:2:2 is two bytes a pixel; dciodvfy expects three",
    "dose_float": "RT Dose defines no Float Pixel Data; planning systems export float grids anyway",
    "jpeg_baseline_ybr_full": "DCMTK's 4:4:4 YCbCr JPEG labelled YBR_FULL, which the SC IOD does not list",
}


@pytest.mark.parametrize("kind", KINDS)
def test_input_kind(kind: str, sources: Sources) -> None:
    source = sources.get(kind)
    assert bool(source.untrusted) == (kind in UNTRUSTED), source.untrusted or "the decoders agree"
    assert bool(source.dciodvfy) == (kind in UNCLEAN), sorted(source.dciodvfy) or "dciodvfy finds no error"


# --- the shared conversion, full cross product ---------------------------------------


@pytest.mark.parametrize("target", TARGETS, ids=name)
@pytest.mark.parametrize("kind", KINDS)
def test_shared_conversion(kind: str, target: str, sources: Sources, tmp_path: Path) -> None:
    source = sources.get(kind)
    ds = read(source.path)
    try:
        result = convert(ds, target, QUALITY)
    except CannotConvert as exc:
        assert not must_convert(source, target), f"{kind} -> {name(target)} refused: {exc}"
        return
    if target == source.syntax:  # nothing to do: the object as it is
        assert same_pixels(result.dataset, read(source.path)), f"{kind}: unchanged syntax, changed pixels"
        return
    out = tmp_path / "out.dcm"
    result.dataset.save_as(out, enforce_file_format=True)
    problems = output_problems(source, target, out, result.lossy)
    assert not problems, f"{kind} -> {name(target)}:\n  " + "\n  ".join(problems)


# --- appliance transcode, a slice ----------------------------------------------------

TRANSCODE_SLICE = [
    ("u12", uid.ExplicitVRBigEndian), ("bigendian_s16", uid.JPEGLSLossless),
    ("bigendian_palette", uid.ExplicitVRLittleEndian),
    ("s12_unextended", uid.JPEG2000Lossless), ("s12_unextended", uid.HTJ2KLossless),
    ("u12_highbits", uid.HTJ2KLossless), ("jpegls_s12_unextended", uid.ExplicitVRLittleEndian),
    ("ybr_full", uid.JPEGBaseline8Bit), ("ybr_full_422", uid.JPEGBaseline8Bit),
    ("rle_ybr_full", uid.ExplicitVRLittleEndian), ("jpeg_baseline_ybr422", uid.ExplicitVRLittleEndian),
    ("palette_lut8", uid.JPEGBaseline8Bit), ("palette_lut16", uid.JPEGExtended12Bit),
    ("bitmap", uid.JPEGLSLossless), ("rgb_planar1", uid.JPEGLSLossless),
    ("multiframe_rgb", uid.JPEG2000), ("u32", uid.JPEGLSLossless), ("dose_float", uid.RLELossless),
    ("corrupt_jpeg_truncated", uid.ExplicitVRLittleEndian),
    ("corrupt_jpeg_garbled", uid.ExplicitVRLittleEndian),
    ("corrupt_jpegls_truncated", uid.RLELossless), ("corrupt_rle_truncated", uid.JPEGLSLossless),
    ("mislabelled_jpegls_as_baseline", uid.ExplicitVRLittleEndian),
    ("mislabelled_j2k_as_jpegls", uid.ExplicitVRLittleEndian),
    ("jpeg_size_mismatch", uid.ExplicitVRLittleEndian),
    ("htj2k_lossless_u12", uid.JPEGLSLossless), ("deflated_u12", uid.HTJ2KLossless),
    ("u16", uid.HTJ2K),
]


@pytest.mark.parametrize(("kind", "target"), TRANSCODE_SLICE,
                         ids=[f"{k}-{name(t)}" for k, t in TRANSCODE_SLICE])
def test_transcode(kind: str, target: str, sources: Sources, tmp_path: Path) -> None:
    source = sources.get(kind)
    before = source.path.read_bytes()
    config = write_config(tmp_path / "appliance.toml", {"data_dir": str(tmp_path / "data")})
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "out.dcm"
    done = run_cli(config, "transcode", str(source.path), str(out), "--to", name(target), check=False)
    said = done.stdout + done.stderr
    assert "Traceback" not in said, said
    assert source.path.read_bytes() == before, "the input file changed"
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, f"expected a one-line error, got:\n{done.stderr}"
        assert kind in lines[0] or str(source.path) in lines[0], f"the error names no file: {lines[0]}"
        assert list(out_dir.iterdir()) == [], f"left behind: {list(out_dir.iterdir())}"
        assert not must_convert(source, target), f"{kind} -> {name(target)} refused: {lines[0]}"
        return
    assert out.exists(), f"exit 0 without an output file:\n{said}"
    problems = output_problems(source, target, out)
    assert not problems, f"transcode {kind} -> {name(target)}:\n  " + "\n  ".join(problems)


def one_warning(caplog: pytest.LogCaptureFixture, sop_instance_uid: str) -> str | None:
    """None when exactly one WARNING names the object and no traceback was logged; else what was."""
    named = [r for r in caplog.records if r.levelno == logging.WARNING and sop_instance_uid in r.getMessage()]
    tracebacks = [r.getMessage() for r in caplog.records if r.exc_info]
    if tracebacks:
        return f"traceback logged: {tracebacks[0][:200]}"
    if len(named) != 1:
        seen = [f"{r.levelname} {r.getMessage()[:160]}" for r in caplog.records]
        return f"{len(named)} WARNING lines name {sop_instance_uid}; the log had: {seen}"
    if "\n" in named[0].getMessage():
        return f"the WARNING spans several lines: {named[0].getMessage()[:300]!r}"
    return None


# --- [storage] format, full cross product --------------------------------------------

STORE_CONFIGS = [("uncompressed", uid.ExplicitVRLittleEndian),
                 *[("lossless", s) for s in LOSSLESS], *[("lossy", s) for s in LOSSY]]


@pytest.mark.parametrize(("store_format", "target"), STORE_CONFIGS,
                         ids=[f"{f}-{name(t)}" for f, t in STORE_CONFIGS])
@pytest.mark.parametrize("kind", KINDS)
def test_store_format(kind: str, store_format: str, target: str, sources: Sources, archive: Archive,
                      caplog: pytest.LogCaptureFixture) -> None:
    source = sources.get(kind)
    storage = StorageSettings(format=store_format,
                              lossless_syntax=target if store_format == "lossless" else uid.JPEGLSLossless,
                              lossy_syntax=target if store_format == "lossy" else uid.JPEG2000)
    policy = StorePolicy(storage)
    archive.on_indexed.append(policy.queue_conversion)
    archive.ingest_copy(source.path, calling_ae="MODALITY", source="matrix")
    converter = Converter(archive, storage)
    with caplog.at_level(logging.INFO):
        for _ in range(5):
            if not converter.run_once():
                break
    rows = list(archive.index.find())
    assert len(rows) == 1, f"{len(rows)} instances in the archive for one image: {rows}"
    (row,) = rows
    stored = archive.data_dir / row["path"]
    wanted = policy.target(source.syntax)
    if wanted is not None and row["transfer_syntax_uid"] == wanted:
        problems = output_problems(source, wanted, stored)
        assert not problems, f"stored {kind} as {name(wanted)}:\n  " + "\n  ".join(problems)
        return
    assert row["sop_instance_uid"] == source.sop_instance_uid
    assert stored.read_bytes() == source.path.read_bytes(), f"{kind}: the original's bytes changed"
    if wanted is None:
        return  # the store rule keeps this syntax as it is
    assert not must_convert(source, wanted), f"{kind} kept instead of stored as {name(wanted)}"
    missing = one_warning(caplog, source.sop_instance_uid)
    assert missing is None, f"{kind} kept as received, but {missing}"


# --- forward through the network, a slice ---------------------------------------------
# Debian's DCMTK 3.6.7 negotiates HTJ2K but cannot receive it ("Unsupported transfer
# syntax"): the HTJ2K targets are covered by the other paths only.

FORWARD_SLICE = [
    ("u12", uid.ExplicitVRBigEndian), ("bigendian_palette", uid.ExplicitVRLittleEndian),
    ("ybr_full", uid.JPEGBaseline8Bit), ("ybr_full_422", uid.JPEGBaseline8Bit),
    ("palette_lut8", uid.JPEGBaseline8Bit), ("rle_ybr_full", uid.ExplicitVRLittleEndian),
    ("s12_unextended", uid.JPEG2000Lossless), ("u12_highbits", uid.JPEGLSLossless),
    ("jpegls_s12_unextended", uid.ImplicitVRLittleEndian),
    ("corrupt_jpeg_truncated", uid.ExplicitVRLittleEndian),
    ("corrupt_jpegls_truncated", uid.ExplicitVRLittleEndian),
    ("corrupt_htj2k_truncated", uid.ExplicitVRLittleEndian),
    ("mislabelled_jpegls_as_baseline", uid.ExplicitVRLittleEndian),
    ("jpeg_size_mismatch", uid.ImplicitVRLittleEndian), ("u32", uid.JPEGLSLossless),
    ("multiframe_rgb", uid.RLELossless), ("u16", uid.JPEG2000), ("rgb_planar1", uid.JPEGLSNearLossless),
    ("dose_float", uid.DeflatedExplicitVRLittleEndian), ("j2k_lossless_rgb", uid.JPEGLosslessSV1),
]


@pytest.fixture(scope="module")
def only_one_syntax(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OneSyntaxPeers]:
    peers = OneSyntaxPeers(tmp_path_factory.mktemp("storescp"))
    yield peers
    peers.stop()


@pytest.mark.parametrize(("kind", "target"), FORWARD_SLICE,
                         ids=[f"{k}-{name(t)}" for k, t in FORWARD_SLICE])
def test_forward(kind: str, target: str, sources: Sources, only_one_syntax: OneSyntaxPeers,
                 archive: Archive, caplog: pytest.LogCaptureFixture) -> None:
    source = sources.get(kind)
    port, received = only_one_syntax.peer(target)
    before = set(received.iterdir())
    archive.ingest_copy(source.path, calling_ae="MODALITY", source="matrix")
    queue = ForwardQueue(archive.index)
    queue.enqueue([source.sop_instance_uid], "picky")
    picky = DestinationSettings(name="picky", ae_title="STORESCP", host="127.0.0.1", port=port,
                                accepts=(target,))
    worker = DestinationWorker(picky, ForwardSettings(), queue, archive.data_dir, "GATEWAY", QUALITY,
                               threading.Event())
    with caplog.at_level(logging.INFO):
        worker.step()
    (job,) = queue.jobs("picky")
    arrived = sorted(set(received.iterdir()) - before)
    if job["state"] == "pending" and job["last_status"].startswith("no presentation context accepted"):
        # A syntax the send rule never proposes (Big Endian is never produced): the peer accepted
        # nothing, a refusal retried with backoff like any other, and nothing was sent.
        stored = str(pydicom.dcmread(source.path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        assert target not in send_candidates(stored, (target,)) and arrived == [], f"{kind}: {job}"
        return
    if job["state"] != "done":
        assert arrived == [], f"{kind}: job {job['state']}, yet storescp received {arrived}"
        # Fails alone, at once and with the reason: another try would meet the same image.
        assert job["state"] == "failed" and job["last_status"], f"{kind}: not sent, job left {job}"
        (row,) = archive.index.find()
        assert (archive.data_dir / row["path"]).read_bytes() == source.path.read_bytes()
        assert not must_convert(source, target), f"{kind} not sent as {name(target)}: {job}"
        missing = one_warning(caplog, source.sop_instance_uid)
        assert missing is None, f"{kind} not sent (job {job['state']}: {job['last_status']}), but {missing}"
        return
    assert len(arrived) == 1, f"{kind}: job done, storescp wrote {arrived}"
    problems = output_problems(source, target, arrived[0])
    assert not problems, f"forwarded {kind} as {name(target)}:\n  " + "\n  ".join(problems)
