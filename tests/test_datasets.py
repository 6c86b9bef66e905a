"""Tests for harness.datasets and `qbench validate` / `qbench ls datasets`.

The acceptance test builds a corrupted copy of ../shared/data/Set5 in tmp_path (truncated PNG,
missing LR, extra file, RGBA image, 16-bit image, HR not 4x its LR, HR with a small excess) and
checks that each gives the documented problem or conversion, in the API and in the CLI.
"""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from harness import paths
from harness.datasets import (
    get_dataset,
    list_datasets,
    load_definition,
    load_pair,
    validate_dataset,
)
from harness.degradation import degrade, derive_seed
from harness.errors import ConfigError, DatasetError, UnknownNameError
from harness.images import load_image

SHARED = paths.repo_root().parent / "shared" / "data"
SET5 = SHARED / "Set5"
needs_set5 = pytest.mark.skipif(
    not (SET5 / "SHA256SUMS").is_file(),
    reason=f"{SET5} is absent: the shared Set5 evaluation images are needed for this test",
)

REQUIRED = {
    "set5",
    "set14",
    "bsd100",
    "urban100",
    "realsr",
    "realsr-stablesr",
    "drealsr",
    "drealsr-stablesr",
    "div2k-val",
    "div2k-val-realesrgan",
    "demo",
    "demo-realesrgan",
}


