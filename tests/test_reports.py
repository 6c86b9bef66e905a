"""Reports from hand-made stored results: ranking on displayed values with ties, unavailable metrics,
failed rows, Markdown/LaTeX rendering (compiled with pdflatex when installed), ablation deltas,
plots, HTML escaping and the before/after slider in headless Chromium."""

from __future__ import annotations

import html
import io
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from harness.cells import CellOutcome, CropImage, centre_box, png_crop
from harness.errors import QBenchError, UnknownNameError
from harness.runconfig import MethodInfo, expand_cells, load_run_config
from harness.store import RunStore
from reports import load_run
from reports.compare import ablation_table
from reports.tables import (
    latex_document,
    latex_escape,
    main_table,
    md_escape,
    render_latex,
    render_markdown,
)

EVIL_IMAGE = "<script>alert(1)</script>"
EVIL_LABEL = "<img src=x onerror=alert(2)> & co_1%"
LPIPS_REASON = "missing weight files (qbench never downloads): alexnet.pth"

CONFIG = f"""
name = "hand"
description = "hand-made results"
model = "tiny"
bits = ["W4A4", "W2A2"]
datasets = ["demo", "urban"]
metrics = ["psnr", "ssim", "niqe", "lpips"]
limit = 2
[calibration]
n = 4
lr_crop = 32
[[methods]]
name = "fp"
label = "FP"
[[methods]]
name = "minmax"
label = "MinMax"
[[methods]]
name = "ptq4dm"
label = "PTQ4DM"
[[methods]]
name = "passionsr"
label = "PassionSR"
[[methods]]
name = "qartsr"
label = "QArtSR"
[[methods]]
name = "qartsr-no-trq"
label = "{EVIL_LABEL}"
bits = ["W4A4"]
ablation_of = "qartsr"
"""

# (label, bits) -> dataset -> metric -> value; None = unavailable (reason below)
VALUES = {
    ("FP", "FP"): {"demo": (30.0, 0.9, 3.0), "urban": (28.0, 0.8, 3.5)},
    ("MinMax", "W4A4"): {"demo": (25.274, 0.70, 5.0), "urban": (20.0, 0.50, 6.0)},
    ("PTQ4DM", "W4A4"): {"demo": (25.271, 0.72, 4.5), "urban": (21.0, 0.55, None)},
    ("PassionSR", "W4A4"): {"demo": (24.0, 0.71, 4.9), "urban": (20.5, 0.56, 5.0)},
    ("QArtSR", "W4A4"): {"demo": (25.10, 0.7199, 4.8), "urban": (22.0, 0.5601, 4.0)},
    (EVIL_LABEL, "W4A4"): {"demo": (24.60, 0.73, 4.9), "urban": (22.5, 0.50, 4.1)},
    ("MinMax", "W2A2"): {"demo": (15.0, 0.20, 9.0), "urban": (12.0, 0.1, 9.5)},
    ("PTQ4DM", "W2A2"): {"demo": (16.0, 0.25, 8.0), "urban": (13.0, 0.2, 9.0)},
}
FAILED = {("PassionSR", "W2A2"): ("failed", "RuntimeError: out of patience"),
          ("QArtSR", "W2A2"): ("diverged", "NaN/Inf: UNet produced NaN")}  # fmt: skip


class Catalog:
    def names(self):
        return ["fp", "minmax", "ptq4dm", "passionsr", "qartsr", "qartsr-no-trq"]

    def info(self, name):
        if name not in self.names():
            raise UnknownNameError("method", name, self.names())
        return MethodInfo(name != "fp", name != "fp")

    def resolve_config(self, name, bits, scope, params):
        return {"method": name, "bits": bits, "scope": scope}


def crop_png(seed: int, box):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:32, 0:32]
    image = np.stack([x / 31, y / 31, np.full_like(x, 0.5, dtype=float)], -1)
    image = image * (0.3 + 0.7 * (seed % 2)) + rng.uniform(0, 0.1, image.shape)
    return png_crop(np.clip(image, 0, 1).astype(np.float32), box)


