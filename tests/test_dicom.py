"""DICOM reading: every shared real sample, and synthetic files made with pydicom for the cases the
samples lack (MONOCHROME1, plain RGB, multi-frame grey, no pixel data, undecodable syntax)."""
import os

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
from pydicom.uid import JPEGLSLossless  # noqa: E402

from usdet.data.dicom import DicomReadError, dicom_patient_id, is_dicom_file, read_dicom_frames  # noqa: E402
from usdet.data.image_io import ImageReadError  # noqa: E402
from usdet.data.sources import iter_source_frames, list_sources  # noqa: E402
from frame_helpers import DICOM_DIR, make_dicom  # noqa: E402


def sample(name):
    path = os.path.join(DICOM_DIR, name)
    if not os.path.isfile(path):
        pytest.skip(f"DICOM sample not found at {path} (see ../shared/data/dicom_us/SOURCE.md)")
    return path


# ---- real samples ---------------------------------------------------------------------------
def test_multiframe_rgb_jpeg_lossless():
    p = sample("JPEGLosslessP14SV1_3s_2f_u_08_08.dcm")
    frames = read_dicom_frames(p)
    assert len(frames) == 2
    for f in frames:
        assert f.shape == (768, 1024, 3) and f.dtype == np.uint8 and f.flags.c_contiguous
    assert not np.array_equal(frames[0], frames[1])  # a real cine: the frames differ
    # white GUI around a dark tissue window [80, 28, 944, 568]
    assert frames[0][700:760, 200:600].mean() > 200
    assert frames[0][100:500, 300:700].mean() < 120
    assert dicom_patient_id(p) == "Case Report 1"
    assert [i for i, _ in iter_source_frames(p)] == [0, 1]


def test_jpeg2000_ybr_rct_is_rgb():
    frames = read_dicom_frames(sample("US1_J2KR.dcm"))
    assert len(frames) == 1 and frames[0].shape == (480, 640, 3) and frames[0].dtype == np.uint8
    f = frames[0].astype(int)
    # power Doppler: strongly red/orange pixels exist (R >> B), i.e. colour survived the YBR_RCT decode
    assert ((f[..., 0] - f[..., 2]) > 100).sum() > 1000


def test_palette_color():
    frames = read_dicom_frames(sample("OBXXXX1A.dcm"))
    assert len(frames) == 1 and frames[0].shape == (600, 800, 3)
    f = frames[0].astype(int)
    # the Philips title bar is blue (the palette was applied), the sector is near-black grey
    bar = f[5:40, 200:500].reshape(-1, 3).mean(axis=0)
    assert bar[2] > bar[0] + 30
    assert np.median(f[300:500, 300:600]) < 5 and f[300:500, 300:600].max() > 200  # caliper "+" marks


def test_monochrome2_jpeg_lossless():
    frames = read_dicom_frames(sample("JPGLosslessP14SV1_1s_1f_8b.dcm"))
    f = frames[0]
    assert f.shape == (768, 1024, 3) and np.array_equal(f[..., 0], f[..., 2])  # grey replicated
    assert f[300:500, 350:650].mean() > 30 and f[700:760, 500:700].mean() < 20
    assert dicom_patient_id(sample("JPGLosslessP14SV1_1s_1f_8b.dcm")) is None  # no PatientID in the file


def test_every_shared_sample_decodes():
    names = sorted(n for n in os.listdir(DICOM_DIR) if n.endswith(".dcm")) if os.path.isdir(DICOM_DIR) else []
    if not names:
        pytest.skip(f"no DICOM samples at {DICOM_DIR}")
    assert len(list_sources(DICOM_DIR)) == len(names)
    for n in names:
        frames = read_dicom_frames(os.path.join(DICOM_DIR, n))
        assert frames and all(f.ndim == 3 and f.shape[2] == 3 and f.dtype == np.uint8 for f in frames), n
        assert all(f.std() > 10 for f in frames), n  # real content, not a constant frame


# ---- synthetic ------------------------------------------------------------------------------
def test_monochrome1_is_inverted(tmp_path):
    ramp = np.tile(np.arange(0, 250, 2, dtype=np.uint8), (40, 1))
    p = make_dicom(str(tmp_path / "m1.dcm"), ramp, "MONOCHROME1", PatientID="X1")
    f = read_dicom_frames(p)[0]
    assert f.shape == (40, 125, 3)
    assert np.array_equal(f[..., 0], 255 - ramp)


