"""run_matrix through real Ray (2 CPUs, one shared session): resume, failures, kill -9 of the driver
and of a worker, ENOSPC, and the shipped smoke config end to end on the tiny model.

The mechanics tests inject a small deterministic cell executor: it reads the (synthetic) dataset
images for real, upsamples them with PIL bicubic, fake-quantizes the output to the cell's weight bits
and scores PSNR against HR and against the unquantized output. The shipped executor
(:func:`harness.cells.execute_cell`) is exercised by ``test_smoke_config_end_to_end``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from harness.cells import CellOutcome, CropImage, centre_box, png_crop
from harness.errors import UnknownNameError
from harness.runconfig import MethodInfo
from harness.store import RunStore, StoreError

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# the injected executor and method catalog


class SyntheticCatalog:
    """fp (reference), minmax (quantizes the output), boom (raises), crash_once / crash_always
    (kill their own worker process)."""

    methods = {
        "fp": MethodInfo(False, False),
        "minmax": MethodInfo(True, True),
        "boom": MethodInfo(True, True),
        "crash_once": MethodInfo(True, True),
        "crash_always": MethodInfo(True, True),
    }

    def names(self):
        return sorted(self.methods)

    def info(self, name):
        if name not in self.methods:
            raise UnknownNameError("method", name, self.names())
        return self.methods[name]

    def resolve_config(self, name, bits, scope, params):
        return {"method": name, "bits": bits, "scope": scope, "sleep": 0.0, **params}


def _bicubic_up(lr: np.ndarray, scale: int) -> np.ndarray:
    from PIL import Image

    image = Image.fromarray((lr * 255).round().astype(np.uint8))
    up = image.resize((image.width * scale, image.height * scale), Image.BICUBIC)
    return np.asarray(up, dtype=np.float32) / 255.0


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / max(float(np.mean((a - b) ** 2)), 1e-10)))


def synthetic_executor(cell, ctx):
    """Deterministic: the same cell always gives the same rows, means, curves and crops."""
    from harness.datasets import get_dataset
    from harness.images import load_image

    marks = Path(ctx.cache_dir) / "executions"
    marks.mkdir(parents=True, exist_ok=True)
    (marks / f"{cell.cell_id}.{os.getpid()}.{time.time_ns()}").touch()
    time.sleep(float(cell.method_config.get("sleep", 0.0)))
    if cell.method == "boom":
        raise RuntimeError("synthetic failure in boom")
    if cell.method in ("crash_once", "crash_always"):
        attempts = list(marks.glob(f"{cell.cell_id}.*"))
        if cell.method == "crash_always" or len(attempts) == 1:
            os.kill(os.getpid(), signal.SIGKILL)
    bits = int(cell.bits[1 : cell.bits.index("A")]) if cell.quantizes else None
    rows, datasets, crops = [], {}, []
    for name in cell.datasets:
        dataset = get_dataset(name).resolve()
        pairs = list(dataset.pairs)[: cell.limit or None]
        values = []
        for index, pair in enumerate(pairs):
            ctx.report(cell.cell_id, name, index, len(pairs))
            lr, hr = load_image(pair.lr_path).array, load_image(pair.hr_path).array
            sr_fp = _bicubic_up(lr, dataset.scale)
            sr = sr_fp if bits is None else np.round(sr_fp * (2**bits - 1)) / (2**bits - 1)
            row = {"image": pair.name, "psnr": _psnr(sr, hr)}
            if cell.quantizes:
                row["psnr_fp"] = _psnr(sr, sr_fp)
            rows.append({"dataset": name, **row})
            values.append(row)
            if index < cell.visual["images"]:
                box = centre_box(sr.shape[1], sr.shape[0], cell.visual["crop"])
                crops += [
                    CropImage(name, pair.name, "sr", box, png_crop(sr, box)),
                    CropImage(name, pair.name, "lr_up", box, png_crop(sr_fp, box)),
                    CropImage(name, pair.name, "hr", box, png_crop(hr, box)),
                ]
        means = {m: float(np.mean([v[m] for v in values])) for m in values[0] if m != "image"}
        unavailable = {} if cell.quantizes else {"psnr_fp": "not applicable: reference row"}
        datasets[name] = {"images": len(values), "means": means, "unavailable": unavailable}
    mse = 10 ** (-datasets[cell.datasets[0]]["means"]["psnr"] / 10)
    curves = {
        "loss": {
            "x": None,
            "y": [mse * (1 + 1 / (k + 1)) for k in range(5)],
            "xlabel": "step",
            "ylabel": "mse",
        }
    }
    return CellOutcome(
        cell.cell_id, "done", datasets=datasets, rows=rows, curves=curves, crops=crops
    )


def _name(process) -> str:
    try:
        return process.name()
    except Exception:  # noqa: BLE001 - already gone
        return "?"


def executions(cache: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for path in (cache / "executions").glob("*"):
        cell_id = path.name.split(".")[0]
        counts[cell_id] = counts.get(cell_id, 0) + 1
    return counts


# --------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="session")
def ray_session():
    """One Ray session (2 CPUs) for every test here: ray.init costs seconds."""
    ray = pytest.importorskip("ray")
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers need not import tests/
    started = not ray.is_initialized()
    if started:
        from harness.runner import LOCAL_WORKER_NICENESS

        ray.init(
            num_cpus=2,
            include_dashboard=False,
            logging_level=logging.WARNING,
            log_to_driver=False,
            _system_config={"worker_niceness": LOCAL_WORKER_NICENESS},
        )
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory) -> str:
    from PIL import Image

    root = tmp_path_factory.mktemp("synthetic-data")
    rng = np.random.default_rng(7)
    for side in ("HR", "LR"):
        (root / side).mkdir()
    for i in range(3):
        y, x = np.mgrid[0:48, 0:48]
        hr = (
            np.stack([np.sin(x / (3 + i)), np.cos(y / (4 + i)), np.sin((x + y) / 5)], -1) * 0.4
            + 0.5
        )
        hr = np.clip(hr + rng.normal(0, 0.02, hr.shape), 0, 1)
        hr8 = Image.fromarray((hr * 255).round().astype(np.uint8))
        hr8.save(root / "HR" / f"img{i}.png")
        hr8.resize((12, 12), Image.BICUBIC).save(root / "LR" / f"img{i}.png")
    return f"folder:lr={root / 'LR'},hr={root / 'HR'}"


def write_config(
    path: Path, dataset: str, methods: str, *, bits='["W8A8", "W4A4"]', seeds="[0]", sleep=0.0
) -> Path:
    path.write_text(
        textwrap.dedent(
            f"""
            name = "mechanics"
            model = "tiny"
            bits = {bits}
            seeds = {seeds}
            datasets = ["{dataset}"]
            metrics = ["psnr", "psnr_fp"]
            limit = 2
            [calibration]
            n = 2
            lr_crop = 8
            [visual]
            images = 1
            crop = 16
            """
        )
        + methods.replace("SLEEP", str(sleep))
    )
    return path


FP_MINMAX = """
[[methods]]
name = "fp"
label = "FP"

