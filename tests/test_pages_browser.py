"""The pages users look at, opened in a real headless Chromium (Selenium): the HTML report, the 3D stack
viewer and the documentation site.

Each page must show every image (``naturalWidth > 0``) and raise no JavaScript error; the report and the
viewer must not fetch anything (they are single files meant to be mailed or archived); dragging the 3D
view with a mouse or a finger redraws it, the wheel zooms it and its gene menu recolours the same points.
The documentation site is built with mkdocs into a temporary folder and served on 127.0.0.1; its pages
load and the internal links of its index answer HTTP 200.

With ``HE2ST_SCREENSHOTS=DIR`` set, the pages are also saved as ``report.png``, ``stack_view.png`` and
``docs_index.png`` in DIR (``scripts/make_screenshots.sh`` writes them to ``docs/assets/screenshots/``).
Without Chromium, its driver or Selenium the tests are skipped, saying which is missing.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib.util
import io
import os
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from PIL import Image
from scipy import ndimage as ndi
from synthetic import spot_grid, tissue_image

from he2st.data.genes import GenePanel, transform_counts
from he2st.data.sample import Sample, spatial_library
from he2st.methods import ModelCard
from he2st.report.html import build_report
from he2st.report.stack_view import write_stack_html

REPO = Path(__file__).resolve().parents[1]
WINDOW = (1280, 900)
SCREENSHOT_BYTES = 300_000  # the docs reuse the screenshots: keep each small
GENES = ["ERBB2", "ESR1", "KRT8", "PTPRC", "COL1A2", "MKI67"]


# ---------------------------------------------------------------------------- the browser
def _chromium() -> tuple[str, str]:
    """Paths of the Chromium binary and its WebDriver, or a skip naming what is missing."""
    names = ("chromium", "chromium-browser", "google-chrome")
    binary = next((path for name in names if (path := shutil.which(name))), None)
    driver = shutil.which("chromedriver")
    if binary is None:
        pytest.skip("no Chromium installed (Debian: apt-get install chromium chromium-driver)")
    if driver is None:
        pytest.skip("no chromedriver installed (Debian: apt-get install chromium-driver)")
    return binary, driver


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for the module, pointed at the system binary (nothing is downloaded)."""
    pytest.importorskip("selenium", reason="selenium not installed (pip install selenium, or he2st[dev])")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = _chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--disable-extensions", "--hide-scrollbars", f"--window-size={WINDOW[0]},{WINDOW[1]}",
                "--force-device-scale-factor=1"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def _errors(driver, origin: str | None = None) -> list[str]:
    """Severe browser log entries since the last call: JavaScript errors, ``console.error`` and failed loads.
    A failed load from another host than ``origin`` is left out (the test machine may be offline; the page
    itself is checked for fetching nothing where that matters)."""
    found = []
    for entry in driver.get_log("browser"):
        if entry["level"] != "SEVERE":
            continue
        message = entry["message"]
        if entry.get("source") == "network" and origin is not None and not message.startswith(origin):
            continue
        found.append(message)
    return found


def _open(driver, url: str) -> None:
    driver.get_log("browser")  # nothing from a previous page counts against this one
    driver.get(url)
    # images marked lazy load only near the viewport: ask for all of them now, then wait for them
    driver.execute_script("document.querySelectorAll('img[loading=lazy]').forEach(i => i.loading = 'eager')")
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 20).until(lambda d: d.execute_script(
        "return document.readyState === 'complete' && [...document.images].every(i => i.complete)"))


def _broken_images(driver) -> tuple[int, list[str]]:
    """How many images the page has, and those that did not load (their alt text or the start of src)."""
    return driver.execute_script(
        "const all = [...document.images];"
        "return [all.length, all.filter(i => !(i.complete && i.naturalWidth > 0))"
        "        .map(i => i.alt || i.src.slice(0, 120))];")


def _fetched(driver) -> list[str]:
    """What the page requested after its own document (data: URIs are not requests)."""
    return driver.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)"
        "       .filter(n => !n.startsWith('data:'))")


