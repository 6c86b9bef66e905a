"""Run configs: validation with errors naming the file and key, expansion, deterministic cell ids."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.errors import ConfigError, UnknownNameError
from harness.runconfig import (
    MethodInfo,
    expand_cells,
    load_run_config,
    parse_bits,
    short_hash,
)

REPO = Path(__file__).resolve().parents[1]
DATASETS = ["demo", "set5", "urban100"]
METRICS = ["psnr", "ssim", "psnr_fp", "ssim_fp", "niqe", "lpips"]
MANIFESTS = {"demo": "a" * 64, "set5": "b" * 64}


class StubCatalog:
    """A method catalog with two real-looking methods; params are checked like MethodConfig does."""

    known = {"fp": MethodInfo(False, False), "minmax": MethodInfo(True, True)}

    def names(self):
        return sorted(self.known)

    def info(self, name):
        if name not in self.known:
            raise UnknownNameError("method", name, self.names())
        return self.known[name]

    def resolve_config(self, name, bits, scope, params):
        unknown = sorted(set(params) - {"calib_batch_size", "ema_momentum"})
        if unknown:
            raise ConfigError(f"unknown field(s) for method {name!r}: {', '.join(unknown)}")
        return {"config_version": 1, "method": name, "bits": bits, "scope": scope,
                "calib_batch_size": 4, **params}  # fmt: skip


BASE = """
name = "unit"
model = "tiny"
bits = ["W8A8", "W4A4"]
seeds = [0, 1]
datasets = ["demo", "set5"]
metrics = ["psnr", "ssim", "psnr_fp"]
limit = 3

[calibration]
source = "tiny-train"
n = 8
lr_crop = 32

[[methods]]
name = "fp"
label = "FP"

