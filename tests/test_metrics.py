"""Tests for harness.metrics: specs as data, offline availability, NIQE params, scoring rules."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch

import harness.metrics as hm
from harness.errors import (
    ConfigError,
    DivergedError,
    ImageError,
    MetricUnavailable,
    UnknownNameError,
)
from tests import _reference_metrics as ref

MISSING_HERE = ("lpips", "dists", "musiq", "maniqa", "maniqa-pipal", "clipiqa", "fid")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """Point TORCH_HOME and the Hugging Face cache at empty temporary directories."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    return tmp_path


def _smooth_image(seed: int, height: int, width: int) -> np.ndarray:
    """A natural-ish RGB test image in [0, 1], exactly on 8-bit levels."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((height // 8 + 2, width // 8 + 2, 3))
    up = np.kron(coarse, np.ones((8, 8, 1)))[:height, :width]
    noisy = np.clip(up + rng.normal(0, 0.05, up.shape), 0, 1)
    return (np.floor(noisy * 255 + 0.5) / 255).astype(np.float32)


def _t(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)[None].contiguous()


# ---------------------------------------------------------------------------------- specs


def test_registry_names_kinds_directions():
    assert set(hm.METRICS) == {
        "psnr",
        "ssim",
        "psnr_fp",
        "ssim_fp",
        "lpips",
        "dists",
        "niqe",
        "musiq",
        "maniqa",
        "maniqa-pipal",
        "clipiqa",
        "fid",
    }
    kinds = {n: s.kind for n, s in hm.METRICS.items()}
    assert kinds["psnr"] == kinds["ssim"] == kinds["lpips"] == kinds["dists"] == "fr"
    assert kinds["psnr_fp"] == kinds["ssim_fp"] == "fp"
    assert {kinds[n] for n in ("niqe", "musiq", "maniqa", "maniqa-pipal", "clipiqa")} == {"nr"}
    assert kinds["fid"] == "folder"
    lower = {n for n, s in hm.METRICS.items() if s.lower_better}
    assert lower == {"lpips", "dists", "niqe", "fid"}
    assert hm.METRICS["lpips"].arrow == "↓" and hm.METRICS["psnr"].arrow == "↑"


def test_psnr_ssim_are_exactly_osediffs_pyiqa_call():
    for name, pyiqa_name in (
        ("psnr", "psnr"),
        ("ssim", "ssim"),
        ("psnr_fp", "psnr"),
        ("ssim_fp", "ssim"),
    ):
        spec = hm.METRICS[name]
        assert spec.pyiqa_name == pyiqa_name
        assert dict(spec.pyiqa_kwargs) == {"test_y_channel": True, "color_space": "ycbcr"}
        assert spec.pyiqa_call == (
            f"pyiqa.create_metric('{pyiqa_name}', test_y_channel=True, color_space='ycbcr')"
        )
        assert spec.required_files == ()


def test_maniqa_variants_are_separate_and_pinned():
    koniq, pipal = hm.METRICS["maniqa"], hm.METRICS["maniqa-pipal"]
    assert dict(koniq.pyiqa_kwargs) == {"train_dataset": "koniq", "scale": 0.8}
    assert pipal.pyiqa_name == "maniqa-pipal"
    assert {f.filename for f in koniq.required_files} == {"model.safetensors", "ckpt_koniq10k.pt"}
    assert {f.filename for f in pipal.required_files} == {
        "model.safetensors",
        "MANIQA_PIPAL-ae6d356b.pth",
    }
    assert dict(hm.METRICS["lpips"].pyiqa_kwargs) == {"net": "alex", "version": "0.1"}
    assert dict(hm.METRICS["musiq"].pyiqa_kwargs) == {"pretrained": "koniq10k"}


def test_spec_is_immutable():
    with pytest.raises(TypeError):
        hm.METRICS["psnr"].pyiqa_kwargs["crop_border"] = 4  # type: ignore[index]


def test_as_record_is_json_with_pyiqa_version():
    import pyiqa

    for spec in hm.METRICS.values():
        record = json.loads(json.dumps(spec.as_record()))
        assert record["pyiqa_version"] == metadata.version("pyiqa") == pyiqa.__version__
        assert record["name"] == spec.name and record["pyiqa_call"] == spec.pyiqa_call
        assert record["direction"] in ("↑", "↓") and record["kind"] == spec.kind
        assert len(record["required_files"]) == len(spec.required_files)
    assert hm.METRICS["niqe"].as_record()["seed"] == hm.METRIC_SEED


def test_unknown_name_suggests_close_match():
    with pytest.raises(UnknownNameError, match="Did you mean 'psnr'"):
        hm.get_metric_spec("psnrr")
    with pytest.raises(UnknownNameError, match="maniqa-pipal"):
        hm.parse_metric_names("psnr, maniqa_pipal")
    assert hm.parse_metric_names(" psnr,ssim ,psnr,") == ["psnr", "ssim"]
    with pytest.raises(ConfigError):
        hm.parse_metric_names(" , ")


def test_specs_agree_with_pyiqa_configs():
    from pyiqa.default_model_configs import DEFAULT_CONFIGS

    for spec in hm.METRICS.values():
        config = DEFAULT_CONFIGS[spec.pyiqa_name]
        assert config.get("lower_better", False) == spec.lower_better, spec.name
        expected_mode = "FR" if spec.kind in ("fr", "fp") else "NR"
        assert config["metric_mode"] == expected_mode, spec.name
    assert DEFAULT_CONFIGS["ssim"]["metric_opts"]["downsample"] is False


def test_required_files_match_the_sources_pyiqa_uses():
    """Guards against drift: each file name and URL is what pyiqa 0.1.16 would fetch."""
    import pyiqa.archs.clip_model as clip_model
    import pyiqa.archs.dists_arch as dists_arch
    import pyiqa.archs.inception as inception
    import pyiqa.archs.lpips_arch as lpips_arch
    import pyiqa.archs.maniqa_arch as maniqa_arch
    import pyiqa.archs.musiq_arch as musiq_arch
    import pyiqa.archs.niqe_arch as niqe_arch
    from timm.models import get_pretrained_cfg
    from torchvision.models import AlexNet_Weights, VGG16_Weights

    def urls(name: str) -> set[str]:
        return {f.url for f in hm.METRICS[name].required_files}

    assert urls("lpips") == {
        AlexNet_Weights.IMAGENET1K_V1.url,
        lpips_arch.default_model_urls["0.1_alex"],
    }
    assert urls("dists") == {VGG16_Weights.IMAGENET1K_V1.url, dists_arch.default_model_urls["url"]}
    assert urls("musiq") == {musiq_arch.default_model_urls["koniq10k"]}
    assert urls("niqe") == {niqe_arch.default_model_urls["url"]}
    assert urls("fid") == {inception.FID_WEIGHTS_URL}
    assert urls("clipiqa") == {clip_model._MODELS["RN50"]}
    vit = "https://huggingface.co/" + get_pretrained_cfg("vit_base_patch8_224").hf_hub_id
    assert urls("maniqa") == {
        vit + "/resolve/main/model.safetensors",
        maniqa_arch.default_model_urls["koniq"],
    }
    assert urls("maniqa-pipal") == {
        vit + "/resolve/main/model.safetensors",
        maniqa_arch.default_model_urls["pipal"],
    }
    for spec in hm.METRICS.values():
        for required in spec.required_files:
            if required.cache != "hf-hub":
                assert required.url.endswith("/" + required.filename)


# ----------------------------------------------------------------------- offline behaviour


def test_status_reports_missing_files_with_paths(empty_caches):
    start = time.monotonic()
    for name in MISSING_HERE:
        status = hm.metric_status(name)
        assert not status.available, name
        assert status.missing, name
        for required in hm.METRICS[name].required_files:
            assert required.filename in status.reason
            assert required.url in status.reason
        for path in status.missing:
            assert str(path).startswith(str(empty_caches)), path
    assert time.monotonic() - start < 5
    lpips = hm.metric_status("lpips")
    assert set(lpips.missing) == {
        empty_caches / "torch" / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth",
        empty_caches / "torch" / "hub" / "pyiqa" / "LPIPS_v0.1_alex-df73285e.pth",
    }
    for name in ("psnr", "ssim", "psnr_fp", "ssim_fp", "niqe"):
        assert hm.metric_status(name).available, name


def test_status_does_not_import_pyiqa():
    code = (
        "import sys, harness.metrics as m\n"
        "[m.metric_status(n) for n in m.METRICS]\n"
        "print('pyiqa' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "False"


def test_create_lpips_fails_fast_naming_files(empty_caches):
    start = time.monotonic()
    with pytest.raises(MetricUnavailable) as info:
        hm.create_metric("lpips")
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert "alexnet-owt-7be5be79.pth" in message and "LPIPS_v0.1_alex-df73285e.pth" in message
    assert str(empty_caches / "torch" / "hub" / "checkpoints") in message
    assert "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth" in message


@pytest.mark.parametrize("name", MISSING_HERE)
def test_every_weighted_metric_is_unavailable_in_an_empty_cache(empty_caches, name):
    start = time.monotonic()
    with pytest.raises(MetricUnavailable, match=re.escape(name)):
        hm.create_metric(name)
    assert time.monotonic() - start < 10


def test_hf_cached_backbone_is_found(empty_caches):
    """A timm backbone in the HF cache layout counts as present (either file name)."""
    repo = empty_caches / "hf" / "hub" / "models--timm--vit_base_patch8_224.augreg2_in21k_ft_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123456789abcdef0123456789abcdef01234567")
    snapshot = repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    snapshot.mkdir(parents=True)
    (snapshot / "pytorch_model.bin").write_bytes(b"x")
    status = hm.metric_status("maniqa")
    assert not status.available
    assert [p.name for p in status.missing] == ["ckpt_koniq10k.pt"]


def test_corrupt_weight_file_is_unavailable_not_random(empty_caches):
    cache = empty_caches / "torch" / "hub" / "pyiqa"
    cache.mkdir(parents=True)
    (cache / "musiq_koniq_ckpt-e95806b9.pth").write_bytes(b"not a checkpoint")
    assert hm.metric_status("musiq").available
    with pytest.raises(MetricUnavailable, match="musiq_koniq_ckpt-e95806b9.pth"):
        hm.create_metric("musiq")


def test_offline_guard_refuses_every_download_path(tmp_path):
    import huggingface_hub.constants as hf_constants
    import pyiqa.utils.download_util as download_util

    before = (torch.hub.download_url_to_file, hf_constants.HF_HUB_OFFLINE)
    start = time.monotonic()
    with hm.offline_guard():
        assert hf_constants.HF_HUB_OFFLINE is True
        with pytest.raises(MetricUnavailable, match="refused to download"):
            download_util.load_file_from_url("https://example.invalid/w.pth", str(tmp_path))
        with pytest.raises(MetricUnavailable, match="refused to download"):
            torch.hub.load_state_dict_from_url(
                "https://example.invalid/w2.pth", model_dir=str(tmp_path)
            )
        import pyiqa.archs.clip_model as clip_model

        with pytest.raises(MetricUnavailable, match="refused to download"):
            clip_model.load("RN50", "cpu", download_root=str(tmp_path))
    assert time.monotonic() - start < 10
    assert (torch.hub.download_url_to_file, hf_constants.HF_HUB_OFFLINE) == before
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------------------------- NIQE


def test_niqe_asset_matches_its_provenance():
    import scipy.io

    provenance = (hm.ASSETS_DIR / "NIQE_PROVENANCE.md").read_text()
    file_sha = hashlib.sha256(hm.NIQE_ASSET.read_bytes()).hexdigest()
    assert f"`niqe_modelparameters.mat` (this file) | `{file_sha}`" in provenance
    params = scipy.io.loadmat(hm.NIQE_ASSET)
    mu, cov = params["mu_prisparam"], params["cov_prisparam"]
    assert mu.shape == (1, 36) and cov.shape == (36, 36)
    assert mu.dtype == np.float64 and cov.dtype == np.float64
    assert hm.niqe_params_digest(mu, cov) in provenance
    assert np.allclose(cov, cov.T) and np.linalg.eigvalsh(cov).min() > 0


def test_convert_basicsr_npz_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    mu = rng.random((1, 36))
    a = rng.random((36, 36))
    cov = a @ a.T
    np.savez(
        tmp_path / "p.npz", mu_pris_param=mu, cov_pris_param=cov, gaussian_window=np.ones((7, 7))
    )
    digest = hm.convert_basicsr_niqe_npz(tmp_path / "p.npz", tmp_path / "a.mat")
    hm.convert_basicsr_niqe_npz(tmp_path / "p.npz", tmp_path / "b.mat")
    assert (tmp_path / "a.mat").read_bytes() == (tmp_path / "b.mat").read_bytes()
    import scipy.io

    loaded = scipy.io.loadmat(tmp_path / "a.mat")
    assert np.array_equal(loaded["mu_prisparam"], mu) and np.array_equal(
        loaded["cov_prisparam"], cov
    )
    assert digest == hm.niqe_params_digest(mu, cov)


def test_ensure_niqe_params_copies_once(empty_caches):
    target = hm.ensure_niqe_params()
    assert target == empty_caches / "torch" / "hub" / "pyiqa" / "niqe_modelparameters.mat"
    assert target.read_bytes() == hm.NIQE_ASSET.read_bytes()
    target.write_bytes(b"user file")
    assert hm.ensure_niqe_params() == target
    assert target.read_bytes() == b"user file"  # an existing file is never overwritten


@pytest.fixture(scope="module")
def niqe_metric(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch")))
    try:
        yield hm.create_metric("niqe")
    finally:
        mp.undo()


def test_niqe_offline_plausible_and_deterministic(niqe_metric):
    from PIL import Image, ImageFilter
    from skimage import data

    photo = data.astronaut()
    blurred = np.asarray(Image.fromarray(photo).filter(ImageFilter.GaussianBlur(3)))
    sharp_score = niqe_metric.score(_t(photo.astype(np.float32) / 255))
    blur_score = niqe_metric.score(_t(blurred.astype(np.float32) / 255))
    assert 2.0 < sharp_score < 7.0
    assert blur_score > sharp_score + 2.0
    assert niqe_metric.score(_t(photo.astype(np.float32) / 255)) == sharp_score


def test_niqe_refuses_images_below_one_block(niqe_metric):
    with pytest.raises(ImageError, match="at least 96x96"):
        niqe_metric.score(torch.rand(1, 3, 64, 200))


# ------------------------------------------------------------------ scoring rules, formulas


@pytest.fixture(scope="module")
def y_suite():
    return hm.MetricSuite("psnr,ssim,psnr_fp,ssim_fp")


def test_suite_matches_reference_formulas(y_suite):
    sr, hr = _smooth_image(1, 96, 120), _smooth_image(2, 96, 120)
    hr = np.clip(0.6 * sr + 0.4 * hr, 0, 1)
    hr = (np.floor(hr * 255 + 0.5) / 255).astype(np.float32)
    scores = y_suite.score(_t(sr), _t(hr), _t(hr))
    assert scores["psnr"] == pytest.approx(ref.psnr_y(sr, hr, eps=1e-8), abs=1e-4)
    assert scores["psnr"] == pytest.approx(ref.psnr_y(sr, hr), abs=1e-4)
    expected_ssim = ref.ssim_y(sr, hr, round_y=True, clip_negative_cs=True)
    assert scores["ssim"] == pytest.approx(expected_ssim, abs=1e-5)
    assert scores["psnr_fp"] == scores["psnr"] and scores["ssim_fp"] == scores["ssim"]


def test_ssim_does_not_downsample_large_images(y_suite):
    """pyiqa's SSIM can average-pool by round(min(H,W)/256) like MATLAB; 'ssim' does not."""
    sr, hr = _smooth_image(3, 512, 520), _smooth_image(4, 512, 520)
    hr = (np.floor(np.clip(0.7 * sr + 0.3 * hr, 0, 1) * 255 + 0.5) / 255).astype(np.float32)
    score = y_suite.score(_t(sr), _t(hr), _t(hr))["ssim"]
    plain = ref.ssim_y(sr, hr, clip_negative_cs=True)
    pooled = ref.ssim_y(sr, hr, clip_negative_cs=True, downsample=True)
    assert score == pytest.approx(plain, abs=1e-5)
    assert abs(pooled - plain) > 1e-3


