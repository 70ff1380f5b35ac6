"""report.html: one self-contained page, checked as HTML and rendered in headless Chromium."""
import base64
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest

from usdet.evaluation.html_report import metric_value
from usdet.evaluation.report import evaluate_predictions

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


class _Page(HTMLParser):
    """Collects <img> attributes and the metric cells (data-key -> shown text)."""

    def __init__(self):
        super().__init__()
        self.images, self.cells, self._key = [], {}, None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append(a)
        if "data-key" in a:
            self._key = (a["data-key"], int(a["data-digits"]))

    def handle_data(self, data):
        if self._key is not None:
            self.cells[self._key] = data.strip()
            self._key = None


def _parse(html_text):
    page = _Page()
    page.feed(html_text)
    return page


def _assert_cells_match(cells, metrics):
    assert cells, "no metric cells on the page"
    for (key, digits), shown in cells.items():
        want = metric_value(metrics, key)
        expected = "n/a" if want is None else f"{want:.{digits}f}"
        assert shown == expected, f"{key}: page shows {shown!r}, metrics.json has {want!r}"


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, phantom_dataset):
    """evaluate_predictions on the phantom test split with near-miss predictions, one false
    positive and one missed lesion, plus a two-record training event file."""
    out = tmp_path_factory.mktemp("html")
    gt_path = os.path.join(phantom_dataset, "annotations", "test.json")
    with open(gt_path) as f:
        gt = json.load(f)
    rng = np.random.default_rng(0)
    preds = []
    for k, a in enumerate(gt["annotations"]):
        if k == 0:
            continue  # a miss
        x, y, w, h = a["bbox"]
        preds.append({"image_id": a["image_id"], "category_id": a["category_id"], "score": float(rng.uniform(0.6, 0.95)),
                      "bbox": [x + 0.05 * w, y, w, h * 0.95]})
    preds.append({"image_id": gt["images"][0]["id"], "category_id": 1, "score": 0.9, "bbox": [2, 2, 20, 20]})
    pred_path = str(out / "preds.json")
    with open(pred_path, "w") as f:
        json.dump(preds, f)
    events = str(out / "events.json")
    with open(events, "w") as f:
        for it, loss in ((19, 1.2), (39, 0.7)):
            f.write(json.dumps({"iteration": it, "total_loss": loss, "loss_cls": loss / 2, "lr": 0.01}) + "\n")
    report_dir = str(out / "report")
    metrics = evaluate_predictions(gt_path, pred_path, report_dir, bootstrap=50, training_metrics=events)
    return report_dir, metrics


def test_report_html_is_self_contained_and_matches_metrics(evaluated):
    report_dir, metrics = evaluated
    with open(os.path.join(report_dir, "report.html")) as f:
        text = f.read()
    page = _parse(text)
    # 5 plots + worst false positives + worst misses + training curves, all embedded PNGs
    assert len(page.images) == len(metrics["plots"]) + 3 == 8
    for img in page.images:
        assert img["src"].startswith("data:image/png;base64,")
        assert base64.b64decode(img["src"].split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert not re.search(r"""(src|href)=["']?(https?:|//|file:)""", text), "page refers to something outside itself"
    _assert_cells_match(page.cells, metrics)
    assert ("bbox.AP50", 2) in page.cells and ("piou.score", 3) in page.cells
    # CIs from the bootstrap are on the page beside their estimate
    ci = metrics["bootstrap"]["metrics"]["piou"]
    assert f"{ci['low']:.3f}" in text and f"{ci['high']:.3f}" in text
    alts = " ".join(img.get("alt", "") for img in page.images)
    assert "1 false positives" in alts and "1 missed lesions" in alts and "training curves from" in alts


def test_report_html_without_images_says_why(tmp_path, phantom_dataset):
    with open(os.path.join(phantom_dataset, "annotations", "test.json")) as f:
        gt = json.load(f)
    preds = [{"image_id": a["image_id"], "category_id": a["category_id"], "score": 0.8, "bbox": a["bbox"]}
             for a in gt["annotations"]]
    m = evaluate_predictions(gt, preds, str(tmp_path), bootstrap=0, plots=False, image_root=str(tmp_path / "nowhere"))
    text = (tmp_path / "report.html").read_text()
    assert "Not drawn: images not found under" in text and "<img" not in text
    _assert_cells_match(_parse(text).cells, m)


def _browser():
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("USDET_REQUIRE_BROWSER"):
        pytest.fail("USDET_REQUIRE_BROWSER is set (CI) but no Chromium is installed: apt-get install chromium")
    pytest.skip("no headless Chromium (Debian: apt-get install chromium); .ci/run installs it so CI runs this test")


def test_report_html_renders_in_chromium(evaluated, tmp_path):
    """Render in headless Chromium: a screenshot, every image decoded (naturalWidth > 0) and the
    metric values in the rendered DOM equal to metrics.json."""
    browser = _browser()
    report_dir, metrics = evaluated
    # a copy with a probe script that records what the browser decoded; the report has no script
    with open(os.path.join(report_dir, "report.html")) as f:
        text = f.read()
    probe = ("<script>window.addEventListener('load', () => { for (const img of document.images) "
             "img.setAttribute('data-natural-width', img.naturalWidth); "
             "document.body.setAttribute('data-loaded', document.images.length); });</script>")
    probed = tmp_path / "probed.html"
    probed.write_text(text.replace("</body>", probe + "</body>"))
    flags = CHROMIUM_FLAGS + ["--window-size=1280,2000", "--virtual-time-budget=5000"]
    shot = tmp_path / "report.png"
    r = subprocess.run([browser, *flags, f"--user-data-dir={tmp_path / 'profile1'}", f"--screenshot={shot}",
                        "file://" + os.path.join(report_dir, "report.html")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    import cv2

    img = cv2.imread(str(shot))
    assert img is not None and img.shape[:2] == (2000, 1280) and img.std() > 10, "blank screenshot"
    r = subprocess.run([browser, *flags, f"--user-data-dir={tmp_path / 'profile2'}", "--dump-dom",
                        "file://" + str(probed)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    dom = _parse(r.stdout)
    assert re.search(r'<body[^>]*data-loaded="8"', r.stdout), "load handler did not run over 8 images"
    assert len(dom.images) == 8
    broken = [i.get("alt") for i in dom.images if int(i.get("data-natural-width", "0")) <= 0]
    assert not broken, f"images that did not load: {broken}"
    _assert_cells_match(dom.cells, metrics)
