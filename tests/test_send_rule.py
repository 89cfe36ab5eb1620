"""The send rule as a table: every (stored syntax x `accepts`) pair, against the rule as documented.

docs/DESIGN.md ("The send rule") states the rule in four sentences and shows
it as a table; both are checked here, the table cell by cell as written.
"""

from __future__ import annotations

import itertools
import re

from pydicom import uid
from pydicom.dataset import Dataset, FileMetaDataset

from appliance.dicom.scu import StoreSender
from appliance.transcode.policy import send_candidates
from appliance.transcode.syntaxes import LOSSLESS, LOSSY, UNCOMPRESSED, class_of
from tests.conftest import REPO

EL, IL, EB, DF = (uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian, uid.ExplicitVRBigEndian,
                  uid.DeflatedExplicitVRLittleEndian)
MPEG2 = "1.2.840.10008.1.2.4.100"
SHORT = {"EL": EL, "IL": IL, "EB": EB, "DF": DF, "LS": uid.JPEGLSLossless, "SV1": uid.JPEGLosslessSV1,
         "JB": uid.JPEGBaseline8Bit, "MPEG2": MPEG2}
ALL_STORED = (*UNCOMPRESSED, *LOSSLESS, *LOSSY, MPEG2)
CLASS_LISTS = [list(p) for n in range(1, 4) for p in itertools.permutations(("uncompressed", "lossless",
                                                                             "lossy"), n)]
NAMED_LISTS = [[s] for s in (*UNCOMPRESSED, *LOSSLESS, *LOSSY)] + [
    ["uncompressed", "ExplicitVRBigEndian"], ["DeflatedExplicitVRLittleEndian", "uncompressed"],
    ["JPEGLosslessSV1", "uncompressed"], ["lossless", "JPEGBaseline8Bit", "uncompressed"]]


def _named(accepts: list[str]) -> set[str]:
    """The syntaxes `accepts` takes: classes expanded (`uncompressed` is the two Little Endians)."""
    taken: set[str] = set()
    for entry in accepts:
        if entry == "uncompressed":
            taken |= {EL, IL}
        elif entry in ("lossless", "lossy"):
            taken |= set(LOSSLESS if entry == "lossless" else LOSSY)
        else:
            taken.add(getattr(uid, entry, entry))
    return taken


def test_every_stored_syntax_against_every_accepts_list() -> None:
    """Each sentence of the rule, for every pair."""
    for stored, accepts in itertools.product(ALL_STORED, CLASS_LISTS + NAMED_LISTS):
        got = send_candidates(stored, accepts)
        pair = f"{uid.UID(stored).name} x {accepts}: {[uid.UID(s).name for s in got]}"
        taken = _named(accepts)
        assert len(got) == len(set(got)), pair
        # 4. Explicit, then Implicit VR Little Endian always proposed; in that order unless a
        #    preference or the stored syntax put Implicit first.
        assert EL in got and IL in got, pair
        if got.index(IL) < got.index(EL):
            assert stored == IL or ("uncompressed" not in accepts and IL in taken), pair
        # 1. Big Endian and Deflated only when named; Big Endian only as stored.
        for retired, keyword in ((EB, "ExplicitVRBigEndian"), (DF, "DeflatedExplicitVRLittleEndian")):
            if retired in got:
                assert keyword in accepts or retired in accepts, pair
        if EB in got:
            assert stored == EB, pair
        # 2. As stored first when the destination takes it.
        if stored in taken:
            assert got[0] == stored, pair
        # 3. Nothing but what accepts takes, plus the universal pair; never lossy from lossy or
        #    lossless from lossy.
        assert set(got) <= taken | {EL, IL}, pair
        if class_of(stored) == "lossy":
            assert [s for s in got if s != stored and class_of(s) != "uncompressed"] == [], pair
        if class_of(stored) is None:
            assert got == [EL, IL] or got[0] == stored, pair
        # ... and in the destination's order.
        ordered = [s for s in got if s != stored and s not in (EL, IL)]
        assert ordered == sorted(ordered, key=_order(accepts)), pair


def _order(accepts: list[str]):
    flat: list[str] = []
    for entry in accepts:
        if entry in ("lossless", "lossy"):
            flat += LOSSLESS if entry == "lossless" else LOSSY
        elif entry != "uncompressed":
            flat.append(getattr(uid, entry, entry))
    return flat.index


def _documented_table() -> tuple[list[list[str]], dict[str, dict[str, list[str]]]]:
    text = (REPO / "docs" / "DESIGN.md").read_text(encoding="utf-8")
    section = text[text.index("### The send rule"):]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")][1:]
    columns = [[entry.strip() for entry in re.sub(r"[`\[\]\"]", "", cell).split(",")] for cell in header]
    table: dict[str, dict[str, list[str]]] = {}
    for line in lines[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        table[cells[0]] = {str(n): _expand(cell) for n, cell in enumerate(cells[1:])}
    return columns, table


def _expand(cell: str) -> list[str]:
    """`EL, lossless, IL` as UIDs: a class stands for its members not already listed, in order."""
    out: list[str] = []
    for token in (t.strip() for t in cell.split(",")):
        if token in ("lossless", "lossy"):
            out += [s for s in (LOSSLESS if token == "lossless" else LOSSY) if s not in out]
        else:
            out.append(SHORT[token])
    return out


def test_the_documented_table_is_the_rule() -> None:
    columns, table = _documented_table()
    assert len(columns) == 6 and set(table) == {"EL", "IL", "EB", "DF", "LS", "JB", "MPEG2"}
    for row, cells in table.items():
        for n, accepts in enumerate(columns):
            assert send_candidates(SHORT[row], accepts) == cells[str(n)], f"{row} x {accepts}"


def _object(sop_class: str, syntax: str) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    return ds


def test_the_proposal_always_carries_both_little_endians() -> None:
    """The README's sample accepts list, and one with lossy too: plain CT and SR keep EL and IL
    (before, the last two candidates were taken to be those and Big Endian and Deflated went)."""
    ct, sr = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.88.33"
    for accepts in (["lossless", "uncompressed"], ["lossless", "lossy", "uncompressed"]):
        contexts = StoreSender("GATEWAY").plan([_object(ct, EL), _object(sr, EL)], accepts)
        for sop_class in (ct, sr):
            syntaxes = [s for c, s in contexts if c == sop_class]
            assert syntaxes[0] == EL and IL in syntaxes, (accepts, syntaxes)
            assert EB not in syntaxes and DF not in syntaxes, (accepts, syntaxes)
