"""Security (issue 8): pickles never run code, configs and dataset definitions are data, paths from
data never escape their directory, report pages escape every string from file names and configs.

Already tested elsewhere (not repeated): the OSEDiff ``.pkl`` loader refusing a code-running pickle
(``tests/test_loaders.py::test_pickle_that_runs_code_is_refused``), run-config strings staying data
(``tests/test_runconfig.py::test_config_values_are_data_never_code``), ``..``/absolute entries in
dataset definitions and ``SHA256SUMS`` manifests (``tests/test_datasets.py``), a ``../`` crop path
and invalid cell ids in the run store (``tests/test_store.py``), and escaping of hand-made labels and
image names in the HTML/Markdown/LaTeX reports (``tests/test_reports.py``).
"""

from __future__ import annotations

import ast
import contextlib
import html
import pickle
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from harness.errors import ConfigError, ModelError

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("harness", "methods", "reports", "bench")


class _CreatesMarker:
    """Unpickling this calls ``open(marker, "w")``: the marker file appears iff code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _malicious(path: Path, marker: Path, fmt: str) -> None:
    payload = {"state_dict_unet": _CreatesMarker(marker), "rank_unet": 4}
    if fmt == "torch.save":
        torch.save(payload, path)
    else:
        with path.open("wb") as handle:
            pickle.dump(payload, handle)


@pytest.mark.parametrize(
    ("suffix", "fmt"), [(".pt", "torch.save"), (".pkl", "pickle"), (".pkl", "torch.save")]
)
def test_weights_only_load_refuses_a_pickle_that_runs_code(tmp_path, suffix, fmt):
    from harness.loaders import safe_torch_load

    marker = tmp_path / "marker"
    path = tmp_path / f"checkpoint{suffix}"
    _malicious(path, marker, fmt)
    with pytest.raises(ModelError, match="refused") as info:
        safe_torch_load(path)
    assert str(path) in str(info.value)
    assert not marker.exists(), "the pickle ran code"
    # the payload is real: an unrestricted unpickler does run it
    if fmt == "pickle":
        with path.open("rb") as handle:
            pickle.load(handle)  # noqa: S301 - deliberately unsafe, on our own payload
        assert marker.exists()


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


UNSAFE_CALLS = {
    "pickle.load", "pickle.loads", "cloudpickle.load", "cloudpickle.loads", "marshal.loads",
    "eval", "exec", "yaml.load", "yaml.unsafe_load", "os.system", "shelve.open", "dill.load",
    "dill.loads",
}  # fmt: skip

PENDING_FIX: set[tuple[str, str]] = set()
"""Known unsafe calls waiting for a fix (none)."""


def unsafe_calls() -> set[tuple[str, str]]:
    """Every call in the shipped packages that could run code from data: ``torch.load`` without a
    literal ``weights_only=True``, ``pickle``/``marshal``/``yaml.load``/``eval``/``exec``/``os.system``,
    ``np.load`` with ``allow_pickle`` (its default, False, is safe), and ``subprocess`` with
    ``shell=True``."""
    found: set[tuple[str, str]] = set()
    for package in PACKAGES:
        for file in sorted((REPO / package).rglob("*.py")):
            rel = file.relative_to(REPO).as_posix()
            tree = ast.parse(file.read_text(encoding="utf-8"), filename=rel)
            for node, name in _calls(tree):
                keywords = {k.arg: k.value for k in node.keywords}
                if name.endswith("torch.load") or name == "load" and "weights_only" in keywords:
                    value = keywords.get("weights_only")
                    if not (isinstance(value, ast.Constant) and value.value is True):
                        found.add((rel, "torch.load without weights_only=True"))
                elif name in UNSAFE_CALLS:
                    found.add((rel, name))
                elif name in ("np.load", "numpy.load") and "allow_pickle" in keywords:
                    value = keywords["allow_pickle"]
                    if not (isinstance(value, ast.Constant) and value.value is False):
                        found.add((rel, f"{name}(allow_pickle=...)"))
                elif name.startswith("subprocess.") and "shell" in keywords:
                    value = keywords["shell"]
                    if not (isinstance(value, ast.Constant) and value.value is False):
                        found.add((rel, f"{name}(shell=...)"))
    return found


def test_no_code_can_run_from_loaded_data_in_the_shipped_packages():
    found = unsafe_calls()
    assert found - PENDING_FIX == set(), sorted(found - PENDING_FIX)


def test_the_scanner_finds_an_unsafe_load(tmp_path, monkeypatch):
    """The check above can fail: a package with ``torch.load(path)`` and ``pickle.loads`` is flagged."""
    package = tmp_path / "bench"
    package.mkdir()
    (package / "bad.py").write_text(
        "import pickle, torch, numpy as np\nx = torch.load('a.pt')\ny = pickle.loads(b'')\n"
        "z = torch.load('b.pt', weights_only=True)\nw = np.load('c.npy', allow_pickle=True)\n"
        "v = np.load('d.npz')\n"
    )
    monkeypatch.setattr(f"{__name__}.REPO", tmp_path)
    monkeypatch.setattr(f"{__name__}.PACKAGES", ("bench",))
    assert unsafe_calls() == {
        ("bench/bad.py", "torch.load without weights_only=True"),
        ("bench/bad.py", "pickle.loads"),
        ("bench/bad.py", "np.load(allow_pickle=...)"),
    }


def test_train_tiny_checkpoint_that_runs_code_is_refused(tmp_path):
    from harness.tiny import train

    marker = tmp_path / "marker"
    path = tmp_path / "stage1_vae.pt"
    _malicious(path, marker, "torch.save")
    with contextlib.suppress(Exception):  # any refusal is fine; what matters is the marker
        train._load_checkpoint(path)
    assert not marker.exists(), "resuming train-tiny ran code from a checkpoint"


# --------------------------------------------------------------------------------------------
# configs and dataset definitions are data

CODE_STRINGS = (
    "__import__('os').system('touch {marker}')",
    "{{{{ ''.__class__.__mro__[1].__subclasses__() }}}}",
    "$(touch {marker})",
    "`touch {marker}`",
)


def test_dataset_definition_strings_are_data(tmp_path):
    from harness.datasets import load_definition

    marker = tmp_path / "marker"
    texts = [s.format(marker=marker) for s in CODE_STRINGS]
    path = tmp_path / "evil.toml"
    path.write_text(
        textwrap.dedent(
            f"""
            name = "evil"
            version = {texts[3]!r}
            description = {texts[0]!r}
            scale = 4
            hr_policy = "crop"
            source = {texts[1]!r}
            citation = {texts[2]!r}
            licence = "test"
            root_candidates = ["x"]
            [[layouts]]
            name = "a"
            lr_dir = "LR"
            """
        )
    )
    definition = load_definition(path)
    assert definition.description == texts[0] and definition.source == texts[1]
    assert definition.citation == texts[2] and definition.version == texts[3]
    assert not marker.exists() and not Path("touch").exists()


def test_a_yaml_config_with_python_tags_is_refused_as_invalid_toml(tmp_path):
    from harness.runconfig import load_run_config

    marker = tmp_path / "marker"
    path = tmp_path / "run.yaml"
    path.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\nmodel: tiny\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_run_config(path)
    assert not marker.exists()


def test_run_config_model_and_dataset_strings_are_never_evaluated(tmp_path):
    from harness.runconfig import load_run_config

    marker = tmp_path / "marker"
    code = f"__import__('os').system('touch {marker}')"
    path = tmp_path / "run.toml"
    path.write_text(
        f'model = "tiny"\ndescription = "{code}"\ndatasets = ["demo"]\nmetrics = ["psnr"]\n'
        f'[[methods]]\nname = "fp"\nlabel = "{code}"\n'
    )
    config = load_run_config(path)
    assert config.description == code and config.methods[0].label == code
    assert not marker.exists()
    path.write_text(path.read_text().replace('datasets = ["demo"]', f'datasets = ["{code}"]'))
    with pytest.raises(ConfigError, match="unknown dataset"):
        load_run_config(path)
    assert not marker.exists()


# --------------------------------------------------------------------------------------------
# paths from data


@pytest.mark.parametrize("entry", ["/etc/passwd", "../../../etc/passwd", "sub/../../x.png"])
def test_crop_paths_in_a_cell_record_cannot_leave_the_run_directory(tmp_path, entry):
    from harness.store import RunStore, StoreError

    (tmp_path / "outside.png").write_bytes(b"secret")
    with pytest.raises(StoreError, match="escapes the run directory"):
        RunStore(tmp_path / "run").read_crop({"file": entry, "sha256": ""})


def test_dataset_definition_root_and_checksum_file_may_not_escape(tmp_path):
    from harness.datasets import load_definition

    base = textwrap.dedent(
        """
        name = "bad"
        version = "1"
        description = "d"
        scale = 4
        hr_policy = "crop"
        source = "s"
        citation = "c"
        licence = "l"
        """
    )
    cases = {
        "repo_root": 'repo_root = "../../etc"\n[[layouts]]\nname = "a"\nlr_dir = "LR"\n',
        "checksum_file": 'root_candidates = ["x"]\n[[layouts]]\nname = "a"\nlr_dir = "LR"\n'
        'checksum_file = "/etc/shadow"\n',
        "windows-drive": 'root_candidates = ["C:\\\\data"]\n[[layouts]]\nname = "a"\nlr_dir = "L"\n',
    }
    for what, body in cases.items():
        path = tmp_path / "bad.toml"
        path.write_text(base + body)
        with pytest.raises(ConfigError, match="without '..'") as info:
            load_definition(path)
        assert str(path) in str(info.value), what


# --------------------------------------------------------------------------------------------
# report pages escape strings that come from real file names


def test_real_file_names_with_markup_render_as_text_in_the_report(tmp_path):
    """A dataset folder and image file really named with HTML markup (a file name cannot hold '/',
    so ``<script>alert(1)<\\script>`` and an ``onerror`` attribute stand in for ``</script>``): the
    names travel from the file system through dataset pairing, a stored cell and ``build_report``,
    and appear in the pages only escaped."""
    from harness.cells import CellOutcome, CropImage, centre_box, png_crop
    from harness.datasets import get_dataset
    from harness.images import load_image
    from harness.runconfig import dataset_manifests, expand_cells, load_run_config
    from harness.store import RunStore
    from reports.build import build_report

    folder = tmp_path / '<b id="x">data&more'
    names = ["<script>alert(1)<\\script>", '<img src=x onerror="alert(2)">']
    rng = np.random.default_rng(0)
    for side, size in (("LR", 16), ("HR", 64)):
        (folder / side).mkdir(parents=True)
        for name in names:
            pixels = (rng.random((size, size, 3)) * 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / side / f"{name}.png")
    spec = f"folder:lr={folder / 'LR'},hr={folder / 'HR'}"
    config_path = tmp_path / "run.toml"
    config_path.write_text(
        f'name = "evil"\nmodel = "tiny"\nbits = ["W4A4"]\ndatasets = [\'{spec}\']\n'
        'metrics = ["psnr"]\n[calibration]\nn = 2\nlr_crop = 32\n[visual]\nimages = 2\ncrop = 32\n'
        '[[methods]]\nname = "fp"\nlabel = "FP"\n[[methods]]\nname = "minmax"\n'
        'label = "<svg onload=alert(3)>"\n'
    )
    config = load_run_config(config_path)
    cells = expand_cells(config, dataset_manifests(config.datasets))
    dataset = get_dataset(spec).resolve()
    assert sorted(p.name for p in dataset.pairs) == sorted(names)
    run_dir = tmp_path / "run"
    with RunStore(run_dir) as store:
        store.write_config(config.to_dict(), cells)
        for cell in cells:
            rows, crops = [], []
            for pair in dataset.pairs:
                hr = load_image(pair.hr_path).array
                box = centre_box(64, 64, 32)
                rows.append({"dataset": dataset.name, "image": pair.name, "psnr": 30.0})
                for kind in ("sr", "hr", "lr_up"):
                    crops.append(CropImage(dataset.name, pair.name, kind, box, png_crop(hr, box)))
            means = {dataset.name: {"images": 2, "means": {"psnr": 30.0}, "unavailable": {}}}
            store.write_cell(
                cell, CellOutcome(cell.cell_id, "done", datasets=means, rows=rows, crops=crops)
            )
    files = build_report(run_dir, tmp_path / "report")
    page = files["visual_html"].read_text()
    for raw in [*names, "<svg onload=alert(3)>", '<b id="x">']:
        assert raw not in page, raw
    assert html.escape(names[0], quote=True) in page
    assert page.count("<script>") == 1  # the page's own slider script only
    markdown = files["markdown"].read_text()
    assert "<svg onload" not in markdown and "<script>" not in markdown