def test_rgb_and_multiframe(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
    f = read_dicom_frames(make_dicom(str(tmp_path / "rgb.dcm"), rgb, "RGB"))[0]
    assert np.array_equal(f, rgb)
    cine = rng.integers(0, 256, (4, 24, 32), dtype=np.uint8)
    p = make_dicom(str(tmp_path / "cine"), cine, frames=4)  # no extension: found by the DICM magic
    assert is_dicom_file(p) and list_sources(str(tmp_path)) == sorted([p, str(tmp_path / "rgb.dcm")])
    frames = read_dicom_frames(p)
    assert len(frames) == 4
    for i in range(4):
        assert np.array_equal(frames[i][..., 1], cine[i])



def test_the_one_writer_sop_class_tags_compression_and_no_temp_file(tmp_path):
    from pydicom.uid import RLELossless, UltrasoundImageStorage, UltrasoundMultiFrameImageStorage

    from usdet.data.dicom import write_ultrasound_dicom

    cine = np.random.default_rng(1).integers(0, 256, (3, 20, 28), dtype=np.uint8)
    p = write_ultrasound_dicom(str(tmp_path / "c.dcm"), cine, frames=3, transfer_syntax=RLELossless,
                               PatientID="P7", CineRate=15)
    ds = pydicom.dcmread(p)
    assert ds.SOPClassUID == UltrasoundMultiFrameImageStorage and ds.file_meta.TransferSyntaxUID == RLELossless
    assert ds.PatientID == "P7" and int(ds.CineRate) == 15 and ds.Modality == "US"
    assert [np.array_equal(f[..., 0], c) for f, c in zip(read_dicom_frames(p), cine)] == [True] * 3
    one = write_ultrasound_dicom(str(tmp_path / "one.dcm"), cine[0])
    assert pydicom.dcmread(one).SOPClassUID == UltrasoundImageStorage and "NumberOfFrames" not in pydicom.dcmread(one)
    assert sorted(os.listdir(tmp_path)) == ["c.dcm", "one.dcm"]  # temp files renamed, none left

def test_16bit_is_scaled(tmp_path):
    img = (np.arange(20 * 20, dtype=np.uint16).reshape(20, 20) * 100)
    f = read_dicom_frames(make_dicom(str(tmp_path / "w.dcm"), img))[0]
    assert f.dtype == np.uint8 and f.min() == 0 and f.max() == 255
    assert np.all(np.diff(f[..., 0].ravel().astype(int)) >= 0)  # order kept


def test_no_pixel_data_and_undecodable(tmp_path):
    p = make_dicom(str(tmp_path / "sr.dcm"), None, PatientID="ABC")
    with pytest.raises(DicomReadError) as e:
        read_dicom_frames(p)
    assert "no pixel data" in e.value.reason and e.value.path == p
    assert isinstance(e.value, ImageReadError)
    assert dicom_patient_id(p) == "ABC"
    # JPEG-LS encapsulated garbage: no installed handler decodes it -> a clear reason, not a crash
    q = make_dicom(str(tmp_path / "jls.dcm"), np.zeros((16, 16), np.uint8))
    ds = pydicom.dcmread(q)
    from pydicom.encaps import encapsulate

    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.PixelData = encapsulate([b"\xff\xd8garbage\xff\xd9"])
    ds["PixelData"].is_undefined_length = True
    ds.save_as(q)
    with pytest.raises(DicomReadError) as e:
        read_dicom_frames(q)
    assert "JPEG-LS" in e.value.reason or "decode" in e.value.reason
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"hello")
    with pytest.raises(DicomReadError) as e:
        read_dicom_frames(str(bad))
    assert "not a DICOM" in e.value.reason or "corrupt" in e.value.reason


# ---- every encoding decodes the same (issue 14 §1) --------------------------------------------
def write_big_endian(ds, path):
    """Re-write ``ds`` as Explicit VR Big Endian: pydicom encodes typed values itself, but OW bytes
    (palette LUTs, 16-bit-word pixel data) must be swapped by hand (see pydicom.filewriter.dcmwrite)."""
    from pydicom.filewriter import dcmwrite
    from pydicom.uid import ExplicitVRBigEndian

    for elem in ds.iterall():
        if elem.VR == "OW" and elem.value:
            elem.value = np.frombuffer(elem.value, "<u2").astype(">u2").tobytes()
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    dcmwrite(path, ds, implicit_vr=False, little_endian=False)
    return path


def encodings_of(src, tmp_path):
    """``src`` re-written by pydicom in the uncompressed syntaxes and RLE: {name: path}."""
    from pydicom.uid import ExplicitVRLittleEndian as ELE, ImplicitVRLittleEndian, RLELossless

    out = {"original": src}
    ds = pydicom.dcmread(src)
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.decompress()  # JPEG / JPEG 2000 lossless -> raw (YBR_RCT becomes RGB)
        ds.save_as(str(tmp_path / "le.dcm"), enforce_file_format=True)
        out["explicit_le"] = str(tmp_path / "le.dcm")
    ds = pydicom.dcmread(out.get("explicit_le", src))
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.save_as(str(tmp_path / "ile.dcm"), implicit_vr=True)
    out["implicit_le"] = str(tmp_path / "ile.dcm")
    ds = pydicom.dcmread(out.get("explicit_le", src))
    ds.compress(RLELossless)
    ds.save_as(str(tmp_path / "rle.dcm"))
    out["rle"] = str(tmp_path / "rle.dcm")
    out["explicit_be"] = write_big_endian(pydicom.dcmread(out.get("explicit_le", src)), str(tmp_path / "be.dcm"))
    assert pydicom.dcmread(out["explicit_be"]).file_meta.TransferSyntaxUID != ELE
    return out