def _copy_tree(source: Path, target: Path) -> None:
    """Copy files with fresh permissions (the shared data is read-only)."""
    for file in source.rglob("*"):
        destination = target / file.relative_to(source)
        if file.is_dir():
            destination.mkdir(parents=True, exist_ok=True)
        else:
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(file, destination)


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _noise(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.fixture
def corrupted_set5(tmp_path) -> Path:
    import cv2

    if not (SET5 / "SHA256SUMS").is_file():
        pytest.skip(f"{SET5} is absent: the shared Set5 evaluation images are needed")
    root = tmp_path / "Set5"
    _copy_tree(SET5, root)
    # 1. truncated PNG
    data = (root / "HR/img_001.png").read_bytes()
    (root / "HR/img_001.png").write_bytes(data[: len(data) // 2])
    # 2. missing LR
    (root / "LR/img_002.png").unlink()
    # 3. extra file
    (root / "LR/notes.txt").write_text("not an image\n")
    # 4. RGBA image
    rgb = np.asarray(Image.open(root / "HR/img_003.png").convert("RGB"))
    alpha = np.full(rgb.shape[:2] + (1,), 255, np.uint8)
    Image.fromarray(np.concatenate([rgb, alpha], axis=2)).save(root / "HR/img_003.png")
    # 5. 16-bit RGB LR, and an HR with a 3 x 2 px excess (crop policy)
    lr8 = np.asarray(Image.open(root / "LR/img_004.png").convert("RGB"))
    assert cv2.imwrite(str(root / "LR/img_004.png"), (lr8.astype(np.uint16) * 257)[:, :, ::-1])
    hr4 = np.asarray(Image.open(root / "HR/img_004.png").convert("RGB"))
    Image.fromarray(np.pad(hr4, ((0, 2), (0, 3), (0, 0)), mode="edge")).save(
        root / "HR/img_004.png"
    )
    # 6. HR that is not 4x its LR (8 px short)
    hr5 = np.asarray(Image.open(root / "HR/img_005.png").convert("RGB"))
    Image.fromarray(np.ascontiguousarray(hr5[:, :-8])).save(root / "HR/img_005.png")
    return root


# ----------------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------------


def test_all_shipped_definitions_parse_and_cover_the_required_sets():
    names = set(list_datasets())
    assert names >= REQUIRED
    for name in names:
        definition = get_dataset(name)
        assert definition.version and definition.citation and definition.licence
        assert definition.layouts and definition.scale == 4


def test_shipped_definitions_pin_the_documented_layouts():
    div2k = get_dataset("div2k-val")
    layout = div2k.layouts[0]
    assert (layout.hr_dirs, layout.lr_dirs) == (("DIV2K_valid_HR",), ("DIV2K_valid_LR_bicubic/X4",))
    assert (layout.hr_template, layout.lr_template) == ("{stem}", "{stem}x4")
    realsr = get_dataset("realsr").layouts[0]
    assert realsr.hr_dirs == ("Canon/Test/4", "Nikon/Test/4") == realsr.lr_dirs
    assert (realsr.hr_template, realsr.lr_template) == ("{stem}_HR", "{stem}_LR4")
    assert get_dataset("realsr").expected_count == 100
    assert (
        get_dataset("drealsr").expected_count
        == 93
        == get_dataset("drealsr-stablesr").expected_count
    )
    synth = get_dataset("div2k-val-realesrgan").synthesize
    assert (
        synth is not None
        and synth.preset == "stablesr-test"
        and synth.source_dataset == "div2k-val"
    )
    assert get_dataset("demo").candidate_roots()[0] == paths.repo_root() / "datasets" / "demo"
    set5 = {layout.name: layout for layout in get_dataset("set5").layouts}
    assert len(set5["hr-lr"].sha256) == 10
    assert set5["hr-lr_bicubic-x4"].lr_template == "{stem}x4"


def test_unknown_name_suggests_close_matches():
    with pytest.raises(UnknownNameError, match="Did you mean 'set5'"):
        get_dataset("set6")


def _write_def(directory: Path, name: str, body: str) -> Path:
    path = directory / f"{name}.toml"
    header = f"""
        name = "{name}"
        version = "1"
        description = "test"
        scale = 4
        hr_policy = "crop"
        source = "test"
        citation = "test"
        licence = "test"
    """
    path.write_text(textwrap.dedent(header) + textwrap.dedent(body))
    return path


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('root_candidates = ["x"]\nfoo = 1\n[[layouts]]\nname="a"\nlr_dir="LR"\n', "unknown key"),
        ('root_candidates = ["x"]\n[[layouts]]\nname="a"\nlr_dir="../LR"\n', "without '..'"),
        ('root_candidates = ["/abs"]\n[[layouts]]\nname="a"\nlr_dir="LR"\n', "without '..'"),
        (
            'root_candidates = ["x"]\n[[layouts]]\nname="a"\nlr_dir="LR"\nhr_dir="HR"\n'
            'pairing="template"\nlr_template="{name}x4"\n',
            "exactly once",
        ),
        (
            'root_candidates = ["x"]\n[[layouts]]\nname="a"\nlr_dir="LR"\nhr_dir="HR"\n'
            '[layouts.sha256]\n"../HR/a.png" = "' + "0" * 64 + '"\n',
            "without '..'",
        ),
        (
            'root_candidates = ["x"]\n[[layouts]]\nname="a"\nlr_dir="D"\nhr_dir="D"\n',
            "distinct templates",
        ),
        ('root_candidates = ["x"]\nlayouts = []\n', "at least one"),
    ],
    ids=[
        "unknown-key",
        "dotdot-dir",
        "absolute-root",
        "bad-template",
        "dotdot-sha",
        "shared-dir",
        "no-layout",
    ],
)
def test_invalid_definitions_are_rejected_with_the_file_named(tmp_path, body, message):
    path = _write_def(tmp_path, "bad", body)
    with pytest.raises(ConfigError, match=message) as info:
        load_definition(path)
    assert str(path) in str(info.value)


def test_definition_name_must_match_file(tmp_path):
    path = _write_def(
        tmp_path, "one", 'root_candidates = ["x"]\n[[layouts]]\nname="a"\nlr_dir="L"\n'
    )
    path.rename(tmp_path / "two.toml")
    with pytest.raises(ConfigError, match="must equal the file name"):
        load_definition(tmp_path / "two.toml")


def test_missing_root_error_shows_layout_and_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("QBENCH_DATA", str(tmp_path))
    (tmp_path / "DIV2K").mkdir()
    (tmp_path / "DIV2K" / "somethingelse").mkdir()
    with pytest.raises(DatasetError) as info:
        get_dataset("div2k-val").resolve()
    message = str(info.value)
    assert (
        "DIV2K_valid_HR/{stem}.<ext>" in message and "DIV2K_valid_LR_bicubic/X4/{stem}x4" in message
    )
    assert (
        f"{tmp_path / 'DIV2K'} (exists but matches no layout; contains: somethingelse/)" in message
    )
    assert f"{tmp_path / 'div2k'} (does not exist)" in message
    with pytest.raises(DatasetError, match="does not exist"):
        get_dataset("set5").resolve(tmp_path / "nowhere")


# ----------------------------------------------------------------------------------------------
# the real Set5 and its corrupted copy (acceptance)
# ----------------------------------------------------------------------------------------------


@needs_set5
def test_shared_set5_validates_clean_with_checksums():
    resolved = get_dataset("set5").resolve()
    assert resolved.root == SET5 and resolved.layout.name == "hr-lr"
    assert [p.name for p in resolved.pairs] == [f"img_00{i}" for i in range(1, 6)]
    for pair in resolved.pairs:
        assert pair.lr_path.name == pair.hr_path.name and pair.hr_crop is None
    report = validate_dataset(resolved)
    assert report.ok, report.problems
    assert report.checksums_listed == 10 and report.checksums_verified == 10
    assert report.files_without_checksum == 0
    assert report.conversions == () and report.crops == ()
    assert resolved.manifest_hash() == get_dataset("set5").resolve().manifest_hash()


def test_corrupted_copy_reports_every_problem_and_conversion(corrupted_set5):
    resolved = get_dataset("set5").resolve(corrupted_set5, strict=False)
    assert [p.name for p in resolved.pairs] == ["img_001", "img_003", "img_004", "img_005"]
    report = validate_dataset(resolved)
    assert not report.ok
    text = "\n".join(report.problems)
    expected = [
        "HR/img_001.png: corrupted or truncated PNG",
        "HR/img_002.png: unpaired HR file (no LR LR/img_002.<ext>)",
        "LR/notes.txt: extra file (not an image",
        "HR/img_005.png: HR 220x344 is not 4x LR 57x86 (expected 228x344)",
        "found 4 pairs, expected 5",
        "LR/img_002.png: listed in the checksums but missing",
        "HR/img_003.png: sha256 mismatch",
        "LR/img_004.png: sha256 mismatch",
    ]
    for fragment in expected:
        assert fragment in text, f"missing problem {fragment!r} in:\n{text}"
    assert ("HR/img_003.png", "RGBA->RGB (alpha dropped)") in report.conversions
    assert ("LR/img_004.png", "RGB;16->RGB (16-bit scaled by 1/65535)") in report.conversions
    assert report.crops == (("img_004", (0, 0, 280, 280)),)
    with pytest.raises(DatasetError) as info:
        validate_dataset(resolved, raise_on_problems=True)
    assert all(fragment in str(info.value) for fragment in expected)


def test_strict_resolve_lists_all_pairing_and_scale_problems(corrupted_set5):
    with pytest.raises(DatasetError) as info:
        get_dataset("set5").resolve(corrupted_set5)
    message = str(info.value)
    assert str(corrupted_set5) in message
    for fragment in (
        "HR/img_002.png: unpaired",
        "LR/notes.txt: extra file",
        "HR/img_005.png: HR 220x344",
    ):
        assert fragment in message


def test_load_pair_applies_and_records_the_crop(corrupted_set5):
    resolved = get_dataset("set5").resolve(corrupted_set5, strict=False)
    pair = next(p for p in resolved.pairs if p.name == "img_004")
    lr, hr = load_pair(pair, scale=4)
    assert lr.bit_depth == 16 and lr.array.shape == (70, 70, 3)
    assert hr.array.shape == (280, 280, 3)
    assert "HR cropped to 280x280 from the top-left" in hr.conversions[-1]
    original = load_image(SET5 / "HR/img_004.png").array
    np.testing.assert_array_equal(hr.array, original)  # the padding was removed exactly
    np.testing.assert_array_equal(lr.array, load_image(SET5 / "LR/img_004.png").array)


def test_cli_validate_corrupted_copy_exits_2_with_every_problem(corrupted_set5):
    from harness.cli import app

    result = CliRunner().invoke(app, ["validate", "set5", "--root", str(corrupted_set5)])
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)  # a clean exit, not a traceback
    output = result.output
    assert "Traceback" not in output
    for fragment in (
        "HR/img_001.png: corrupted or truncated PNG",
        "HR/img_002.png: unpaired HR file",
        "LR/notes.txt: extra file",
        "HR/img_005.png: HR 220x344 is not 4x LR 57x86",
        "HR/img_003.png: RGBA->RGB (alpha dropped)",
        "LR/img_004.png: RGB;16->RGB",
        "img_004: HR cropped to box",
        "error: dataset 'set5' has",
    ):
        assert fragment in output, f"missing {fragment!r} in CLI output:\n{output}"