[[methods]]
name = "minmax"
label = "MinMax"
params = { sleep = SLEEP }
"""


def run(config, out, cache, **kwargs):
    from harness.runner import run_matrix

    kwargs.setdefault("progress", False)
    return run_matrix(
        config,
        out_dir=out,
        executor=synthetic_executor,
        methods=SyntheticCatalog(),
        cache_dir=cache,
        **kwargs,
    )


def stored_results(run_dir: Path) -> dict[str, dict]:
    """Everything that must be identical between two runs of the same config (no timings)."""
    store = RunStore(run_dir)
    out = {}
    for cell_id in store.committed_ids():
        record = store.read_cell(cell_id).record
        out[cell_id] = {
            "status": record["status"],
            "datasets": record["datasets"],
            "curves": record["curves"],
            "rows": store.read_rows(cell_id),
            "crops": [(c["kind"], c["image"], c["sha256"]) for c in record["crops"]],
        }
    return out


def assert_each_cell_once(run_dir: Path, expected_ids: set[str]) -> None:
    files = sorted(p.name for p in (run_dir / "cells").iterdir() if p.is_file())
    assert not [f for f in files if f.endswith(".tmp")]
    assert sorted(f for f in files if f.endswith(".json")) == sorted(
        f"{c}.json" for c in expected_ids
    )
    assert sorted(f for f in files if f.endswith(".jsonl")) == sorted(
        f"{c}.images.jsonl" for c in expected_ids
    )


# --------------------------------------------------------------------------------------------
# tests


def test_matrix_runs_on_two_workers_and_a_rerun_does_no_work(
    ray_session, synthetic_dataset, tmp_path
):
    config = write_config(tmp_path / "m.toml", synthetic_dataset, FP_MINMAX)
    out, cache = tmp_path / "run", tmp_path / "cache"
    first = run(config, out, cache, progress=True)
    assert (
        first.complete
        and len(first.cells) == 3
        and sorted(first.executed) == sorted(c.cell_id for c in first.cells)
    )
    assert set(first.statuses.values()) == {"done"}
    assert executions(cache) == {c.cell_id: 1 for c in first.cells}
    store = RunStore(out)
    records = {c.label + c.bits: store.read_cell(c.cell_id).record for c in first.cells}
    w8, w4 = (
        records[f"MinMax{b}"]["datasets"][synthetic_dataset]["means"]["psnr_fp"]
        for b in ("W8A8", "W4A4")
    )
    assert w8 > w4 > 20  # fewer bits, larger quantization error
    assert "psnr_fp" in records["FPFP"]["datasets"][synthetic_dataset]["unavailable"]
    second = run(config, out, cache)
    assert second.executed == [] and sorted(second.skipped) == sorted(first.executed)
    assert executions(cache) == {c.cell_id: 1 for c in first.cells}  # no cell ran again
    assert len(json.loads((out / "provenance.json").read_text())["sessions"]) == 2
    assert json.loads((out / "status.json").read_text())["counts"] == {"done": 3}
    assert_each_cell_once(out, {c.cell_id for c in first.cells})


def test_a_failing_cell_is_recorded_others_finish_and_report_marks_it(
    ray_session, synthetic_dataset, tmp_path
):
    methods = FP_MINMAX + '\n[[methods]]\nname = "boom"\nlabel = "Boom"\nbits = ["W4A4"]\n'
    config = write_config(tmp_path / "m.toml", synthetic_dataset, methods)
    out, cache = tmp_path / "run", tmp_path / "cache"
    summary = run(config, out, cache)
    boom = next(c for c in summary.cells if c.method == "boom")
    assert summary.statuses[boom.cell_id] == "failed"
    assert summary.reasons[boom.cell_id] == "RuntimeError: synthetic failure in boom"
    assert summary.count("done") == 3
    record = RunStore(out).read_cell(boom.cell_id).record
    assert "synthetic failure in boom" in record["traceback"]

    from reports.build import build_report

    files = build_report(out, tmp_path / "report")
    markdown = files["markdown"].read_text()
    assert "| W4A4 | Boom (failed)<sup>" in markdown
    assert "failed: RuntimeError: synthetic failure in boom" in markdown
    assert "## Cells that did not finish" in markdown
    # without --retry-failed nothing runs; with it only the failed cell runs again
    assert run(config, out, cache).executed == []
    again = run(config, out, cache, retry_failed=True)
    assert again.executed == [boom.cell_id] and again.statuses[boom.cell_id] == "failed"


def test_kill_9_of_the_driver_then_resume_matches_an_uninterrupted_run(
    ray_session, synthetic_dataset, tmp_path
):
    psutil = pytest.importorskip("psutil")
    config = write_config(
        tmp_path / "m.toml", synthetic_dataset, FP_MINMAX, bits='["W8A8", "W6A6", "W4A4", "W2A2"]',
        seeds="[0, 1]", sleep=0.6,
    )  # fmt: skip
    out, cache = tmp_path / "killed", tmp_path / "cache-killed"
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        from ray import cloudpickle
        import tests.test_runner as t
        cloudpickle.register_pickle_by_value(t)
        t.run({str(config)!r}, {str(out)!r}, {str(cache)!r}, num_workers=2)
        """
    )
    driver = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    children, lingering = [], []
    try:
        deadline = time.time() + 240
        while time.time() < deadline and driver.poll() is None:
            if (out / "cells").is_dir() and any((out / "cells").glob("*.json")):
                break
            time.sleep(0.05)
        assert driver.poll() is None, driver.stderr.read().decode()[-2000:]
        children = psutil.Process(driver.pid).children(recursive=True)
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            driver.kill()
        # Ray fate-shares its core processes with the driver; its dashboard and runtime-env agents
        # can outlive it for a while: they were started by this test, so end them by pid.
        agents = [p for p in children if _name(p).endswith("Agent")]
        core = [p for p in children if p not in agents]
        _, alive = psutil.wait_procs(core, timeout=15)
        lingering = [_name(p) for p in alive]
        for process in alive + agents:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
    assert not lingering, f"Ray processes survived the driver: {lingering}"
    committed_at_kill = set(RunStore(out).committed_ids())
    assert committed_at_kill, "the driver was killed before any cell was stored"

    resumed = run(config, out, cache)
    all_ids = {c.cell_id for c in resumed.cells}
    assert len(all_ids) == 9 and committed_at_kill < all_ids
    assert set(resumed.skipped) == committed_at_kill
    assert set(resumed.executed) == all_ids - committed_at_kill
    assert resumed.complete
    assert_each_cell_once(out, all_ids)

    run(config, tmp_path / "clean", tmp_path / "cache-clean")
    assert stored_results(out) == stored_results(tmp_path / "clean")