def make_palette(path, indices, lut16):
    """A PALETTE COLOR file (8-bit indices, 16-bit LUT entries) in Explicit VR Little Endian."""
    make_dicom(path, indices, "MONOCHROME2")
    ds = pydicom.dcmread(path)
    ds.PhotometricInterpretation = "PALETTE COLOR"
    for colour, lut in zip(("Red", "Green", "Blue"), lut16):
        ds.add_new(pydicom.datadict.tag_for_keyword(f"{colour}PaletteColorLookupTableDescriptor"), "US",
                   [256, 0, 16])
        ds.add_new(pydicom.datadict.tag_for_keyword(f"{colour}PaletteColorLookupTableData"), "OW",
                   np.asarray(lut, "<u2").tobytes())
    ds.save_as(path)
    return path


def test_palette_decodes_the_same_in_every_encoding(tmp_path):
    """Explicit VR Big Endian palette frames decoded all black (pydicom reads the LUT in native byte
    order); now every syntax gives the LUT's colours exactly."""
    rng = np.random.default_rng(3)
    idx = rng.integers(0, 256, (48, 64), dtype=np.uint8)
    lut = [np.arange(256) << 8, (255 - np.arange(256)) << 8, ((np.arange(256) * 7) % 256) << 8]
    src = make_palette(str(tmp_path / "pal.dcm"), idx, lut)
    expected = np.stack([np.asarray(c)[idx] >> 8 for c in lut], axis=-1).astype(np.uint8)
    paths = encodings_of(src, tmp_path)
    assert set(paths) == {"original", "implicit_le", "rle", "explicit_be"}
    for name, p in paths.items():
        f = read_dicom_frames(p)
        assert len(f) == 1 and np.array_equal(f[0], expected), name


@pytest.mark.parametrize("name", ["OBXXXX1A.dcm", "US1_J2KR.dcm", "JPGLosslessP14SV1_1s_1f_8b.dcm"])
def test_real_files_decode_the_same_in_every_encoding(name, tmp_path):
    """Each real sample, re-encoded by pydicom (raw little/big endian, implicit VR, RLE), gives the
    original's pixels exactly (the derived files live in tmp_path only)."""
    src = sample(name)
    ref = read_dicom_frames(src)
    paths = encodings_of(src, tmp_path)
    assert "explicit_be" in paths and "rle" in paths
    for enc, p in paths.items():
        got = read_dicom_frames(p)
        assert len(got) == len(ref) and all(np.array_equal(a, b) for a, b in zip(got, ref)), (name, enc)
    assert ref[0].std() > 10


def test_constant_decode_of_varying_data_is_an_error(tmp_path):
    """A palette that maps varying stored indices to one colour is reported as a decoding fault."""
    idx = np.tile(np.arange(64, dtype=np.uint8), (32, 1))
    p = make_palette(str(tmp_path / "flat.dcm"), idx, [np.zeros(256, int)] * 3)
    with pytest.raises(DicomReadError) as e:
        read_dicom_frames(p)
    assert e.value.path == p and "frame 0 decodes to one constant colour" in e.value.reason
    assert "not a blank frame" in e.value.reason and "0..63" in e.value.reason
    # a truly constant stored frame is a (blank) frame, not an error
    blank = make_dicom(str(tmp_path / "blank.dcm"), np.full((20, 20), 7, np.uint8))
    assert read_dicom_frames(blank)[0].max() == 7


# ---- one grey scale per file (issue 14 §1) -----------------------------------------------------
def test_16bit_cine_shares_one_grey_scale(tmp_path):
    """Frames of one >8-bit cine without a VOI window share the file's range: the same stored value
    gives the same grey in every frame (min-max per frame gave 255 in one, 128 in the other)."""
    from usdet.data.dicom import DicomFrames

    a = np.linspace(1000, 2000, 20 * 30).reshape(20, 30)
    b = np.linspace(1000, 3000, 20 * 30).reshape(20, 30)
    cine = np.stack([a, b]).round().astype(np.uint16)
    src = DicomFrames(make_dicom(str(tmp_path / "cine16.dcm"), cine, frames=2))
    frames = [f for _, f in src]
    assert frames[0][..., 0].max() == 128 and frames[1][..., 0].max() == 255  # 2000 and 3000 of 1000..3000
    assert frames[0][0, 0, 0] == frames[1][0, 0, 0] == 0
    assert src.grey_scale == "min-max over all frames of the file: 1000..3000 -> 0..255"
    assert src.grey_scale_method == "min-max over all frames of the file"
    # with a VOI window the window decides, identically for every frame
    w = DicomFrames(make_dicom(str(tmp_path / "win.dcm"), cine, frames=2, WindowCenter=1500, WindowWidth=1000))
    wf = [f for _, f in w]
    assert w.grey_scale_method == "VOI window"
    assert wf[0][..., 0].max() == 255 and wf[1][..., 0].max() == 255 and wf[0][0, 0, 0] == 0
    grey_of_2000 = {int(f[..., 0][c == 2000][0]) for f, c in zip(wf, cine) if (c == 2000).any()}
    assert len(grey_of_2000) == 1