def _screenshot(driver, name: str) -> None:
    """Save the viewport as DIR/name when ``HE2ST_SCREENSHOTS=DIR`` is set (palette PNG if the full colour
    one is too large for the docs)."""
    folder = os.environ.get("HE2ST_SCREENSHOTS")
    if not folder:
        return
    path = Path(folder) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    image.save(path, optimize=True)
    if path.stat().st_size > SCREENSHOT_BYTES:
        image.quantize(256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    assert path.stat().st_size < SCREENSHOT_BYTES, (path, path.stat().st_size)


# ---------------------------------------------------------------------------- the report
SIDE = 14  # a SIDE x SIDE grid of spots, 100 px apart, over a 1600 px square slide
THUMB_SCALE = 0.1  # thumbnail px per slide px


@pytest.fixture(scope="module")
def report_page(tmp_path_factory) -> Path:
    """``he2st report`` of a prediction with a measured sample: summary, glossary, metrics, maps, per-gene r,
    scatter, side-by-side maps, training curves, provenance. Each gene has its own pattern over the section
    (gradients, blobs, a ring); the predictions are a blurred, noisy copy of the measurements (a plausible
    model)."""
    root = tmp_path_factory.mktemp("report")
    xy = spot_grid(SIDE, SIDE, 100.0, (150.0, 150.0))
    barcodes = [f"s{i}" for i in range(len(xy))]
    u, v = ((xy - xy.min(axis=0)) / np.ptp(xy, axis=0)).T
    radius = np.hypot(u - 0.5, v - 0.5)
    corner = np.exp(-((u - 0.8) ** 2 + (v - 0.2) ** 2) / 0.03)
    ring = np.exp(-((radius - 0.35) ** 2) / 0.005)
    patterns = np.column_stack([u, v, np.exp(-radius**2 / 0.04), corner, ring, np.full(len(xy), 0.5)])
    counts = np.random.default_rng(3).poisson(5 + 40 * patterns)
    measured = ad.AnnData(X=sp.csr_matrix(counts.astype(np.float32)), var=pd.DataFrame(index=GENES),
                          obs=pd.DataFrame(index=barcodes))
    measured.obsm["spatial"] = xy
    sample = Sample("S1", "P1", measured, pixel_size_um=1.0, spot_diameter_um=55.0).save(root / "S1.h5ad")
    truth = transform_counts(counts, "log1p_cp10k").toarray().reshape(SIDE, SIDE, len(GENES))
    noise = np.random.default_rng(4).normal(0, 0.3, truth.shape)
    predicted = ndi.uniform_filter(truth + noise, size=(3, 3, 1), mode="nearest").reshape(len(xy), len(GENES))
    card = ModelCard(method="knn", panel=GenePanel(genes=GENES, transform="log1p_cp10k"),
                     training_samples={"A1": "A", "B4": "B"}, curves={"train_loss": [1.0, 0.6, 0.45, 0.4]})
    adata = ad.AnnData(X=predicted.astype(np.float32), obs=pd.DataFrame(index=barcodes),
                       var=pd.DataFrame(index=GENES))
    adata.obs["in_tissue"] = 1
    adata.obsm["spatial"] = xy
    thumb = tissue_image(160, 160, seed=0, blob=(0.5, 0.5, 0.42))
    adata.uns["spatial"] = {"S1": spatial_library(thumb, THUMB_SCALE, 55.0, "slide.tif", "he2st predict")}
    adata.uns["he2st"] = {"target_transform": "log1p_cp10k", "method": "knn", "card": card.model_dump_json(),
                          "spots": "sample:S1", "pitch_um": 0.0, "trained_on": dict(card.training_samples)}
    prediction = root / "prediction.h5ad"
    adata.write_h5ad(prediction)
    results = {"provenance": {"command": "he2st evaluate"}, "summary": [
        {"method": "knn", "gene_set": "all", "metric": m, "mean": v, "sd": 0.05, "n_folds": 3}
        for m, v in (("pearson_mean", 0.41), ("spearman_mean", 0.38), ("mse", 0.52))]}
    return build_report(prediction, root / "report.html", sample=sample, results=results, genes=GENES[:3])


def test_report_shows_every_figure_without_errors_or_requests(browser, report_page):
    _open(browser, report_page.as_uri())
    count, broken = _broken_images(browser)
    assert not broken, broken
    sizes = browser.execute_script("return [...document.images].map(i => [i.alt, i.naturalWidth, i.width])")
    assert [alt for alt, _, _ in sizes] == ["maps", "per-gene Pearson r", "scatter", "compare", "curves"]
    assert all(natural > 200 and shown > 100 for _, natural, shown in sizes), sizes  # drawn, not collapsed
    assert _errors(browser) == []
    assert _fetched(browser) == []  # one self-contained file
    headings = [h.text for h in browser.find_elements("css selector", "h2")]
    assert {"Predicted expression", "Predicted vs measured (S1)", "Provenance"} <= set(headings), headings
    # the report is read at the width of a laptop screen: nothing sticks out sideways
    assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    # the screenshot shows the maps, below the tables
    browser.execute_script("document.querySelectorAll('h2')[2].scrollIntoView()")
    _screenshot(browser, "report.png")


# ---------------------------------------------------------------------------- the 3D stack viewer
STACK_GENES = ["ERBB2", "ESR1", "PTPRC"]


@pytest.fixture(scope="module")
def stack_page(tmp_path_factory) -> Path:
    """The viewer ``he2st stack`` writes, for three sections of an elliptical tissue 10 µm apart with two
    interpolated planes between each pair; each gene has its own spatial pattern."""
    rng = np.random.default_rng(0)
    grid = spot_grid(30, 36, 50.0, (0.0, 0.0))
    inside = ((grid[:, 0] - 875) / 850) ** 2 + ((grid[:, 1] - 725) / 650) ** 2 < 1
    xy = grid[inside]
    planes = [(z, f"s{z // 10}" if z % 10 == 0 else f"s{z // 10}~s{z // 10 + 1}@{z % 10 / 10:.2f}",
               z % 10 != 0) for z in (0, 3, 6, 10, 13, 16, 20)]
    xyz = np.concatenate([np.column_stack([xy, np.full(len(xy), z)]) for z, _, _ in planes])
    x, y, z = xyz.T / np.array([1750.0, 1450.0, 20.0])[:, None]
    blob = np.exp(-((x - 0.6) ** 2 + (y - 0.4) ** 2) / 0.05)
    values = np.column_stack([x + 0.3 * z, blob, (x - 0.5) * (y - 0.5)])
    values = values + rng.normal(0, 0.05, values.shape)
    obs = pd.DataFrame({"section": np.repeat([name for _, name, _ in planes], len(xy)),
                        "interpolated": np.repeat([interp for _, _, interp in planes], len(xy))},
                       index=[f"p{i}" for i in range(len(xyz))])
    adata = ad.AnnData(X=values.astype(np.float32), obs=obs, var=pd.DataFrame(index=STACK_GENES))
    adata.obsm["spatial_3d"] = xyz
    return write_stack_html(adata, tmp_path_factory.mktemp("stack") / "stack.html", STACK_GENES,
                            title="he2st stack: s0-s2")


def _canvas(driver) -> dict:
    """The viewer's canvas (read back as a PNG): a hash of its pixels, a hash of which pixels are painted,
    how many are, and a sample of the colours."""
    url = driver.execute_script("return document.getElementById('c').toDataURL('image/png')")
    pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGBA"))
    pixels = pixels.reshape(-1, 4)
    painted = pixels[:, 3] > 0
    return {"pixels": hashlib.sha256(pixels.tobytes()).hexdigest(),
            "shape": hashlib.sha256(np.packbits(painted).tobytes()).hexdigest(),
            "painted": int(painted.sum()), "colours": {tuple(p) for p in pixels[painted][:, :3][::7]}}


def test_stack_viewer_redraws_on_drag_touch_zoom_and_gene_choice(browser, stack_page):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.actions import interaction
    from selenium.webdriver.common.actions.action_builder import ActionBuilder
    from selenium.webdriver.common.actions.pointer_input import PointerInput
    from selenium.webdriver.common.actions.wheel_input import ScrollOrigin
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    _open(browser, stack_page.as_uri())
    assert _errors(browser) == [] and _fetched(browser) == []
    picker = Select(browser.find_element(By.ID, "g"))
    assert [o.text for o in picker.options] == STACK_GENES
    canvas = browser.find_element(By.ID, "c")
    first = _canvas(browser)
    assert first["painted"] > 20_000 and len(first["colours"]) > 20, first["painted"]  # points, many colours
    assert _canvas(browser)["pixels"] == first["pixels"]  # a still page stays still: changes are redraws

    ActionChains(browser).move_to_element(canvas).click_and_hold().move_by_offset(90, 40).release().perform()
    dragged = _canvas(browser)
    assert dragged["shape"] != first["shape"] and dragged["painted"] > 20_000  # turned, still on screen
    _screenshot(browser, "stack_view.png")

    touch = ActionBuilder(browser, mouse=PointerInput(interaction.POINTER_TOUCH, "finger"))
    touch.pointer_action.move_to(canvas).pointer_down().move_by(-60, 30).move_by(-20, 10).pointer_up()
    touch.perform()  # on a tablet the finger turns the stack too
    swiped = _canvas(browser)
    assert swiped["shape"] != dragged["shape"] and swiped["painted"] > 20_000
    dragged = swiped

    ActionChains(browser).scroll_from_origin(ScrollOrigin.from_element(canvas), 0, -300).perform()
    zoomed = _canvas(browser)
    assert zoomed["painted"] > dragged["painted"]  # zoomed in: the same points spread over more of the canvas

    picker.select_by_index(1)
    recoloured = _canvas(browser)
    assert recoloured["shape"] == zoomed["shape"]  # the same points in the same places ...
    assert recoloured["pixels"] != zoomed["pixels"]  # ... in other colours
    assert len(recoloured["colours"] ^ zoomed["colours"]) > 20
    assert _errors(browser) == []


# ---------------------------------------------------------------------------- the documentation site
class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 (the base class's name)
        pass


def _mkdocs() -> list[str] | None:
    if importlib.util.find_spec("mkdocs") is not None:
        return [sys.executable, "-m", "mkdocs"]
    command = shutil.which("mkdocs")
    return [command] if command else None


@pytest.fixture(scope="module")
def docs_site(tmp_path_factory):
    """The documentation site built by mkdocs into a temporary folder and served on 127.0.0.1; its URL."""
    config = REPO / "mkdocs.yml"
    if not config.is_file():
        pytest.skip("no docs site (no mkdocs.yml)")
    mkdocs = _mkdocs()
    if mkdocs is None:
        pytest.skip("mkdocs not installed")
    site = tmp_path_factory.mktemp("site")
    built = subprocess.run([*mkdocs, "build", "-q", "-f", str(config), "-d", str(site)], capture_output=True,
                           text=True, cwd=REPO, timeout=300)
    assert built.returncode == 0, built.stderr
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(site)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _internal_links(driver, origin: str) -> list[str]:
    hrefs = driver.execute_script("return [...document.querySelectorAll('a[href]')].map(a => a.href)")
    pages = {urllib.parse.urldefrag(h).url for h in hrefs if h.startswith(origin)}
    return sorted(pages)


@pytest.mark.slow  # builds and serves the whole site
def test_docs_site_pages_load_with_images_and_working_links(browser, docs_site):
    _open(browser, docs_site)
    assert browser.title, "the index has no title"
    count, broken = _broken_images(browser)
    assert not broken, broken
    assert _errors(browser, docs_site) == []
    _screenshot(browser, "docs_index.png")
    links = _internal_links(browser, docs_site)
    assert links, "the index links to no page of the site"
    dead = {link: code for link in links if (code := _status(link)) != 200}
    assert not dead, dead
    pages = [link for link in links if link.rstrip("/") != docs_site.rstrip("/")
             and not link.split("?")[0].endswith((".png", ".jpg", ".svg", ".json", ".xml", ".gz"))][:4]
    assert pages, links
    for page in pages:
        _open(browser, page)
        count, broken = _broken_images(browser)
        assert not broken, (page, broken)
        assert _errors(browser, docs_site) == [], page