@needs_set5
def test_cli_validate_clean_set5_and_errors(tmp_path):
    from harness.cli import app

    runner = CliRunner()
    ok = runner.invoke(app, ["validate", "set5"])
    assert ok.exit_code == 0, ok.output
    assert "ok: set5 - 5 pairs valid" in ok.output
    unknown = runner.invoke(app, ["validate", "set6"])
    assert unknown.exit_code == 2 and "Did you mean 'set5'" in unknown.output
    missing = runner.invoke(app, ["validate", "set5", "--root", str(tmp_path / "none")])
    assert missing.exit_code == 2 and "Expected layout" in missing.output
    listing = runner.invoke(app, ["ls", "datasets"])
    assert listing.exit_code == 0 and "div2k-val-realesrgan" in listing.output
    help_text = runner.invoke(app, ["validate", "--help"])
    assert help_text.exit_code == 0 and "qbench validate set5" in help_text.output


# ----------------------------------------------------------------------------------------------
# pairing rules
# ----------------------------------------------------------------------------------------------


def test_pairing_is_by_name_never_by_sort_order(tmp_path):
    _save(tmp_path / "HR/a.png", _noise(32, 32))
    _save(tmp_path / "HR/b.png", _noise(32, 32))
    _save(tmp_path / "LR/b.png", _noise(8, 8))
    _save(tmp_path / "LR/c.png", _noise(8, 8))
    spec = f"folder:lr={tmp_path / 'LR'},hr={tmp_path / 'HR'}"
    resolved = get_dataset(spec).resolve(strict=False)
    assert [(p.name, p.lr_path.name, p.hr_path.name) for p in resolved.pairs] == [
        ("b", "b.png", "b.png")
    ]
    text = "\n".join(resolved.problems)
    assert "HR/a.png: unpaired HR file" in text and "LR/c.png: unpaired LR file" in text
    with pytest.raises(DatasetError):
        get_dataset(spec).resolve()