def test_inputs_are_quantized_to_8_bit(y_suite):
    hr = _smooth_image(5, 64, 64)
    below_half_level = np.clip(hr + 0.4 / 255, 0, 1)  # rounds back to hr everywhere
    scores = y_suite.score(_t(below_half_level), _t(hr), _t(hr))
    assert scores["psnr"] == pytest.approx(80.0)  # identical after quantization: pyiqa's eps cap
    assert scores["ssim"] == pytest.approx(1.0)
    quantized = hm.quantize_8bit(_t(below_half_level))
    assert torch.equal(quantized, _t(hr))


def test_shape_mismatch_is_an_error_naming_both_shapes(y_suite):
    with pytest.raises(
        ImageError, match=re.escape("(1, 3, 64, 64)") + ".*" + re.escape("(1, 3, 64, 60)")
    ):
        y_suite.score(torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 60), torch.rand(1, 3, 64, 64))


def test_invalid_inputs_are_errors(y_suite):
    good = torch.rand(1, 3, 32, 32)
    bad = good.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(DivergedError):
        y_suite.score(bad, good, good)
    with pytest.raises(ImageError, match="values must be in"):
        y_suite.score(good * 1.5, good, good)
    with pytest.raises(ImageError, match="1 x 3 x H x W"):
        y_suite.score(good[0], good, good)
    with pytest.raises(ConfigError, match="needs a reference"):
        y_suite.score(good, None, good)
    with pytest.raises(ConfigError, match="full-precision"):
        y_suite.score(good, good, None)