[[methods]]
name = "minmax"
label = "MinMax"
params = { calib_batch_size = 2 }
"""


def write(tmp_path: Path, text: str, name: str = "run.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def load(path: Path, **kwargs):
    kwargs.setdefault("methods", StubCatalog())
    kwargs.setdefault("dataset_names", DATASETS)
    kwargs.setdefault("metric_names", METRICS)
    return load_run_config(path, **kwargs)


def test_valid_config_is_typed_and_expands_in_order(tmp_path):
    config = load(write(tmp_path, BASE))
    assert config.name == "unit" and config.limit == 3 and config.seeds == (0, 1)
    fp, minmax = config.methods
    assert (fp.bits, fp.seeds, fp.calibration) == (("FP",), (None,), None)
    assert minmax.bits == ("W8A8", "W4A4") and minmax.calibration.n == 8
    assert minmax.calibration.lr_crop == 32 and minmax.calibration.teacher_batch_size == 4
    assert minmax.method_configs["W4A4"]["calib_batch_size"] == 2
    cells = expand_cells(config, MANIFESTS)
    # fp: one cell (no bits, no seed); minmax: 2 bits x 2 seeds
    assert [(c.label, c.bits, c.seed) for c in cells] == [
        ("FP", "FP", None),
        ("MinMax", "W8A8", 0),
        ("MinMax", "W8A8", 1),
        ("MinMax", "W4A4", 0),
        ("MinMax", "W4A4", 1),
    ]
    assert len({c.cell_id for c in cells}) == 5
    assert all(len(c.cell_id) == 16 and c.datasets == ("demo", "set5") for c in cells)
    assert cells[1].limit == 3 and cells[1].manifests == MANIFESTS


def test_cell_ids_are_deterministic_and_depend_on_what_changes_results(tmp_path):
    ids = [c.cell_id for c in expand_cells(load(write(tmp_path, BASE)), MANIFESTS)]
    again = [c.cell_id for c in expand_cells(load(write(tmp_path, BASE, "copy.toml")), MANIFESTS)]
    assert ids == again  # not a timestamp, not the file name

    def ids_for(text, manifests=MANIFESTS):
        return [c.cell_id for c in expand_cells(load(write(tmp_path, text, "v.toml")), manifests)]

    relabelled = ids_for(BASE.replace('label = "MinMax"', 'label = "MaxMin"'))
    assert relabelled == ids  # presentation only
    assert ids_for(BASE.replace("limit = 3", "limit = 4"))[1:] != ids[1:]
    assert ids_for(BASE.replace("calib_batch_size = 2", "calib_batch_size = 3"))[1:] != ids[1:]
    assert ids_for(BASE.replace("n = 8", "n = 9"))[1:] != ids[1:]
    assert ids_for(BASE.replace("n = 8", "n = 9"))[0] == ids[0]  # fp uses no calibration
    changed = ids_for(BASE, {**MANIFESTS, "set5": "c" * 64})
    assert not set(changed) & set(ids)  # every cell evaluates set5


def test_model_key_ignores_evaluation_only_fields(tmp_path):
    cells = expand_cells(load(write(tmp_path, BASE)), MANIFESTS)
    text = BASE.replace('datasets = ["demo", "set5"]', 'datasets = ["demo"]').replace(
        "limit = 3", "limit = 1"
    )
    fewer = expand_cells(load(write(tmp_path, text, "b.toml")), {"demo": MANIFESTS["demo"]})
    assert [c.model_key for c in cells] == [c.model_key for c in fewer]
    assert [c.cell_id for c in cells] != [c.cell_id for c in fewer]


def test_cli_limit_overrides_and_is_recorded(tmp_path):
    config = load(write(tmp_path, BASE)).with_limit(1)
    assert config.limit == 1 and all(c.limit == 1 for c in expand_cells(config, MANIFESTS))
    with pytest.raises(ConfigError, match="--limit"):
        load(write(tmp_path, BASE)).with_limit(0)


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        (("limit = 3", "limmit = 3"), r"run\.toml: limmit: unknown key\. Did you mean 'limit'\?"),
        (
            ('bits = ["W8A8", "W4A4"]', 'bits = "W4A4"'),
            r"run\.toml: bits: must be a list of strings, got a string",
        ),
        (
            ('bits = ["W8A8", "W4A4"]', 'bits = ["W1A1"]'),
            r"bits\[0\]: weight bits must be in \[2, 8\], got 'W1A1'",
        ),
        (
            ('bits = ["W8A8", "W4A4"]', 'bits = ["W16A16"]'),
            r"bits\[0\]: weight bits must be in \[2, 8\]",
        ),
        (
            ('bits = ["W8A8", "W4A4"]', 'bits = ["4bit"]'),
            r"bits\[0\]: expected a bits string like 'W4A4'",
        ),
        (("limit = 3", 'limit = "3"'), r"limit: must be an integer, got a string"),
        (("limit = 3", "limit = 0"), r"limit: must be >= 1"),
        (
            ("limit = 3", "limit = 3\n[inference]\ncolor_fix = 'sepia'"),
            r"inference: color_fix must be one of",
        ),
        (
            ("limit = 3", "limit = 3\n[inference]\nlatent_tile = 32\nlatent_overlap = 32"),
            r"inference: latent_tile=32 with overlap 32 is invalid",
        ),
        (
            ("limit = 3", "limit = 3\n[inference]\ntimestep = 1000"),
            r"inference: timestep must be in \[0, 999\]",
        ),
        (("seeds = [0, 1]", "seeds = [0, 0]"), r"seeds: lists a seed more than once"),
        (
            ('name = "minmax"', 'name = "minmaxx"'),
            r"methods\[1\]\.name: unknown method 'minmaxx'\. Did you mean 'minmax'\?",
        ),
        (
            ('"demo", "set5"]', '"demo", "set55"]'),
            r"datasets\[1\]: unknown dataset 'set55'\. Did you mean 'set5'",
        ),
        (
            ('"psnr_fp"]', '"psnr_fpp"]'),
            r"metrics\[2\]: unknown metric 'psnr_fpp'\. Did you mean 'psnr_fp'",
        ),
        (
            ("calib_batch_size = 2", "batchsize = 2"),
            r"methods\[1\]\.params: unknown field\(s\) for method 'minmax': batchsize",
        ),
        (('label = "MinMax"', 'label = "FP"'), r"two entries have the label 'FP'"),
        (
            ('source = "tiny-train"', 'source = "demo"'),
            r"calibration\.source: 'demo' is also an evaluation dataset",
        ),
        (
            ('source = "tiny-train"', 'source = "div2k-trainn"'),
            r"unknown calibration source 'div2k-trainn'",
        ),
        (("n = 8", "n = 8.5"), r"calibration\.n: must be an integer, got a float"),
        (
            ("lr_crop = 32", "lr_cropp = 32"),
            r"calibration\.lr_cropp: unknown key\. Did you mean 'lr_crop'\?",
        ),
        (
            ('name = "fp"\nlabel = "FP"', 'name = "fp"\nlabel = "FP"\nbits = ["W4A4"]'),
            r"methods\[0\]\.bits: method 'fp' does not quantize",
        ),
        (
            ('name = "fp"\nlabel = "FP"', 'name = "fp"\nlabel = "FP"\nablation_of = "qartsr"'),
            r"ablation_of: 'qartsr' is not a method name or label",
        ),
        (('name = "unit"', 'name = "../escape"'), r"name: must be letters, digits"),
        (
            ('name = "unit"', 'config_version = 2\nname = "unit"'),
            r"config_version: 2 is not supported",
        ),
    ],
)
def test_errors_name_the_file_and_the_key(tmp_path, change, pattern):
    old, new = change
    assert old in BASE
    with pytest.raises(ConfigError, match=pattern):
        load(write(tmp_path, BASE.replace(old, new, 1)))


def test_missing_required_keys_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match=r"run\.toml: methods: is required"):
        load(write(tmp_path, 'model = "tiny"\ndatasets = ["demo"]\nmetrics = ["psnr"]\n'))
    with pytest.raises(ConfigError, match=r"run\.toml: invalid TOML"):
        load(write(tmp_path, "model = tiny\n"))
    with pytest.raises(ConfigError, match=r"nope\.toml: run config not found"):
        load(tmp_path / "nope.toml")


def test_config_values_are_data_never_code(tmp_path):
    text = BASE.replace('label = "MinMax"', "label = \"__import__('os').system('touch pwned')\"")
    config = load(write(tmp_path, text))
    assert config.methods[1].label == "__import__('os').system('touch pwned')"
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()


def test_duplicate_cells_are_refused(tmp_path):
    text = (
        BASE
        + '\n[[methods]]\nname = "minmax"\nlabel = "MinMax again"\nparams = { calib_batch_size = 2 }\n'
    )
    with pytest.raises(ConfigError, match="is the same cell as MinMax W8A8 seed 0"):
        expand_cells(load(write(tmp_path, text)), MANIFESTS)


def test_parse_bits_and_short_hash():
    assert parse_bits("W4A8") == "W4A8"
    assert short_hash({"b": 1, "a": [1, 2]}) == short_hash({"a": (1, 2), "b": 1})
    assert len(short_hash("x")) == 16


def test_real_registry_unknown_method_suggests_close_names(tmp_path):
    path = write(tmp_path, BASE.replace('name = "minmax"', 'name = "minmx"'))
    with pytest.raises(ConfigError, match=r"unknown method 'minmx'\. Did you mean 'minmax'"):
        load_run_config(path)


def test_shipped_smoke_config_loads_with_the_real_registries():
    config = load_run_config(REPO / "configs" / "smoke.toml")
    assert config.limit == 2 and config.datasets == ("demo",)
    labels = [(m.label, m.bits) for m in config.methods]
    assert labels == [("FP", ("FP",)), ("MinMax", ("W8A8", "W4A4"))]
    assert config.calibration.source == "tiny-train"


@pytest.mark.parametrize("name", ["demo", "paper"])
def test_shipped_configs_are_valid_structurally(name):
    """Structure, keys and types of the shipped configs (methods accepted by a permissive stub;
    with the real registry an unregistered method is a ConfigError naming it, checked below)."""

    class AnyMethod(StubCatalog):
        def info(self, method):
            return MethodInfo(method != "fp", method != "fp")

        def resolve_config(self, method, bits, scope, params):
            return {"method": method, "bits": bits, "scope": scope, **params}

    from harness.datasets import list_datasets

    config = load_run_config(
        REPO / "configs" / f"{name}.toml",
        methods=AnyMethod(),
        dataset_names=list_datasets(),
    )
    labels = [m.label for m in config.methods]
    assert len(labels) == len(set(labels))
    if name == "demo":
        assert config.model == "tiny" and config.datasets == ("demo",)
        ablations = [m.name for m in config.methods if m.ablation_of == "qartsr"]
        assert ablations == [
            "qartsr-no-trq", "qartsr-no-rpq", "qartsr-forward-pq", "qartsr-no-et",
            "qartsr-module-loss-only", "qartsr-image-loss-only", "qartsr-no-lowrank",
        ]  # fmt: skip
        assert all(m.bits == ("W4A4",) for m in config.methods if m.ablation_of)
        assert {"W4A4", "W2A2"} <= {b for m in config.methods for b in m.bits}
    else:
        assert config.model.startswith("osediff:") and config.resources.num_gpus == 1
        assert set(config.datasets) == {"realsr", "drealsr", "div2k-val", "urban100"}
        # the calibration source is a registered definition, disjoint from the evaluation sets
        assert config.calibration.source == "div2k-train" in list_datasets()


def test_unregistered_methods_in_shipped_configs_are_config_errors():
    import tomllib

    from harness.datasets import list_datasets
    from harness.registry import list_methods

    known = set(list_methods())
    for name in ("demo", "paper"):
        path = REPO / "configs" / f"{name}.toml"
        wanted = [m["name"] for m in tomllib.loads(path.read_text())["methods"]]
        missing = [m for m in wanted if m not in known]
        if not missing:
            continue
        with pytest.raises(
            ConfigError, match=rf"{name}\.toml: methods\[\d+\]\.name: unknown method '{missing[0]}'"
        ):
            load_run_config(path, dataset_names=[*list_datasets(), "div2k-train"])