def test_folder_spec_lr_only_and_scale(tmp_path):
    _save(tmp_path / "sr/x.png", _noise(16, 16))
    _save(tmp_path / "sr/y.png", _noise(16, 16))
    resolved = get_dataset(f"folder:lr={tmp_path / 'sr'}").resolve()
    assert [(p.name, p.hr_path) for p in resolved.pairs] == [("x", None), ("y", None)]
    assert validate_dataset(resolved).ok
    _save(tmp_path / "hr/x.png", _noise(16, 16))
    _save(tmp_path / "hr/y.png", _noise(16, 16))
    same_size = get_dataset(f"folder:lr={tmp_path / 'sr'},hr={tmp_path / 'hr'},scale=1").resolve()
    assert len(same_size.pairs) == 2 and same_size.scale == 1
    with pytest.raises(ConfigError, match="lr=PATH"):
        get_dataset(f"folder:hr={tmp_path / 'hr'}")
    with pytest.raises(ConfigError, match="unknown key"):
        get_dataset(f"folder:lr={tmp_path / 'sr'},size=3")


def test_template_layout_div2k_style_names(tmp_path):
    root = tmp_path / "bench"
    _save(root / "HR/baby.png", _noise(40, 44))
    _save(root / "LR_bicubic/X4/babyx4.png", _noise(10, 11))
    _save(root / "HR/bird.png", _noise(41, 43))  # excess 1 x 3 px: cropped
    _save(root / "LR_bicubic/X4/birdx4.png", _noise(10, 10))
    _save(root / "LR_bicubic/X4/bird.png", _noise(10, 10))  # does not match '{stem}x4'
    resolved = get_dataset("set5").resolve(root, strict=False)
    assert resolved.layout.name == "hr-lr_bicubic-x4"
    pairs = {p.name: p for p in resolved.pairs}
    assert set(pairs) == {"baby", "bird"}
    assert pairs["baby"].lr_path.name == "babyx4.png" and pairs["baby"].hr_crop is None
    assert pairs["bird"].hr_crop == (0, 0, 40, 40)
    text = "\n".join(resolved.problems)
    assert (
        "LR_bicubic/X4/bird.png: extra file (name does not match the naming rule '{stem}x4')"
        in text
    )
    assert "found 2 pairs, expected 5" in text


