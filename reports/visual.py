"""Visual comparison like the papers' figures, from the crops stored with each cell.

For each stored image the same window (chosen at run time, :func:`harness.cells.centre_box`) of HR,
the bicubic-upsampled LR, the W32A32 rows and every method's output is shown side by side:

- ``visual_<dataset>_<bits>.png``: a grid (rows = images, columns = HR, LR ×s bicubic, W32A32
  rows, then each method at that bits), crops enlarged with nearest-neighbour so pixels stay visible;
- ``visual.html``: one self-contained page (every image embedded as a base64 ``data:`` URI, no
  external resource) with the reference crops and a before/after slider per pair: the left part of
  each slider shows the FP output ("before"), the right part the quantized method ("after"); the
  divider follows the range input. ``visual.html#split=30`` opens every slider at 30 %.

Security: every string that comes from a file name, a dataset name or the config (labels) is escaped
with :func:`html.escape` before it reaches the page, so a file named ``<script>….png`` renders as
text. The page carries a Content-Security-Policy that allows only ``data:`` images, inline styles and
the one inline script whose SHA-256 is listed, so even an escaping mistake could not run script.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
from dataclasses import dataclass, field
from pathlib import Path

from reports import FP_BITS, FP_DISPLAY_BITS, RunResults
from reports.tables import SIMULATED_NOTE, bits_sort_key

TILE = 192
"""Target display width of one crop in the PNG grid and the HTML page (pixels)."""


@dataclass
class ImageCrops:
    """The crops of one dataset image: references and per-(label, bits) outputs."""

    dataset: str
    image: str
    hr: bytes | None = None
    lr_up: bytes | None = None
    outputs: dict[tuple[str, str], bytes] = field(default_factory=dict)


def collect_crops(results: RunResults, *, include_ablations: bool = False) -> list[ImageCrops]:
    """Crops of every stored image, in the order the cells stored them (first seed per row)."""
    found: dict[tuple[str, str], ImageCrops] = {}
    entries = [e for e in results.method_entries() if include_ablations or not e.get("ablation_of")]
    allowed = {e["label"] for e in entries}
    cells = sorted(
        (c for c in results.cells if c.status == "done" and c.label in allowed),
        key=lambda c: (c.seed is None, c.seed if c.seed is not None else 0),
    )
    for cell in cells:
        for entry in cell.record.get("crops") or []:
            key = (str(entry["dataset"]), str(entry["image"]))
            item = found.setdefault(key, ImageCrops(*key))
            data = results.crop(entry)
            kind = entry["kind"]
            if kind == "hr" and item.hr is None:
                item.hr = data
            elif kind == "lr_up" and item.lr_up is None:
                item.lr_up = data
            elif kind == "sr":
                item.outputs.setdefault((cell.label, cell.bits), data)
    return list(found.values())


def _ordered_columns(
    results: RunResults, include_ablations: bool
) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """(labels of W32A32 rows, [(bits, labels at those bits)]) in config order."""
    entries = [e for e in results.method_entries() if include_ablations or not e.get("ablation_of")]
    reference = [e["label"] for e in entries if FP_BITS in e["bits"]]
    bits_all = sorted({b for e in entries for b in e["bits"] if b != FP_BITS}, key=bits_sort_key)
    groups = [(b, [e["label"] for e in entries if b in e["bits"]]) for b in bits_all]
    return reference, groups


def _scale_for(width: int) -> int:
    return max(1, TILE // max(width, 1))


# --------------------------------------------------------------------------------------------
# PNG grid


def _font(size: int = 13):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _fit(draw, text: str, font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def grid_png(
    items: list[ImageCrops], columns: list[tuple[str, str | None]], scale_label: str
) -> bytes:
    """One PNG: a header row of column titles, then one row per image (missing crops stay grey).

    ``columns`` are ``(title, key)`` where key is ``"hr"``, ``"lr_up"`` or a ``label|bits`` output."""
    from PIL import Image, ImageDraw

    tiles = []
    for item in items:
        row = []
        for _, key in columns:
            data = item.hr if key == "hr" else item.lr_up if key == "lr_up" else None
            if key and "|" in key:
                label, bits = key.split("|", 1)
                data = item.outputs.get((label, bits))
            row.append(Image.open(io.BytesIO(data)).convert("RGB") if data else None)
        tiles.append(row)
    sizes = [t.size for row in tiles for t in row if t is not None]
    if not sizes:
        raise ValueError("no crops to draw")
    cw, ch = max(w for w, _ in sizes), max(h for _, h in sizes)
    scale = _scale_for(cw)
    tw, th = cw * scale, ch * scale
    pad, header, side = 4, 22, 120
    font = _font()
    canvas = Image.new(
        "RGB",
        (side + len(columns) * (tw + pad) + pad, header + len(items) * (th + pad) + pad),
        "white",
    )
    draw = ImageDraw.Draw(canvas)
    for j, (title, _) in enumerate(columns):
        x = side + pad + j * (tw + pad)
        draw.text((x, 4), _fit(draw, title, font, tw), fill="black", font=font)
    for i, (item, row) in enumerate(zip(items, tiles, strict=True)):
        y = header + pad + i * (th + pad)
        draw.text((4, y + 4), _fit(draw, item.image, font, side - 8), fill="black", font=font)
        for j, tile in enumerate(row):
            x = side + pad + j * (tw + pad)
            if tile is None:
                draw.rectangle([x, y, x + tw - 1, y + th - 1], fill=(200, 200, 200))
                draw.text((x + 4, y + 4), "missing", fill="black", font=font)
            else:
                canvas.paste(
                    tile.resize((tile.width * scale, tile.height * scale), Image.NEAREST), (x, y)
                )
    draw.text((4, 4), _fit(draw, scale_label, font, side - 8), fill="gray", font=font)
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()


def write_grids(
    results: RunResults, out_dir: Path, *, include_ablations: bool = False
) -> list[Path]:
    """One grid PNG per dataset and bits setting."""
    from harness.store import atomic_write

    items = collect_crops(results, include_ablations=include_ablations)
    if not items:
        return []
    reference, groups = _ordered_columns(results, include_ablations)
    written = []
    for dataset in dict.fromkeys(item.dataset for item in items):
        ds_items = [item for item in items if item.dataset == dataset]
        for bits, labels in groups or [("FP", [])]:
            columns: list[tuple[str, str | None]] = [("HR", "hr"), ("LR (bicubic)", "lr_up")]
            columns += [(f"{label} {FP_DISPLAY_BITS}", f"{label}|{FP_BITS}") for label in reference]
            columns += [(f"{label} {bits}", f"{label}|{bits}") for label in labels if bits != "FP"]
            png = grid_png(ds_items, columns, "nearest zoom")
            path = out_dir / f"visual_{_slug(dataset)}_{_slug(bits)}.png"
            atomic_write(path, png)
            written.append(path)
    return written


# --------------------------------------------------------------------------------------------
# HTML


_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; background: #fff; }
.note { color: #555; max-width: 60em; }
.strip { display: flex; flex-wrap: wrap; gap: 10px; margin: 0.5em 0 1em; }
figure { margin: 0; }
figcaption { font-size: 12px; max-width: 100%; overflow-wrap: anywhere; }
img.crop { image-rendering: pixelated; display: block; }
.slider { position: relative; display: inline-block; line-height: 0; --pos: 50%; }
.slider img { image-rendering: pixelated; display: block; }
.slider .before { position: absolute; top: 0; left: 0; clip-path: inset(0 calc(100% - var(--pos)) 0 0); }
.slider .divider { position: absolute; top: 0; bottom: 0; left: var(--pos); width: 2px;
  margin-left: -1px; background: #ff0; box-shadow: 0 0 2px #000; pointer-events: none; }
.slider input { position: absolute; inset: 0; width: 100%; height: 100%; margin: 0; opacity: 0;
  cursor: ew-resize; }
"""