def test_a_killed_worker_is_retried_or_the_cell_recorded_failed(
    ray_session, synthetic_dataset, tmp_path
):
    methods = (
        '[[methods]]\nname = "crash_once"\nlabel = "CrashOnce"\nbits = ["W4A4"]\n'
        '[[methods]]\nname = "crash_always"\nlabel = "CrashAlways"\nbits = ["W4A4"]\n'
    )
    config = write_config(tmp_path / "m.toml", synthetic_dataset, methods)
    out, cache = tmp_path / "run", tmp_path / "cache"
    summary = run(config, out, cache, max_retries=1)
    once = next(c for c in summary.cells if c.method == "crash_once")
    always = next(c for c in summary.cells if c.method == "crash_always")
    assert summary.statuses[once.cell_id] == "done" and executions(cache)[once.cell_id] == 2
    assert summary.statuses[always.cell_id] == "failed" and executions(cache)[always.cell_id] == 2
    assert summary.reasons[always.cell_id].startswith("worker lost: ")


def test_enospc_during_a_run_stops_cleanly_and_the_rerun_resumes(
    ray_session, synthetic_dataset, tmp_path, monkeypatch
):
    from harness import store as store_module

    config = write_config(tmp_path / "m.toml", synthetic_dataset, FP_MINMAX)
    out, cache = tmp_path / "run", tmp_path / "cache"
    real_write = os.write
    commits = {"n": 0}

    def disk_fills_up(fd, data):
        if b'"rows_sha256"' in bytes(data):
            commits["n"] += 1
            if commits["n"] == 2:  # the second cell's commit record hits a full disk
                real_write(fd, bytes(data[:50]))
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(store_module.os, "write", disk_fills_up)
    with pytest.raises(StoreError, match="No space left on device.*rerun to resume"):
        run(config, out, cache)
    monkeypatch.undo()
    store = RunStore(out)
    committed = set(store.committed_ids())
    assert len(committed) == 1
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    for path in (out / "cells").glob("*.json"):
        if path.stem not in committed:  # nothing half-written carries a result name
            pytest.fail(f"{path} exists without being a committed cell")
    resumed = run(config, out, cache)
    assert set(resumed.skipped) == committed and resumed.complete
    assert_each_cell_once(out, {c.cell_id for c in resumed.cells})