def test_shared_directory_layout_realsr_v3(tmp_path):
    root = tmp_path / "RealSR(V3)"
    for camera in ("Canon", "Nikon"):
        for index in (1, 2):
            _save(root / f"{camera}/Test/4/{camera}_00{index}_HR.png", _noise(32, 36))
            _save(root / f"{camera}/Test/4/{camera}_00{index}_LR4.png", _noise(8, 9))
    _save(root / "Canon/Test/4/Canon_001_LR2.png", _noise(16, 18))  # another scale's file
    (root / "Canon/Test/4/.DS_Store").write_text("hidden files are ignored")
    resolved = get_dataset("realsr").resolve(root, strict=False)
    assert [p.name for p in resolved.pairs] == ["Canon_001", "Canon_002", "Nikon_001", "Nikon_002"]
    pair = resolved.pairs[0]
    assert (pair.lr_path.name, pair.hr_path.name) == ("Canon_001_LR4.png", "Canon_001_HR.png")
    stray = [p for p in resolved.problems if "Canon_001_LR2.png" in p]
    assert len(stray) == 1  # reported once although LR and HR share the directory
    assert "found 4 pairs, expected 100" in resolved.problems


def test_duplicate_stems_are_ambiguous(tmp_path):
    _save(tmp_path / "LR/a.png", _noise(8, 8))
    _save(tmp_path / "LR/a.jpg", _noise(8, 8))
    _save(tmp_path / "HR/a.png", _noise(32, 32))
    resolved = get_dataset(f"folder:lr={tmp_path / 'LR'},hr={tmp_path / 'HR'}").resolve(
        strict=False
    )
    assert any("ambiguous" in p and "LR/a.jpg" in p for p in resolved.problems)


def test_hr_policy_error_refuses_any_mismatch(tmp_path):
    _save(tmp_path / "test_HR/a.png", _noise(33, 32))
    _save(tmp_path / "test_LR/a.png", _noise(8, 8))
    resolved = get_dataset("realsr-stablesr").resolve(tmp_path, strict=False)
    assert resolved.pairs[0].hr_crop is None
    assert any("hr_policy is 'error'" in p for p in resolved.problems)


def test_manifest_entries_with_dotdot_or_absolute_paths_are_rejected(tmp_path):
    root = tmp_path / "Set5"
    _save(root / "HR/a.png", _noise(32, 32))
    _save(root / "LR/a.png", _noise(8, 8))
    digest = "0" * 64
    (root / "SHA256SUMS").write_text(
        f"{digest}  ../outside.png\n{digest}  /etc/passwd\nnot a checksum line\n{digest}  HR/a.png\n"
    )
    resolved = get_dataset("set5").resolve(root, strict=False)
    text = "\n".join(resolved.problems)
    assert "rejected entry '../outside.png'" in text and "rejected entry '/etc/passwd'" in text
    assert "SHA256SUMS:3: not a 'sha256  path' line" in text
    report = validate_dataset(resolved)
    assert any("HR/a.png: sha256 mismatch" in p for p in report.problems)
    assert not any("outside" in rel for rel in resolved.checksums)


def test_manifest_hash_changes_with_content(tmp_path):
    _save(tmp_path / "LR/a.png", _noise(8, 8))
    spec = f"folder:lr={tmp_path / 'LR'}"
    first = get_dataset(spec).resolve().manifest_hash()
    assert first == get_dataset(spec).resolve().manifest_hash()
    _save(tmp_path / "LR/a.png", _noise(9, 9, seed=1))
    assert get_dataset(spec).resolve().manifest_hash() != first