@pytest.fixture
def stored_run(tmp_path) -> Path:
    path = tmp_path / "hand.toml"
    path.write_text(CONFIG)
    config = load_run_config(path, methods=Catalog(), dataset_names=["demo", "urban"])
    cells = expand_cells(config, {"demo": "d" * 64, "urban": "e" * 64})
    run_dir = tmp_path / "run"
    with RunStore(run_dir) as store:
        store.write_config(config.to_dict(), cells)
        store.add_provenance({"started_at": "2026-01-01T00:00:00+00:00", "hostname": "testhost",
                              "git": {"commit": "f" * 40, "dirty": True}, "libraries": {"torch": "2.14.1"},
                              "data_manifests": {"demo": "d" * 64}, "calibration_seeds": [0], "limit": 2})  # fmt: skip
        for index, cell in enumerate(cells):
            key = (cell.label, cell.bits)
            if key in FAILED:
                status, reason = FAILED[key]
                store.write_cell(cell, CellOutcome(cell.cell_id, status, reason=reason))
                continue
            datasets, rows, crops = {}, [], []
            for dataset, (psnr, ssim, niqe) in VALUES[key].items():
                means = {"psnr": psnr, "ssim": ssim}
                unavailable = {"lpips": LPIPS_REASON}
                if niqe is None:
                    unavailable["niqe"] = "NIQE needs images of at least 96x96 pixels"
                else:
                    means["niqe"] = niqe
                datasets[dataset] = {"images": 2, "means": means, "unavailable": unavailable}
                for image, offset in ((EVIL_IMAGE, -0.5), ("plain", 0.5)):
                    rows.append(
                        {"dataset": dataset, "image": image, "psnr": psnr + offset, "ssim": ssim}
                    )
                if dataset == "demo":
                    box = centre_box(32, 32, 16)
                    crops.append(CropImage("demo", EVIL_IMAGE, "sr", box, crop_png(index, box)))
                    crops.append(CropImage("demo", EVIL_IMAGE, "hr", box, crop_png(100, box)))
                    crops.append(CropImage("demo", EVIL_IMAGE, "lr_up", box, crop_png(101, box)))
            curves = {}
            if cell.label == "QArtSR":
                curves = {"tstar_sweep": {"x": [999, 499, 1], "y": [0.3, 0.1, 0.2], "xlabel": "T*", "ylabel": "loss"},
                          "rpq/loss": {"x": None, "y": [1.0, 0.5, 0.25], "xlabel": "step", "ylabel": "loss"}}  # fmt: skip
            store.write_cell(cell, CellOutcome(cell.cell_id, "done", datasets=datasets, rows=rows,
                                               crops=crops, curves=curves,
                                               metric_specs={"niqe": {"lower_better": True}}))  # fmt: skip
    return run_dir