_SCRIPT = """
(function () {
  function bind(input) {
    var box = input.parentElement;
    function update() { box.style.setProperty('--pos', input.value + '%'); }
    input.addEventListener('input', update);
    update();
  }
  var inputs = document.querySelectorAll('.slider input[type=range]');
  for (var i = 0; i < inputs.length; i++) { bind(inputs[i]); }
  var match = /(?:^#|&)split=(\\d{1,3})/.exec(window.location.hash);
  if (match) {
    var value = Math.max(0, Math.min(100, parseInt(match[1], 10)));
    for (var j = 0; j < inputs.length; j++) {
      inputs[j].value = String(value);
      inputs[j].dispatchEvent(new Event('input'));
    }
  }
})();
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _png_size(png: bytes) -> tuple[int, int]:
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        return image.size


def _img(png: bytes, alt: str, css: str = "crop") -> str:
    w, h = _png_size(png)
    s = _scale_for(w)
    return f'<img class="{css}" src="{_data_uri(png)}" width="{w * s}" height="{h * s}" alt="{_e(alt)}">'


def render_html(
    results: RunResults, *, include_ablations: bool = False, title: str | None = None
) -> str:
    """The self-contained comparison page (module docstring)."""
    items = collect_crops(results, include_ablations=include_ablations)
    reference, groups = _ordered_columns(results, include_ablations)
    fp_label = reference[0] if reference else None
    name = results.config.get("name", "run")
    page_title = title or f"qbench visual comparison: {name}"
    script_hash = base64.b64encode(hashlib.sha256(_SCRIPT.encode("utf-8")).digest()).decode()
    csp = (
        "default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
        f"script-src 'sha256-{script_hash}'"
    )
    out = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_e(csp)}">',
        f"<title>{_e(page_title)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>{_e(page_title)}</h1>",
        f'<p class="note">{_e(SIMULATED_NOTE)}</p>',
    ]
    if results.limit:
        out.append(
            f'<p class="note">Limited run: first {_e(results.limit)} image(s) per dataset.</p>'
        )
    if not items:
        out.append('<p class="note">No crops were stored in this run.</p>')
    out.append(
        '<p class="note">Each slider shows the full-precision output on the left ("before") and the '
        'quantized method on the right ("after"); drag to move the divider. Crops are enlarged with '
        "nearest-neighbour interpolation.</p>"
    )
    for dataset in dict.fromkeys(item.dataset for item in items):
        out.append(f"<h2>{_e(dataset)}</h2>")
        for item in (i for i in items if i.dataset == dataset):
            out.append(f'<section class="image"><h3>{_e(item.image)}</h3><div class="strip">')
            refs = [("HR", item.hr), ("LR (bicubic)", item.lr_up)]
            refs += [
                (f"{label} {FP_DISPLAY_BITS}", item.outputs.get((label, FP_BITS)))
                for label in reference
            ]
            for caption, png in refs:
                if png:
                    out.append(
                        f"<figure>{_img(png, f'{caption}: {item.image}')}"
                        f"<figcaption>{_e(caption)}</figcaption></figure>"
                    )
            out.append("</div>")
            before = item.outputs.get((fp_label, FP_BITS)) if fp_label else None
            for bits, labels in groups:
                pairs = [(label, item.outputs.get((label, bits))) for label in labels]
                pairs = [(label, png) for label, png in pairs if png]
                if not pairs:
                    continue
                out.append(f'<h4>{_e(bits)}</h4><div class="strip">')
                for label, after in pairs:
                    caption = (
                        f"{fp_label} {FP_DISPLAY_BITS} | {label} {bits}"
                        if before
                        else f"{label} {bits}"
                    )
                    if before is None:
                        out.append(
                            f"<figure>{_img(after, f'{label} {bits}: {item.image}')}"
                            f"<figcaption>{_e(caption)}</figcaption></figure>"
                        )
                        continue
                    out.append(
                        '<figure class="pair"><div class="slider">'
                        f"{_img(after, f'after: {label} {bits}', 'after')}"
                        f"{_img(before, f'before: {fp_label}', 'before')}"
                        '<span class="divider"></span>'
                        f'<input type="range" min="0" max="100" value="50" '
                        f'aria-label="{_e(f"slider {label} {bits} {item.image}")}">'
                        f"</div><figcaption>{_e(caption)}</figcaption></figure>"
                    )
                out.append("</div>")
            out.append("</section>")
    out.append(f"<script>{_SCRIPT}</script>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write_html(results: RunResults, path: Path, **kwargs) -> Path:
    from harness.store import atomic_write

    atomic_write(path, render_html(results, **kwargs))
    return path


def _slug(text: str) -> str:
    from reports.plots import _slug as slug

    return slug(text)


__all__ = ["ImageCrops", "collect_crops", "grid_png", "render_html", "write_grids", "write_html"]