def test_validate_skips_decoding_when_asked(tmp_path):
    _save(tmp_path / "LR/a.png", _noise(8, 8))
    data = (tmp_path / "LR/a.png").read_bytes()
    (tmp_path / "LR/a.png").write_bytes(data[: len(data) - 20])  # header intact, data cut
    resolved = get_dataset(f"folder:lr={tmp_path / 'LR'}").resolve()
    assert validate_dataset(resolved, decode=False).ok
    assert not validate_dataset(resolved).ok


# ----------------------------------------------------------------------------------------------
# synthesized degraded crop set (div2k-val-realesrgan mechanism, tiny)
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def synth_registry(tmp_path, monkeypatch):
    defs = tmp_path / "defs"
    defs.mkdir()
    _write_def(
        defs,
        "src",
        """
        expected_count = 2
        root_candidates = ["SRC"]
        [[layouts]]
        name = "official"
        hr_dir = "HR"
        lr_dir = "LR_bicubic"
        """,
    )
    _write_def(
        defs,
        "synth",
        """
        root_candidates = ["released"]
        [[layouts]]
        name = "released"
        hr_dir = "test_HR"
        lr_dir = "test_LR"
        [synthesize]
        source_dataset = "src"
        source_layout = "official"
        preset = "stablesr-test"
        seed = 5
        crop_size = 128
        crops_per_image = 2
        """,
    )
    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    for name, (h, w) in {"0801": (150, 170), "0802": (140, 131)}.items():
        smooth = np.kron(rng.integers(0, 256, (h // 10 + 1, w // 10 + 1, 3)), np.ones((10, 10, 1)))
        _save(data / f"SRC/HR/{name}.png", smooth[:h, :w].astype(np.uint8))
    monkeypatch.setenv("QBENCH_DATA", str(data))
    monkeypatch.setenv("QBENCH_CACHE", str(tmp_path / "cache"))
    return defs


def test_synthesized_set_is_built_recorded_and_reused(synth_registry, tmp_path):
    definition = get_dataset("synth", synth_registry)
    with pytest.raises(DatasetError, match="not synthesized yet"):
        definition.resolve(synthesize=False)
    resolved = definition.resolve()  # builds it (source has HR only: LR dir not required)
    out = tmp_path / "cache" / "synth-5"
    assert resolved.root == out and resolved.layout.name == "synthesized"
    assert [p.name for p in resolved.pairs] == ["0801_00", "0801_01", "0802_00", "0802_01"]
    assert resolved.provenance["preset"] == "stablesr-test" and resolved.provenance["seed"] == 5
    record = json.loads((out / "degradation_record.json").read_text())
    entry = record["images"]["0802_01"]
    assert entry["seed"] == derive_seed(5, "0802_01")
    assert entry["degradation"]["preset"] == "stablesr-test"
    left, top, right, bottom = entry["crop_box"]
    assert (right - left, bottom - top) == (128, 128)
    # the stored LR is exactly what degrade() gives for the recorded crop and seed
    source = load_image(tmp_path / "data/SRC/HR/0802.png").array[top:bottom, left:right]
    expected_lr, params = degrade(np.ascontiguousarray(source), "stablesr-test", entry["seed"])
    np.testing.assert_array_equal(load_image(out / "LR/0802_01.png").array * 255, expected_lr)
    assert params == entry["degradation"]
    report = validate_dataset(resolved)
    assert report.ok, report.problems
    assert report.checksums_verified == 8  # sha256 of every written file is in the record
    # reused, not rebuilt
    stamp = (out / "LR/0801_00.png").stat().st_mtime_ns
    again = get_dataset("synth", synth_registry).resolve()
    assert (out / "LR/0801_00.png").stat().st_mtime_ns == stamp
    assert again.manifest_hash() == resolved.manifest_hash()
    # tampering with a synthesized file is caught by the recorded checksums
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(out / "LR/0801_01.png")
    tampered = validate_dataset(get_dataset("synth", synth_registry).resolve())
    assert any("LR/0801_01.png: sha256 mismatch" in p for p in tampered.problems)


def test_synthesized_set_with_changed_settings_is_refused(synth_registry):
    get_dataset("synth", synth_registry).resolve()
    path = synth_registry / "synth.toml"
    path.write_text(path.read_text().replace("crops_per_image = 2", "crops_per_image = 3"))
    with pytest.raises(DatasetError, match="different settings"):
        get_dataset("synth", synth_registry).resolve()
