"""`appliance transcode` on inputs that once came out as a different image.

Each test is one row of what a physicist found: the conversion is either
exact (checked with DCMTK or GDCM decoding the output, not only pydicom) or
refused with one line naming the file and the reason, its own exit code, no
traceback, and no output file (not even a temporary one).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from pydicom import uid
from pydicom.pixels import convert_color_space

from appliance.commands.transcode import CANNOT_HOLD, CANNOT_WRITE, REFUSED, UNREADABLE_INPUT
from tests import bad_inputs
from tests.bad_inputs import read, save
from tests.conftest import TEST_FILES, run_cli, write_config


@pytest.fixture
def transcode(tmp_path: Path):
    config = write_config(tmp_path / "a.toml", {"data_dir": str(tmp_path / "d")})

    def run(source: Path, target: str, out: Path | None = None) -> tuple[subprocess.CompletedProcess, Path]:
        if out is None:
            out = tmp_path / "out" / f"{source.stem}-{target}.dcm"
            out.parent.mkdir(exist_ok=True)
        return run_cli(config, "transcode", str(source), str(out), "--to", target, check=False), out

    return run


def _assert_refused(result: subprocess.CompletedProcess, source: Path, out: Path, code: int,
                    reason: str) -> None:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert str(source) in line and reason in line, line
    assert not out.exists(), "no output for a refused conversion"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")], "no temporary left"


def _dcmtk(tool: str, source: Path, out: Path, *options: str) -> np.ndarray:
    """The output as DCMTK (or GDCM) decodes it: the second opinion on every claim below."""
    subprocess.run([tool, *options, str(source), str(out)], check=True, capture_output=True, timeout=60)
    return read(out).pixel_array


def test_big_endian_is_never_produced(transcode) -> None:
    source = TEST_FILES / "CT_small.dcm"
    result, out = transcode(source, "ExplicitVRBigEndian")
    _assert_refused(result, source, out, CANNOT_HOLD, "never produced")


def test_big_endian_input_is_read_right(transcode, tmp_path: Path) -> None:
    source = TEST_FILES / "MR_small_bigendian.dcm"
    result, out = transcode(source, "ExplicitVRLittleEndian")
    assert result.returncode == 0, result.stderr
    dcmtk = _dcmtk("dcmconv", source, tmp_path / "dcmtk.dcm", "+te")
    assert np.array_equal(read(out).pixel_array, dcmtk)


@pytest.mark.parametrize("target", ["JPEG2000Lossless", "HTJ2KLossless", "JPEGLSLossless"])
def test_signed_12bit_not_sign_extended_is_kept(transcode, tmp_path: Path, target: str) -> None:
    source = save(bad_inputs.signed_12bit_not_sign_extended(), tmp_path / "s12.dcm")
    result, out = transcode(source, target)
    _assert_refused(result, source, out, REFUSED, "not sign-extended")


def test_signed_12bit_not_sign_extended_goes_uncompressed_bit_for_bit(transcode, tmp_path: Path) -> None:
    source = save(bad_inputs.signed_12bit_not_sign_extended(), tmp_path / "s12.dcm")
    result, out = transcode(source, "ImplicitVRLittleEndian")
    assert result.returncode == 0, result.stderr
    assert read(out).PixelData == read(source).PixelData, "the bytes as stored, not re-interpreted"


def test_signed_12bit_sign_extended_j2k_is_exact_in_gdcm(transcode, tmp_path: Path) -> None:
    source = save(bad_inputs.ct_12bit(signed=True), tmp_path / "s12ok.dcm")
    result, out = transcode(source, "JPEG2000Lossless")
    assert result.returncode == 0, result.stderr
    gdcm = _dcmtk("gdcmconv", out, tmp_path / "gdcm.dcm", "--raw")
    assert np.array_equal(gdcm, read(source).pixel_array)
    assert gdcm.min() == -2048


def test_unsigned_12bit_with_high_bits_set_is_kept(transcode, tmp_path: Path) -> None:
    source = save(bad_inputs.unsigned_12bit_high_bits_set(), tmp_path / "u12.dcm")
    result, out = transcode(source, "HTJ2KLossless")
    _assert_refused(result, source, out, REFUSED, "above Bits Stored")


@pytest.mark.parametrize("kind", ["garbage", "truncated", "tables"])
def test_corrupt_jpeg_is_never_decoded_into_an_image(transcode, tmp_path: Path, kind: str) -> None:
    source = save(bad_inputs.corrupt_jpeg(kind), tmp_path / f"{kind}.dcm")
    result, out = transcode(source, "uncompressed")
    _assert_refused(result, source, out, REFUSED, "JPEG Baseline")


def test_jpeg_whose_frame_size_differs_from_the_header_is_refused(transcode, tmp_path: Path) -> None:
    source = save(bad_inputs.jpeg_baseline(rows=120, columns=160), tmp_path / "size.dcm")
    result, out = transcode(source, "uncompressed")
    _assert_refused(result, source, out, REFUSED, "320x240")


@pytest.mark.parametrize("builder", [bad_inputs.ybr_full, bad_inputs.ybr_full_422])
def test_ybr_to_jpeg_baseline_is_colour_transformed_once(transcode, tmp_path: Path, builder) -> None:
    ds = builder()
    source = save(ds, tmp_path / "ybr.dcm")
    result, out = transcode(source, "JPEGBaseline8Bit")
    assert result.returncode == 0, result.stderr
    picture = bad_inputs.rgb().pixel_array.astype(int)
    dcmtk = _dcmtk("dcmdjpeg", out, tmp_path / "dcmtk.dcm")  # dcmdjpeg converts YCbCr to RGB
    assert read(tmp_path / "dcmtk.dcm").PhotometricInterpretation == "RGB"
    assert np.abs(dcmtk.astype(int) - picture).mean() < 4, "the same picture, not a second transform"


def test_rle_ybr_full_decompresses_to_the_same_ybr_samples(transcode, tmp_path: Path) -> None:
    source = save(bad_inputs.rle_ybr_full(), tmp_path / "rle.dcm")
    result, out = transcode(source, "ExplicitVRLittleEndian")
    assert result.returncode == 0, result.stderr
    ours = read(out)
    assert ours.PhotometricInterpretation == "YBR_FULL"
    dcmtk = tmp_path / "dcmdrle.dcm"
    subprocess.run(["dcmdrle", str(source), str(dcmtk)], check=True, capture_output=True, timeout=60)
    assert read(dcmtk).PhotometricInterpretation == "YBR_FULL"
    assert ours.PixelData == read(dcmtk).PixelData, "the samples DCMTK keeps, byte for byte"
    ybr = convert_color_space(bad_inputs.rgb().pixel_array, "RGB", "YBR_FULL")
    ours.pixel_array_options(as_rgb=False)
    assert np.array_equal(ours.pixel_array, ybr)


@pytest.mark.parametrize("target", ["JPEGBaseline8Bit", "JPEGExtended12Bit", "JPEG2000"])
def test_palette_colour_is_never_lossy_compressed(transcode, tmp_path: Path, target: str) -> None:
    source = save(bad_inputs.palette(), tmp_path / "palette.dcm")
    result, out = transcode(source, target)
    _assert_refused(result, source, out, CANNOT_HOLD, "palette")


def test_mislabelled_stream_is_refused(transcode, tmp_path: Path) -> None:
    source = save(bad_inputs.jpeg_labelled_jpeg_ls(), tmp_path / "mislabelled.dcm")
    result, out = transcode(source, "uncompressed")
    _assert_refused(result, source, out, REFUSED, "baseline JPEG, not what the transfer syntax names")


def test_pixel_data_shorter_than_its_header_is_refused(transcode, tmp_path: Path) -> None:
    source = save(bad_inputs.short_native_pixel_data(), tmp_path / "short.dcm")
    result, out = transcode(source, "lossless")
    _assert_refused(result, source, out, REFUSED, "less than expected")


def test_unreadable_inputs_get_one_line_and_their_own_exit_code(transcode, tmp_path: Path) -> None:
    text = tmp_path / "notes.dcm"
    text.write_text("not DICOM\n")
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes((TEST_FILES / "CT_small.dcm").read_bytes()[:1000])
    for source in (text, truncated, tmp_path / "missing.dcm"):
        result, out = transcode(source, "lossless")
        _assert_refused(result, source, out, UNREADABLE_INPUT, str(source))


def test_a_refused_conversion_leaves_an_existing_output_untouched(transcode, tmp_path: Path) -> None:
    source = save(bad_inputs.corrupt_jpeg("garbage"), tmp_path / "garbage.dcm")
    out = tmp_path / "out" / "kept.dcm"
    out.parent.mkdir()
    out.write_bytes(b"previous result")
    result, _ = transcode(source, "uncompressed", out)
    assert result.returncode == REFUSED and out.read_bytes() == b"previous result"
    assert [p.name for p in out.parent.iterdir()] == ["kept.dcm"]


def test_an_output_folder_that_does_not_exist_is_one_line(transcode, tmp_path: Path) -> None:
    source = TEST_FILES / "CT_small.dcm"
    out = tmp_path / "no" / "such" / "folder.dcm"
    result, _ = transcode(source, "lossless", out)
    assert result.returncode == CANNOT_WRITE and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert str(out) in line and "cannot write" in line


def test_in_place_transcode_replaces_the_file_only_when_verified(transcode, tmp_path: Path) -> None:
    source = tmp_path / "ct.dcm"
    source.write_bytes((TEST_FILES / "CT_small.dcm").read_bytes())
    result, _ = transcode(source, "lossless", source)
    assert result.returncode == 0, result.stderr
    assert read(source).file_meta.TransferSyntaxUID == uid.JPEGLSLossless
    assert (read(source).pixel_array == read(TEST_FILES / "CT_small.dcm").pixel_array).all()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