def _random_model_dir(out: Path) -> Path:
    """A diffusers-format OneStepSR directory with the tiny architecture and seeded random weights."""
    from safetensors.torch import save_file

    from harness.tiny import arch

    vae = arch.build_vae(0)
    vae.register_to_config(scaling_factor=0.5)
    vae.save_pretrained(out / "vae")
    arch.save_unet(arch.build_unet(0), out / "unet")
    arch.build_scheduler().save_pretrained(out / "scheduler")
    save_file(
        {"prompt_embeds": arch.build_context().contiguous()}, str(out / "prompt_embeds.safetensors")
    )
    return out


@pytest.mark.slow
def test_smoke_config_end_to_end(ray_session, tmp_path):
    """configs/smoke.toml with the real execute_cell through Ray (2 workers). Until the embedded tiny
    model is shipped, the same config runs on a seeded random-weight model of the same architecture
    (the pipeline is identical; only the numbers differ). About 40 s on the shared 2-core machine,
    most of it loading the calibration photos and the models in each worker: marked slow."""
    from harness.loaders import TINY_DIR
    from harness.runner import run_matrix

    config = REPO / "configs" / "smoke.toml"
    if not (TINY_DIR / "unet" / "config.json").is_file():
        model_dir = _random_model_dir(tmp_path / "random-model")
        text = config.read_text().replace('model = "tiny"', f'model = "{model_dir}"')
        assert text != config.read_text()
        config = tmp_path / "smoke.toml"
        config.write_text(text)
    out, cache = tmp_path / "smoke", tmp_path / "cache"
    first = run_matrix(config, out_dir=out, cache_dir=cache, progress=False)
    assert first.complete and first.count("done") == 3, first.reasons
    store = RunStore(out)
    by_label = {(c.label, c.bits): store.read_cell(c.cell_id).record for c in first.cells}
    fp = by_label[("FP", "FP")]["datasets"]["demo"]
    w8 = by_label[("MinMax", "W8A8")]["datasets"]["demo"]
    w4 = by_label[("MinMax", "W4A4")]["datasets"]["demo"]
    assert fp["images"] == w8["images"] == w4["images"] == 2  # limit 2 applied and recorded
    assert fp["limit"] == 2 and "psnr_fp" in fp["unavailable"]
    assert set(w8["means"]) == {"psnr", "ssim", "psnr_fp", "ssim_fp"}
    assert w8["means"]["psnr_fp"] > w4["means"]["psnr_fp"]
    assert by_label[("MinMax", "W4A4")]["model_record"]["calibration_cache"] == "miss"
    assert by_label[("MinMax", "W4A4")]["model_record"]["summary"]["label"].startswith("simulated")
    assert len(store.read_rows(first.cells[1].cell_id)) == 2
    assert {c["kind"] for c in by_label[("MinMax", "W4A4")]["crops"]} == {"hr", "lr_up", "sr"}
    assert len(list((cache / "quantized").iterdir())) == 2
    stamps = {p: p.stat().st_mtime_ns for p in cache.rglob("*")}
    again = run_matrix(config, out_dir=out, cache_dir=cache, progress=False)
    assert again.executed == [] and len(again.skipped) == 3
    unchanged = {p: p.stat().st_mtime_ns for p in cache.rglob("*")} == stamps
    assert unchanged  # no calibration, no inference

    from reports.build import build_report

    files = build_report(out)
    markdown = files["markdown"].read_text()
    assert "| W8A8 | MinMax |" in markdown and "first 2 image(s)" in markdown
    assert files["visual_html"].is_file() and files["latex"].is_file()


