"""Patient privacy: a fake patient name, ID, birth date and institution planted in a frame's burned-in
header, in file/folder names, in the CSV and in DICOM tags must appear nowhere in the output tree
(file names, JSON, report) nor in the converter's console output."""
import csv
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from usdet.data.dicom import write_ultrasound_dicom
from usdet.data.privacy import Pseudonymizer, check_mapping_path, load_key, redact
from usdet.data.screens import make_screen
from train_helpers import REPO

NAME = "ZANZIBAR^QUENTINA"
MRN = "MRN77441199"
BIRTH = "19630412"
INSTITUTION = "SAINT ELSEWHERE CLINIC"
SECRETS = [NAME, "ZANZIBAR", "QUENTINA", MRN, BIRTH, INSTITUTION, "ELSEWHERE"]


def make_dicom_cine(path, frames):
    pydicom = pytest.importorskip("pydicom")
    write_ultrasound_dicom(path, np.stack(frames), "RGB", frames=len(frames), PatientName=NAME, PatientID=MRN,
                           PatientBirthDate=BIRTH, InstitutionName=INSTITUTION, OtherPatientIDs=MRN)
    assert pydicom.dcmread(path).PatientName == NAME


def test_pseudonyms_and_key_handling(tmp_path, monkeypatch):
    p = Pseudonymizer(b"k" * 16)
    assert p("A") == p("A") and p("A") != p("B") and p("A", "pt") != p("A", "img")
    assert p("A") != Pseudonymizer(b"j" * 16)("A")  # the key matters
    assert p("A").startswith("pt-") and len(p("A")) == 3 + 16
    monkeypatch.delenv("USDET_PSEUDONYM_KEY", raising=False)
    with pytest.raises(ValueError, match="no pseudonym key"):
        load_key(None)
    monkeypatch.setenv("USDET_PSEUDONYM_KEY", "short")
    with pytest.raises(ValueError, match="shorter"):
        load_key(None)
    (tmp_path / "k").write_text("a-long-enough-key\n")
    assert load_key(str(tmp_path / "k")) == b"a-long-enough-key"
    with pytest.raises(ValueError):
        check_mapping_path(str(tmp_path / "out" / "sub" / "m.json"), str(tmp_path / "out"))
    check_mapping_path(str(tmp_path / "m.json"), str(tmp_path / "out"))
    assert "ZANZIBAR" not in redact("cannot read ZANZIBAR_Q/clip.png", ["ZANZIBAR_Q/clip.png"])


def test_no_identifier_reaches_outputs(tmp_path):
    rng = np.random.default_rng(3)
    src = tmp_path / f"export_{INSTITUTION.replace(' ', '_')}"
    pdir = src / f"{NAME.replace('^', '_')}_{MRN}"
    pdir.mkdir(parents=True)
    rows = []
    stills = []
    for k in range(3):
        s = make_screen(rng, canvas=(640, 480), probe="linear", gain=1.0, jpeg_quality=0,
                        header_text=f"{NAME} {MRN} {BIRTH} {INSTITUTION}")
        fn = f"{MRN}_{BIRTH}_{k}.png"
        cv2.imwrite(str(pdir / fn), s.frame[:, :, ::-1])
        stills.append(s)
        rel = f"{pdir.name}/{fn}"
        if s.lesion_boxes:
            rows += [[rel, *b, "lesion", NAME, f"{MRN}-clip"] for b in s.lesion_boxes]
        else:
            rows.append([rel, "", "", "", "", "", NAME, f"{MRN}-clip"])
    # a DICOM cine whose header carries the identifiers; patient_id left empty -> taken from the header
    cine = [make_screen(rng, canvas=(640, 480), probe="linear", jpeg_quality=0, gain=1.0,
                        header_text=f"{NAME} {BIRTH}").frame for _ in range(2)]
    make_dicom_cine(str(pdir / f"{NAME.replace('^', '_')}.dcm"), cine)
    for i in range(2):
        rows.append([f"{pdir.name}/{NAME.replace('^', '_')}.dcm#{i}", "", "", "", "", "", "", ""])
    with open(tmp_path / "boxes.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "x0", "y0", "x1", "y1", "label", "patient_id", "clip_id"])
        w.writerows(rows)
    (tmp_path / "key").write_text("site-secret-key-42")
    out = tmp_path / "out"
    cmd = [sys.executable, os.path.join(REPO, "tools", "convert_to_coco.py"), "frames", "--images", str(src),
           "--annotations", str(tmp_path / "boxes.csv"), "--output", str(out), "--key-file", str(tmp_path / "key"),
           "--mapping", str(tmp_path / "mapping.json"), "--split", "0.5,0.25,0.25"]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = proc.stdout + proc.stderr
    assert "5 images" in proc.stdout or "4 images" in proc.stdout, proc.stdout
    # the header text really was in the frames (the test would prove nothing otherwise) ...
    assert any(f[:60].std() > 0 for f in cine)
    # ... and none of it, nor any tag or path value, is anywhere in the output tree or the logs
    found = []
    for root, dirs, files in os.walk(out):
        for n in dirs + files:
            found += [(os.path.join(root, n), s) for s in SECRETS if s.lower() in n.lower()]
        for n in files:
            data = open(os.path.join(root, n), "rb").read().lower()
            found += [(os.path.join(root, n), s) for s in SECRETS if s.lower().encode() in data]
    found += [("logs", s) for s in SECRETS if s.lower() in logs.lower()]
    assert not found, found
    # the burned-in header is outside every crop: no output image contains the header rows' text pixels
    import json

    report = json.load(open(out / "report.json"))
    assert report["counts"]["failed"] == 0 and report["counts"]["patients"] == 2  # CSV name + DICOM header ID
    for split in ("train", "val", "test"):
        for im in json.load(open(out / "annotations" / f"{split}.json"))["images"]:
            assert im["crop_box"][1] > 30  # the header band (top ~8% of the screen) is cut away
    # the mapping (outside the tree) is the only place the real paths live
    mapping = json.load(open(tmp_path / "mapping.json"))
    assert any(MRN in v for v in mapping["files"].values())
