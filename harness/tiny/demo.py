"""Build the embedded ``demo`` dataset from the held-out photos (:data:`photos.DEMO_IDS`).

Each photo is resized (PIL bicubic, antialiased) so that its long side is 768 px, then the centre
256×256 crop is the HR image. ``LR/`` is PIL bicubic ÷4 (64×64); ``LR_realesrgan/`` is the
``stablesr-test`` degradation of the same HR with a per-image seed derived from (``DEMO_SEED``, name).
``MANIFEST.toml`` records each image's source, licence, credit, crop and degradation parameters.
The photos are disjoint from the tiny model's training photos.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from harness.tiny import photos

DEMO_SEED = 2025
LONG_SIDE = 768
CROP = 256


def _toml_string(value: str) -> str:
    return json.dumps(value)  # JSON string escaping is valid TOML basic-string escaping


def build_demo(out_dir: str | Path) -> list[dict]:
    from harness.degradation import degrade, derive_seed
    from harness.images import save_png

    out_dir = Path(out_dir)
    for sub in ("HR", "LR", "LR_realesrgan"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    records = []
    for photo_id in photos.DEMO_IDS:
        source = photos.photo(photo_id)
        image = source.load()
        scale = LONG_SIDE / max(image.size)
        size = (round(image.width * scale), round(image.height * scale))
        image = image.resize(size, Image.BICUBIC, reducing_gap=None)
        left, top = (size[0] - CROP) // 2, (size[1] - CROP) // 2
        hr = image.crop((left, top, left + CROP, top + CROP))
        name = photo_id
        hr.save(out_dir / "HR" / f"{name}.png")
        hr.resize((CROP // 4, CROP // 4), Image.BICUBIC).save(out_dir / "LR" / f"{name}.png")
        seed = derive_seed(DEMO_SEED, name)
        lr_deg, params = degrade(np.asarray(hr, dtype=np.float32) / 255.0, "stablesr-test", seed)
        save_png(out_dir / "LR_realesrgan" / f"{name}.png", lr_deg.astype(np.float32) / 255.0)
        records.append({
            "name": name, "source_package": source.package, "source_path": source.relpath,
            "licence": source.licence, "credit": source.credit,
            "resize_long_side": LONG_SIDE, "crop_box": [left, top, left + CROP, top + CROP],
            "degradation": {"preset": "stablesr-test", "seed": seed, "params": params},
        })  # fmt: skip
    lines = [
        "# The demo images: held-out photographs (never used to train the tiny model).",
        "# Written by harness/tiny/demo.py:build_demo; see docs/model.md.",
        "",
    ]
    for r in records:
        lines += [
            "[[images]]",
            f"name = {_toml_string(r['name'])}",
            f"source_package = {_toml_string(r['source_package'])}",
            f"source_path = {_toml_string(r['source_path'])}",
            f"licence = {_toml_string(r['licence'])}",
            f"credit = {_toml_string(r['credit'])}",
            f"resize_long_side = {r['resize_long_side']}",
            f"crop_box = {r['crop_box']}",
            f"degradation_preset = {_toml_string('stablesr-test')}",
            f"degradation_seed = {r['degradation']['seed']}",
            f"degradation_params = {_toml_string(json.dumps(r['degradation']['params'], sort_keys=True))}",
            "",
        ]
    (out_dir / "MANIFEST.toml").write_text("\n".join(lines))
    return records