def table_rows(markdown: str) -> dict[str, list[str]]:
    rows = {}
    for line in markdown.splitlines():
        if line.startswith("| W"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            rows[f"{cells[0]} {cells[1]}"] = cells[2:]
    return rows


def test_main_table_ranks_displayed_values_with_ties_and_footnotes(stored_run):
    table = main_table(load_run(stored_run))
    markdown = render_markdown(table)
    rows = table_rows(markdown)
    # columns: demo psnr ssim niqe lpips | urban psnr ssim niqe lpips
    assert rows["W32A32 FP"][:3] == ["30.00", "0.9000", "3.000"]  # reference: never bold
    # 25.274 and 25.271 both print 25.27: tied best; QArtSR's 25.10 is the next distinct value
    assert rows["W4A4 MinMax"][0] == "**25.27**" and rows["W4A4 PTQ4DM"][0] == "**25.27**"
    assert rows["W4A4 QArtSR"][0] == "<u>25.10</u>" and rows["W4A4 PassionSR"][0] == "24.00"
    # SSIM: 0.72 best; 0.7199 and 0.71 ... QArtSR 0.7199 is second
    assert rows["W4A4 PTQ4DM"][1] == "**0.7200**" and rows["W4A4 QArtSR"][1] == "<u>0.7199</u>"
    # NIQE is lower-better: 4.5 best, 4.8 second
    assert rows["W4A4 PTQ4DM"][2] == "**4.500**" and rows["W4A4 QArtSR"][2] == "<u>4.800</u>"
    # one unavailable value: "–" with its own footnote; LPIPS unavailable everywhere: header footnote
    niqe_note = rows["W4A4 PTQ4DM"][6]
    assert (
        niqe_note.startswith("–<sup>")
        and "NIQE unavailable: NIQE needs images of at least 96x96" in markdown
    )
    assert rows["W4A4 MinMax"][3] == "–" and "LPIPS↓<sup>a</sup>" in markdown.replace("demo ", "")
    assert "<sup>a</sup> LPIPS unavailable: missing weight files" in markdown
    # failed and diverged rows keep their place, print dashes and say why
    assert rows["W2A2 PassionSR (failed)<sup>c</sup>"] == ["–"] * 8
    assert "<sup>c</sup> failed: RuntimeError: out of patience" in markdown
    assert any(k.startswith("W2A2 QArtSR (diverged)") for k in rows)
    assert "diverged: NaN/Inf: UNet produced NaN" in markdown
    # urban W2A2: only MinMax and PTQ4DM have values
    assert rows["W2A2 PTQ4DM"][4] == "**13.00**" and rows["W2A2 MinMax"][4] == "<u>12.00</u>"
    # ablations are not in the main table; notes carry the limit and simulated quantization
    assert not [k for k in rows if "onerror" in k]
    assert "first 2 image(s)" in markdown and "simulated (fake) quantization" in markdown
    assert list(rows)[0] == "W32A32 FP" and list(rows)[1].startswith("W4A4")


def test_latex_table_structure_and_escaping(stored_run):
    table = main_table(load_run(stored_run), include_ablations=True)
    tex = render_latex(table)
    for token in (r"\toprule", r"\midrule", r"\bottomrule", r"\cmidrule(lr){3-6}", r"\cmidrule(lr){7-10}",
                  r"\multicolumn{4}{c}{demo}", r"\textbf{25.27}", r"\underline{25.10}",
                  r"PSNR$\uparrow$", r"NIQE$\downarrow$", r"\begin{tabular}{llrrrrrrrr}"):  # fmt: skip
        assert token in tex, token
    assert tex.count(r"\midrule") == 3  # one per bit group
    assert tex.count(r"\\") == 2 + 1 + 5 + 4  # two header lines, then the rows
    assert r"\textless{}img src=x onerror=alert(2)\textgreater{} \& co\_1\%" in tex
    assert "–" not in tex and "↑" not in tex  # plain pdflatex input
    assert latex_escape("--limit 2") == "-{}-limit 2"
    assert latex_escape("a_b & 100% {x} #1 ~ ^ \\ ≤ ☃") == (
        r"a\_b \& 100\% \{x\} \#1 \textasciitilde{} \textasciicircum{} \textbackslash{} $\leq$ [U+2603]"
    )


def test_latex_table_compiles_with_pdflatex(stored_run, tmp_path):
    pdflatex = shutil.which("pdflatex")
    if pdflatex is None:
        pytest.skip(
            "pdflatex is not installed (apt-get install texlive-latex-base texlive-latex-recommended)"
        )
    results = load_run(stored_run)
    body = render_latex(main_table(results, include_ablations=True)) + render_latex(
        ablation_table(results, "qartsr"), label="tab:abl"
    )
    (tmp_path / "doc.tex").write_text(latex_document(body))
    proc = subprocess.run(
        [pdflatex, "-interaction=nonstopmode", "-halt-on-error", "doc.tex"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert (tmp_path / "doc.pdf").stat().st_size > 1000


def test_ablation_deltas_against_the_base(stored_run):
    results = load_run(stored_run)
    table = ablation_table(results, "qartsr")
    markdown = render_markdown(table)
    rows = table_rows(markdown)
    base = rows["W4A4 QArtSR (base)"]
    assert base[:3] == ["25.10", "0.7199", "4.800"]
    ablation = rows[f"W4A4 {md_escape(EVIL_LABEL)}"]
    assert ablation[:3] == ["-0.50", "+0.0101", "+0.100"]  # computed on unrounded means
    assert ablation[4:7] == ["+0.50", "-0.0601", "+0.100"]
    assert "Δ = ablation − QArtSR" in markdown
    assert "W2A2" not in "".join(rows)  # the ablation exists at W4A4 only; base W2A2 diverged
    with pytest.raises(QBenchError, match="no ablations of 'minmax'"):
        ablation_table(results, "minmax")
    with pytest.raises(QBenchError, match="no method 'nope'"):
        ablation_table(results, "nope")


def test_markdown_escaping_keeps_config_strings_as_text():
    assert md_escape("<b>x</b>|*y*_z") == "&lt;b&gt;x&lt;/b&gt;\\|\\*y\\*\\_z"


def test_plots_are_written_as_png_and_pdf(stored_run, tmp_path):
    from PIL import Image

    from reports.plots import make_plots

    files = make_plots(load_run(stored_run), tmp_path / "plots")
    names = {f.name for f in files}
    for stem in (
        "metric_vs_bits_demo",
        "metric_vs_bits_urban",
        "tstar_sweep",
        "calibration_curves",
        "per_image_demo",
    ):
        assert {f"{stem}.png", f"{stem}.pdf"} <= names, stem
    image = np.asarray(
        Image.open(tmp_path / "plots" / "metric_vs_bits_demo.png").convert("L"), dtype=float
    )
    assert image.std() > 5  # not blank
    assert (tmp_path / "plots" / "tstar_sweep.pdf").read_bytes().startswith(b"%PDF")


def test_visual_html_escapes_names_and_is_self_contained(stored_run, tmp_path):
    from reports.visual import render_html, write_grids

    results = load_run(stored_run)
    page = render_html(results)
    assert EVIL_IMAGE not in page and html.escape(EVIL_IMAGE) in page
    assert page.count("<script>") == 1  # only the page's own slider script
    assert "onerror=alert" not in page.replace("onerror=alert(2)&gt;", "")
    assert (
        "http://" not in page and "https://" not in page and 'src="data:image/png;base64,' in page
    )
    # sliders: MinMax, PTQ4DM, PassionSR, QArtSR at W4A4; MinMax, PTQ4DM at W2A2
    assert page.count('type="range"') == 6
    grids = write_grids(results, tmp_path)
    assert sorted(p.name for p in grids) == ["visual_demo_W2A2.png", "visual_demo_W4A4.png"]
    from PIL import Image

    grid = Image.open(grids[0])
    assert grid.width > 5 * 32 and grid.height > 32


def test_build_report_writes_everything_from_stored_results(stored_run, tmp_path):
    from reports.build import build_report

    files = build_report(stored_run, tmp_path / "report")
    markdown = files["markdown"].read_text()
    assert "simulated (fake) quantization" in markdown
    assert "**limit**: the first 2 image(s)" in markdown
    assert "git commit `" + "f" * 40 + "` (dirty working tree)" in markdown
    assert "## Ablations" in markdown and files["ablations"]["qartsr"][1].read_text().startswith(
        "%"
    )
    assert "(failed)" in markdown and "(diverged)" in markdown
    assert files["latex"].read_text().count(r"\midrule") == 3
    assert files["visual_html"].is_file() and len(files["plots"]) >= 8
    assert EVIL_IMAGE not in markdown


# --------------------------------------------------------------------------------------------
# headless Chromium


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _screenshot(browser: str, page: Path, fragment: str, out: Path, profile: Path) -> np.ndarray:
    from PIL import Image

    proc = subprocess.run(
        [
            browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
            f"--user-data-dir={profile}", "--window-size=1000,900", "--virtual-time-budget=3000",
            f"--screenshot={out}", f"{page.as_uri()}{fragment}",
        ],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.is_file(), proc.stderr[-2000:]
    return np.asarray(Image.open(io.BytesIO(out.read_bytes())).convert("RGB"), dtype=np.int16)


@pytest.mark.browser
def test_visual_page_renders_in_chromium_and_the_slider_moves(stored_run, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("headless Chromium is not installed (apt-get install -y chromium)")
    from reports.visual import write_html

    page = write_html(load_run(stored_run), tmp_path / "visual.html")
    left = _screenshot(browser, page, "#split=5", tmp_path / "left.png", tmp_path / "profile1")
    right = _screenshot(browser, page, "#split=95", tmp_path / "right.png", tmp_path / "profile2")
    assert left.shape == right.shape
    assert left.std() > 10 and (left != 255).any(axis=2).mean() > 0.05  # not blank
    changed = (np.abs(left - right).sum(axis=2) > 30).mean()
    assert changed > 0.01, "moving the sliders did not change the rendering"
    dom = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         f"--user-data-dir={tmp_path / 'profile3'}", "--virtual-time-budget=2000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    ).stdout  # fmt: skip
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom  # the file name is text, not an element
    assert 'style="--pos: 50%;"' in dom  # the slider script ran (its CSP hash matches)


def test_curves_are_extracted_from_method_records_by_convention():
    from harness.cells import extract_curves

    record = {
        "curves": {"rpq": [3, 2, 1], "et": {"x": [0, 5], "y": [1.0, 0.5], "xlabel": "iter"}},
        "tstar_sweep": {"timestep": [999, 499, 1], "image_loss": [0.3, 0.1, 0.2]},
        "tstar_sweep_detail": {
            "timesteps": [999, 499, 1],
            "image_loss": [0.3, 0.1, 0.2],
            "selected": 499,
        },
        "phases": {"unet": {"let_loss": [0.5, 0.25]}, "note": "text"},
        "timesteps_tried": [999, 499],  # neither a loss nor a sweep key: not a curve
    }
    curves = extract_curves(record)
    assert sorted(curves) == ["et", "phases/unet/let_loss", "rpq", "tstar_sweep"]
    assert curves["tstar_sweep"] == {
        "kind": "sweep", "x": [999.0, 499.0, 1.0], "y": [0.3, 0.1, 0.2],
        "xlabel": "timestep", "ylabel": "image_loss",
    }  # fmt: skip
    assert curves["et"]["x"] == [0.0, 5.0] and curves["et"]["xlabel"] == "iter"
    assert curves["rpq"]["kind"] == "loss" and curves["rpq"]["x"] is None