def test_nan_score_is_undefined_never_a_number():
    from harness.errors import MetricUndefined

    loaded = hm.LoadedMetric(hm.METRICS["niqe"], lambda x: torch.tensor([float("nan")]), "cpu", {})
    with pytest.raises(MetricUndefined, match="niqe.*x.png"):
        loaded.score(torch.rand(1, 3, 128, 128), image="x.png")
    # NaN in the image itself is a diverged model, not an undefined score
    with pytest.raises(DivergedError, match="NaN"):
        loaded.score(torch.full((1, 3, 128, 128), float("nan")), image="x.png")


def test_suite_records_unavailable_with_reasons(empty_caches):
    suite = hm.MetricSuite(["psnr", "lpips"])
    assert suite.available == ["psnr"]
    assert "alexnet-owt-7be5be79.pth" in suite.unavailable["lpips"]
    record = suite.records()["psnr"]
    assert record["effective_options"]["test_y_channel"] is True
    assert record["effective_options"]["color_space"] == "ycbcr"
    assert suite.spec_records() == suite.records()


def test_seeded_is_reproducible_and_restores_state():
    import random

    torch.manual_seed(7)
    np.random.seed(7)
    random.seed(7)
    outside = (torch.rand(1).item(), np.random.rand(), random.random())
    torch.manual_seed(7)
    np.random.seed(7)
    random.seed(7)
    draws = []
    for _ in range(2):
        with hm.seeded():
            draws.append((torch.rand(3).tolist(), np.random.randint(0, 1000, 3).tolist()))
    assert draws[0] == draws[1]
    assert (torch.rand(1).item(), np.random.rand(), random.random()) == outside


def test_reference_independent_of_pyiqa_module():
    source = Path(ref.__file__).read_text()
    assert "pyiqa" not in source.split('"""', 2)[2]  # the reference code never imports pyiqa