def _fp_cell(tmp_path: Path, model_dir: Path, manifests=None):
    from harness.runconfig import dataset_manifests, expand_cells, load_run_config

    path = tmp_path / "fp.toml"
    path.write_text(
        f'model = "{model_dir}"\ndatasets = ["demo"]\nmetrics = ["psnr", "psnr_fp"]\nlimit = 1\n'
        "[inference]\nlatent_tile = 0\nvae_encoder_tile = 0\nvae_decoder_tile = 0\n"
        '[visual]\nimages = 1\ncrop = 32\n[[methods]]\nname = "fp"\n'
    )
    config = load_run_config(path)
    return expand_cells(config, manifests or dataset_manifests(config.datasets))[0]


def test_execute_cell_in_process_success_divergence_and_changed_data(tmp_path):
    """The real execute_cell without Ray: an FP cell on a random-weight model, the same model with
    NaN injected into a UNet layer (diverged, with the cause), and data that changed since the run
    was planned (failed, with the reason)."""
    import torch
    from safetensors.torch import load_file, save_file

    from harness.cells import CellContext, execute_cell

    model_dir = _random_model_dir(tmp_path / "model")
    ctx = CellContext(cache_dir=str(tmp_path / "cache"))
    cell = _fp_cell(tmp_path, model_dir)
    outcome = execute_cell(cell, ctx)
    assert outcome.status == "done", outcome.traceback
    demo = outcome.datasets["demo"]
    assert (
        demo["images"] == 1 and set(demo["means"]) == {"psnr"} and "psnr_fp" in demo["unavailable"]
    )
    assert {c.kind for c in outcome.crops} == {"hr", "lr_up", "sr"}
    assert outcome.rows[0]["dataset"] == "demo"
    assert (
        outcome.environment["device"] == "cpu"
        and outcome.environment["model_identity"]["weights_sha256"]
    )

    weights = model_dir / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(weights))
    name = next(k for k in tensors if k.endswith("conv_in.weight"))
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, str(weights))
    diverged = execute_cell(_fp_cell(tmp_path, model_dir), ctx)
    assert diverged.status == "diverged" and diverged.reason.startswith("NaN/Inf: ")
    assert "UNet" in diverged.reason

    stale = _fp_cell(tmp_path, model_dir, manifests={"demo": "0" * 64})
    failed = execute_cell(stale, ctx)
    assert failed.status == "failed" and "changed since the run was configured" in failed.reason
