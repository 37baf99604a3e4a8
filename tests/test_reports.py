"""Per-subject QC report: figures, ROI table, HTML validity, BIDS validity and a real browser."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from qsmflow import GAMMA_BAR_MHZ_PER_T, __version__
from qsmflow.interfaces.bids import DerivativesDataSink
from qsmflow.interfaces.reports import QCReport
from qsmflow.io.bids import write_dataset_description
from qsmflow.io.nifti import save_nifti
from qsmflow.phantom import make_head_model
from qsmflow.reports import (
    BIDSIGNORE_PATTERNS,
    CHI_RANGE_PPM,
    orthogonal_slices,
    plot_chi,
    roi_statistics,
)
from qsmflow.reports.figures import plot_orthogonal
from qsmflow.simulate import AcquisitionParams, simulate_acquisition

pytest.importorskip("matplotlib")

B0 = 3.0
ROI = {1: "Caudate", 2: "Globus pallidus", 3: "Putamen", 8: "White matter", 12: "Absent"}


def _png(path: Path) -> np.ndarray:
    from matplotlib.image import imread

    return imread(str(path))


@pytest.fixture(scope="module")
def sim():
    return simulate_acquisition(
        make_head_model(0),
        AcquisitionParams(matrix=(59, 69, 53), voxel_size_mm=(3.0, 3.0, 3.0), b0_tesla=B0),
        rng=np.random.default_rng(0),
    )


@pytest.fixture(scope="module")
def report(sim, tmp_path_factory):
    """A derivatives dataset with two acquisitions (ori2's chi is ori1's doubled), sunk with
    DerivativesDataSink as the workflow does, then the QC report on the sunk files."""
    root = tmp_path_factory.mktemp("report")
    work, deriv = root / "work", root / "out" / "qsmflow"
    work.mkdir()
    write_dataset_description(
        deriv,
        "qsmflow QSM derivatives",
        dataset_type="derivative",
        generated_by={"Name": "qsmflow", "Version": __version__},
        extra={"Authors": ["qsmflow developers"]},
    )
    (deriv / "README.md").write_text("# qsmflow derivatives\n")
    # what the BIDS-App writes so that the validator accepts the reports
    (deriv / ".bidsignore").write_text("\n".join(BIDSIGNORE_PATTERNS) + "\n")
    local_mask = ndimage.binary_erosion(sim.mask, iterations=2)
    hz = np.float32(GAMMA_BAR_MHZ_PER_T * B0)
    arrays = {
        "magnitude": sim.magnitude[..., 0],
        "mask": sim.mask,
        "local_mask": local_mask,
        "field_hz": sim.total_field_ppm * hz,
        "local_field": sim.local_field_ppm * local_mask,
        "chi": sim.chi_ppm * local_mask,
    }
    sinks = {  # field -> (suffix, desc, datatype, sidecar)
        "chi": ("Chimap", None, "anat", {"Units": "ppm", "InversionMethod": "TKD (test)"}),
        "mask": ("mask", "brain", "anat", {"Type": "Brain", "Method": "test masking"}),
        "local_mask": ("mask", "local", "anat", {"Type": "ROI"}),
        "field_hz": ("fieldmap", None, "fmap", {"Units": "Hz", "Method": "test unwrapping"}),
        "magnitude": ("magnitude", None, "fmap", {}),
    }
    labels, files = [], {k: [] for k in arrays}
    for acq, scale in (("ori1", 1.0), ("ori2", 2.0)):
        label = f"sub-01_acq-{acq}"
        labels.append(label)
        source = f"/raw/sub-01/anat/{label}_echo-1_part-phase_MEGRE.nii.gz"
        for key, arr in arrays.items():
            arr = arr * np.float32(scale) if key == "chi" else arr
            tmp = save_nifti(arr, sim.affine, work / f"{label}_{key}.nii.gz")
            if key not in sinks:  # the local field is in ppm here: kept out of the dataset
                files[key].append(str(tmp))
                continue
            suffix, desc, datatype, meta = sinks[key]
            sink = DerivativesDataSink(
                base_directory=str(deriv),
                source_file=source,
                in_file=str(tmp),
                suffix=suffix,
                datatype=datatype,
                metadata={"MagneticFieldStrength": B0, "EchoTime": [0.005, 0.01], **meta},
                **({"desc": desc} if desc else {}),
            )
            files[key].append(sink.run(cwd=str(work)).outputs.out_file)
    # unwrapped phase (rad) of two echoes as one 4-D file; the first is all zeros (TE = 0), so a
    # figure with colour in it shows that the report took the last echo
    tes = np.array([0.0, 0.010], np.float32)
    phase = 2 * np.pi * arrays["field_hz"][..., None] * tes
    files["unwrapped_phase"] = [
        str(save_nifti(phase, sim.affine, work / f"{label}_phase.nii.gz")) for label in labels
    ]
    seg = save_nifti(sim.segmentation.astype(np.int16), sim.affine, work / "seg.nii.gz")
    result = QCReport(
        out_dir=str(deriv),
        subject="01",
        labels=labels,
        segmentation=[str(seg)],
        label_names=json.dumps(ROI),
        **files,
    ).run(cwd=str(work))
    return {
        "deriv": deriv,
        "page": Path(result.outputs.out_report),
        "figures": [Path(p) for p in result.outputs.out_figures],
        "arrays": arrays,
        "sim": sim,
    }


class _Page(HTMLParser):
    """Collects the tree facts the tests need and checks that every element is closed."""

    VOID = {"meta", "img", "br", "hr", "link", "input", "source", "col", "wbr", "area"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.decl, self.stack, self.errors = None, [], []
        self.imgs, self.attrs, self.headings, self.cells, self.text = [], {}, [], [], []
        self._capture = None

    def handle_decl(self, decl):
        self.decl = decl

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.attrs.setdefault(tag, []).append(attrs)
        if tag == "img":
            self.imgs.append(attrs)
        if tag not in self.VOID:
            self.stack.append(tag)
        if tag in ("h1", "h2", "td", "title"):
            self._capture = (tag, [])

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unexpected </{tag}>, open: {self.stack[-3:]}")
            return
        self.stack.pop()
        if self._capture and self._capture[0] == tag:
            text = "".join(self._capture[1]).strip()
            (self.cells if tag == "td" else self.headings).append(text)
            self._capture = None

    def handle_data(self, data):
        self.text.append(data)
        if self._capture:
            self._capture[1].append(data)


def _parse(page: Path) -> _Page:
    parser = _Page()
    parser.feed(page.read_text(encoding="utf-8"))
    parser.close()
    return parser


def test_report_layout_and_names(report):
    deriv = report["deriv"]
    assert report["page"] == deriv / "sub-01.html"
    names = sorted(p.name for p in (deriv / "sub-01" / "figures").iterdir())
    expected = sorted(
        f"sub-01_acq-{a}_desc-{d}_qc.png"
        for a in ("ori1", "ori2")
        for d in ("magnitude", "phase", "field", "localfield", "chi")
    )
    assert names == expected
    assert sorted(p.name for p in report["figures"]) == expected
    assert not list(deriv.rglob(".tmp-*"))  # atomic writes left nothing behind


def test_html_is_valid_and_self_contained(report):
    page = report["page"]
    doc = _parse(page)
    assert doc.decl is not None and doc.decl.lower() == "doctype html"
    assert doc.errors == [] and doc.stack == []
    assert doc.attrs["html"][0].get("lang") == "en"
    assert any(m.get("charset", "").lower() == "utf-8" for m in doc.attrs["meta"])
    assert "sub-01" in doc.headings[0]  # <title>
    assert "sub-01_acq-ori1" in doc.headings and "sub-01_acq-ori2" in doc.headings
    # no external resources, no scripts
    assert "script" not in doc.attrs and "link" not in doc.attrs
    assert len(doc.imgs) == 10
    for img in doc.imgs:
        src = img["src"]
        assert not src.startswith(("/", "http:", "https:", "file:")), src
        assert (page.parent / src).is_file(), src
        assert len(img.get("alt", "")) > 20, img
        assert int(img["width"]) > 500 and int(img["height"]) > 200
    text = " ".join(doc.text)
    assert "TKD (test)" in text  # method summary read from the Chimap sidecar
    assert "test masking" in text and "test unwrapping" in text  # mask / field sidecars
    assert f"qsmflow {__version__}" in text
    assert str(report["deriv"].resolve()) in text
    assert "sub-01/anat/sub-01_acq-ori1_Chimap.nii.gz" in text


def test_figures_are_nontrivial_pngs(report):
    for path in report["figures"]:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert path.stat().st_size > 15_000, path
        img = _png(path)[..., :3]
        assert img.shape[0] > 300 and img.shape[1] > 900
        assert img.std() > 0.1, path
        packed = np.round(img * 255).astype(np.uint32) @ np.array([1, 256, 65536], np.uint32)
        assert np.unique(packed).size > 50, path


def test_magnitude_figure_shows_both_outlines(report):
    img = _png(report["deriv"] / "sub-01/figures/sub-01_acq-ori1_desc-magnitude_qc.png")[..., :3]
    orange = np.all(np.abs(img - np.array([0xE6, 0x9F, 0x00]) / 255) < 0.08, axis=-1)
    blue = np.all(np.abs(img - np.array([0x56, 0xB4, 0xE9]) / 255) < 0.08, axis=-1)
    assert orange.sum() > 300 and blue.sum() > 300
    # the phase figure shows the last echo (the first is all zeros: white on this colour map)
    phase = _png(report["deriv"] / "sub-01/figures/sub-01_acq-ori1_desc-phase_qc.png")[..., :3]
    red = (phase[..., 0] > 0.5) & (phase[..., 1] < 0.2) & (phase[..., 2] < 0.25)
    assert red.sum() > 100


def test_roi_table_matches_numpy(report):
    arrays = report["arrays"]
    seg, chi, mask = report["sim"].segmentation, arrays["chi"], arrays["local_mask"]
    rows = roi_statistics(chi, seg, ROI, mask=mask)
    assert [r["label"] for r in rows] == list(ROI)
    for row in rows:
        v = chi[(seg == row["label"]) & mask].astype(np.float64)
        assert row["n_voxels"] == v.size
        if v.size:
            assert row["mean"] == pytest.approx(v.mean(), abs=1e-9)
            assert row["sd"] == pytest.approx(v.std(ddof=1), abs=1e-9)
        else:
            assert row["mean"] is None and row["sd"] is None
    assert rows[0]["n_voxels"] > 20  # caudate really was measured
    assert rows[1]["mean"] > rows[3]["mean"]  # pallidus more paramagnetic than white matter
    # the page shows the same numbers (ori1 then ori2, whose chi is doubled)
    cells = _parse(report["page"]).cells
    table = [cells[i : i + 5] for i in range(0, len(cells), 5)]
    assert len(table) == 2 * len(ROI)
    for row, shown, doubled in zip(rows, table[: len(ROI)], table[len(ROI) :], strict=True):
        assert shown[0] == str(row["label"]) and shown[1] == row["name"]
        assert int(shown[2]) == row["n_voxels"]
        if row["mean"] is None:
            assert shown[3] == shown[4] == "n/a"
        else:
            assert float(shown[3]) == pytest.approx(row["mean"], abs=5e-5)
            assert float(doubled[3]) == pytest.approx(2 * row["mean"], abs=5e-5)


def test_roi_statistics_default_labels():
    seg = np.zeros((4, 4, 4), np.int16)
    seg[:2], seg[2:, :2] = 3, 5
    vals = np.arange(64, dtype=np.float32).reshape(4, 4, 4)
    rows = roi_statistics(vals, seg)
    assert [(r["label"], r["name"]) for r in rows] == [(3, "label 3"), (5, "label 5")]
    assert rows[0]["mean"] == pytest.approx(vals[:2].mean())
    assert rows[1]["sd"] == pytest.approx(vals[2:, :2].std(ddof=1))


def test_chi_scale_is_fixed(tmp_path):
    """chi and 2*chi drawn with the same title must differ (no autoscaling); the control shows
    that an autoscaled figure would not, so this test can fail."""
    rng = np.random.default_rng(0)
    mask = np.zeros((30, 34, 26), bool)
    mask[5:25, 5:29, 5:21] = True
    chi = ndimage.gaussian_filter(rng.standard_normal(mask.shape), 1.5).astype(np.float32)
    chi *= np.float32(0.07 / np.abs(chi).max()) * mask  # within half the fixed range
    affine = np.diag([2.0, 2.0, 2.5, 1.0])
    a = _png(plot_chi(chi, affine, tmp_path / "a.png", mask=mask, title="chi"))
    b = _png(plot_chi(2 * chi, affine, tmp_path / "b.png", mask=mask, title="chi"))
    assert a.shape == b.shape
    assert np.mean(np.any(a != b, axis=-1)) > 0.02
    # fixed scale: chi = 0 (outside the mask) is mid grey, the same in both figures
    kw = {"centre_mask": mask, "cmap": "gray", "title": "chi"}
    c = _png(plot_orthogonal(chi, affine, tmp_path / "c.png", **kw))
    d = _png(plot_orthogonal(2 * chi, affine, tmp_path / "d.png", **kw))
    assert np.array_equal(c[..., :3], d[..., :3])  # autoscaled: identical
    assert CHI_RANGE_PPM == (-0.15, 0.15)


@pytest.mark.parametrize("axes", [(0, 1, 2), (1, 2, 0), (2, 0, 1)], ids=["xyz", "yzx", "zxy"])
@pytest.mark.parametrize("flips", [(1, 1, 1), (-1, 1, 1), (-1, -1, 1), (1, 1, -1)])
def test_orthogonal_slices_orientation(axes, flips):
    """A blob at world left-anterior-superior must appear top-left in the axial view (anterior
    up, left on the left), top-left in the coronal view and top-right in the sagittal view,
    whatever the voxel order of the file."""
    n = (20, 24, 28)
    affine = np.zeros((4, 4))
    affine[3, 3] = 1.0
    for i, (ax, f) in enumerate(zip(axes, flips, strict=True)):
        affine[ax, i] = 2.0 * f  # array axis i runs along world axis ax
    affine[:3, 3] = -(affine[:3, :3] @ (np.array(n) - 1)) / 2  # centred at world 0
    ijk = np.indices(n).reshape(3, -1)
    world = (affine[:3, :3] @ ijk + affine[:3, 3:]).reshape(3, *n)
    # left is -x in RAS+; the blob sits at x<0, y>0, z>0
    vol = ((world[0] < -4) & (world[1] > 4) & (world[2] > 4)).astype(np.float32)
    centre = np.rint(np.linalg.solve(affine[:3, :3], [-10, 10, 10] - affine[:3, 3])).astype(int)
    views = orthogonal_slices(vol, affine, centre)
    assert [v.name for v in views] == ["Axial", "Coronal", "Sagittal"]
    for view, (want_top, want_left) in zip(
        views, [(True, True)] * 2 + [(True, False)], strict=True
    ):
        rows, cols = np.nonzero(view.data)
        assert rows.size, view.name
        h, w = view.data.shape
        assert (rows.mean() > h / 2) == want_top, view.name  # origin="lower": top = high row
        assert (cols.mean() < w / 2) == want_left, view.name
    assert views[0].labels == ("L", "R", "P", "A")
    assert views[2].labels == ("P", "A", "I", "S")


def test_anisotropic_voxels_set_the_aspect():
    affine = np.diag([1.0, 2.0, 3.0, 1.0])
    views = orthogonal_slices(np.zeros((4, 5, 6)), affine, (2, 2, 3))
    assert [v.aspect for v in views] == pytest.approx([2.0, 3.0, 1.5])
    assert views[0].data.shape == (5, 4)  # rows: y (A-P), columns: x (L-R)


def test_plotting_leaves_pyplot_alone(tmp_path):
    code = (
        "import sys, numpy as np, matplotlib\n"
        "before = matplotlib.get_backend()\n"
        "from qsmflow.reports import plot_chi\n"
        f"plot_chi(np.zeros((8, 9, 10)), np.eye(4), {str(tmp_path / 'x.png')!r})\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
        "assert matplotlib.get_backend() == before\n"
        "assert matplotlib.rcParams['image.cmap'] == 'magma'\n"
    )
    env = {**os.environ, "MPLBACKEND": "svg"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    mplrc = tmp_path / "matplotlibrc"
    mplrc.write_text("image.cmap: magma\n")
    env["MATPLOTLIBRC"] = str(mplrc)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "x.png").read_bytes()[:4] == b"\x89PNG"


def test_qcreport_rejects_mismatched_lists(report, tmp_path):
    deriv = report["deriv"]
    chi = str(deriv / "sub-01/anat/sub-01_acq-ori1_Chimap.nii.gz")
    mask = str(deriv / "sub-01/anat/sub-01_acq-ori1_desc-brain_mask.nii.gz")
    iface = QCReport(
        out_dir=str(tmp_path),
        subject="01",
        labels=["sub-01_acq-ori1", "sub-01_acq-ori2"],
        magnitude=[chi],
        mask=[mask],
        local_mask=[mask],
        field_hz=[chi],
        local_field=[chi],
        chi=[chi],
    )
    with pytest.raises(ValueError, match="one per acquisition"):
        iface.run(cwd=str(tmp_path))
    iface.inputs.labels = ["sub-02_acq-ori1"]
    with pytest.raises(ValueError, match="must be a BIDS entity string"):
        iface.run(cwd=str(tmp_path))


def test_derivatives_with_report_pass_the_bids_validator(report):
    from .test_simulate import _validate

    errors, warnings = _validate(report["deriv"])
    assert errors == [], errors
    assert not [w for w in warnings if "NOT_INCLUDED" in w or "html" in w.lower()], warnings


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        exe = shutil.which(name)
        if exe:
            return exe
    return None


def test_report_renders_in_a_real_browser(report, tmp_path):
    exe = _chromium()
    if exe is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    shot = tmp_path / "page.png"
    cmd = [
        exe,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={shot}",
        "--window-size=1200,2000",
        report["page"].resolve().as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert shot.exists(), proc.stderr[-2000:]
    img = _png(shot)[..., :3]
    assert img.shape[:2] == (2000, 1200)
    assert img.std() > 0.05  # not blank
    # the figures were loaded (not broken-image icons): the field figure's saturated red/blue
    # and the magnitude figure's orange outline are on screen
    red = (img[..., 0] > 0.5) & (img[..., 1] < 0.2) & (img[..., 2] < 0.25)
    blue = (img[..., 2] > 0.4) & (img[..., 0] < 0.2) & (img[..., 1] < 0.35)
    orange = np.all(np.abs(img - np.array([0xE6, 0x9F, 0x00]) / 255) < 0.1, axis=-1)
    assert orange.sum() > 200
    assert red.sum() > 200 and blue.sum() > 200
