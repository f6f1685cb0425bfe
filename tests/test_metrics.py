"""fastdec.metrics against reference implementations (scikit-image, numpy/scipy two-pass statistics)."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from scipy import linalg, stats
from skimage import data, filters
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from safetensors.torch import load_file

from fastdec.errors import EvalError
from fastdec.eval import metrics as M


def _photos():
    return {"astronaut": data.astronaut(), "coffee": data.coffee(), "chelsea": data.chelsea()}


def _perturbed(image: np.ndarray, seed: int) -> list[tuple[str, np.ndarray]]:
    """Real photo in [0, 1] and perturbed versions: Gaussian noise, blur, both."""
    rng = np.random.default_rng(seed)
    noisy = np.clip(image + rng.normal(0, 0.04, image.shape), 0, 1)
    blurred = filters.gaussian(image, sigma=1.5, channel_axis=2)
    both = np.clip(filters.gaussian(image, sigma=0.8, channel_axis=2) + rng.normal(0, 0.02, image.shape), 0, 1)
    return [("noise", noisy), ("blur", blurred), ("blur+noise", both)]


def _t(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1)[None].float()


@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea"])
def test_psnr_and_ssim_match_scikit_image(name):
    photo = _photos()[name].astype(np.float64) / 255
    for kind, pert in _perturbed(photo, seed=len(name)):
        pert = pert.astype(np.float32).astype(np.float64)  # what the float32 tensor holds
        ref_psnr = peak_signal_noise_ratio(photo, pert, data_range=1)
        ref_ssim = structural_similarity(photo, pert, channel_axis=2, gaussian_weights=True, sigma=1.5,
                                         use_sample_covariance=False, data_range=1)
        got_psnr = float(M.psnr(_t(pert), _t(photo))[0])
        got_ssim = float(M.ssim(_t(pert), _t(photo))[0])
        assert got_psnr == pytest.approx(ref_psnr, abs=1e-3), (name, kind)
        assert got_ssim == pytest.approx(ref_ssim, abs=1e-3), (name, kind)


def test_metrics_are_per_image_and_ordered():
    photo = data.astronaut()[:256, :256].astype(np.float64) / 255
    (_, noisy), (_, blurred), _ = _perturbed(photo, seed=0)
    target = torch.cat([_t(photo), _t(photo)])
    pred = torch.cat([_t(noisy), _t(blurred)])
    assert M.psnr(pred, target).shape == (2,)
    assert M.ssim(pred, target).shape == (2,)
    ms = M.ms_ssim(pred, target)
    assert ms.shape == (2,) and ((ms > 0) & (ms < 1)).all()
    assert float(M.ms_ssim(target, target)[0]) == pytest.approx(1.0, abs=1e-5)
    assert torch.isinf(M.psnr(target, target)).all()


def test_ms_ssim_rejects_small_images_with_the_fix():
    x = torch.rand(1, 3, 128, 256)
    with pytest.raises(M.MetricUnavailable, match=r"at least 176 px.*--resolution"):
        M.ms_ssim(x, x)
    assert M.ms_ssim_min_size() == 176
    with pytest.raises(M.MetricUnavailable):
        M.ms_ssim(torch.rand(1, 3, 200, 175), torch.rand(1, 3, 200, 175))
    y = torch.rand(1, 3, 176, 180)
    assert float(M.ms_ssim(y, y)[0]) == pytest.approx(1.0, abs=1e-5)


def test_shape_mismatch_names_the_fix():
    with pytest.raises(EvalError, match="crop both"):
        M.psnr(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 24))


def test_mean_ci_is_the_student_t_interval():
    values = np.random.default_rng(1).normal(30, 2, size=37)
    ci = M.mean_ci(values)
    low, high = stats.t.interval(0.95, len(values) - 1, loc=values.mean(), scale=stats.sem(values))
    assert ci.mean == pytest.approx(values.mean())
    assert (ci.low, ci.high) == pytest.approx((low, high), rel=1e-12)
    assert ci.n == 37
    with pytest.raises(EvalError, match="non-finite"):
        M.mean_ci([1.0, float("inf")])
    for confidence in (95, 0, 1.0, "0.95", True):  # 95 (a percentage) gave a NaN interval
        with pytest.raises(EvalError, match="fraction between 0 and 1"):
            M.mean_ci([1.0, 2.0, 3.0], confidence)


def test_summarize_counts_exact_matches_and_leaves_out_unmeasured():
    values = [30.0, 32.0, float("inf"), None, 34.0]
    summary = M.summarize(values)
    assert summary["mean"] == pytest.approx(32.0) and summary["n"] == 3 and summary["n_infinite"] == 1
    assert summary["ci_low"] < 32.0 < summary["ci_high"]
    assert M.summarize([float("inf")] * 2) == {"mean": float("inf"), "n": 2, "n_infinite": 2}
    assert M.summarize([None, None]) is None
    assert "n_infinite" not in M.summarize([1.0, 2.0])


@pytest.mark.parametrize("bad", [None, "30,31", {"a": 30.0}, 30.0, [30.0, "31"], [30.0, True]])
def test_summarize_names_what_is_no_sequence_of_scores(bad):
    # None raised "'NoneType' object is not iterable", a string was split into letters for math.isnan
    from fastdec.errors import InputTypeError

    with pytest.raises(InputTypeError, match="summarize takes"):  # a TypeError, as the raw error was
        M.summarize(bad)
    with pytest.raises(InputTypeError, match="paired_differences takes"):
        M.summarize_paired([30.0, 31.0], bad)
    with pytest.raises(InputTypeError, match="got Tensor"):  # one score is no sequence of them
        M.summarize(torch.tensor(30.0))


def test_summarize_takes_numpy_scalars_and_tensors():
    assert M.summarize([np.float32(30.0), np.int64(32), None])["mean"] == pytest.approx(31.0)
    assert M.summarize(torch.tensor([30.0, 32.0]))["mean"] == pytest.approx(31.0)
    # per-image scores collected one by one are 0-dim tensors: they were averaged before, and still are
    scores = [M.psnr(torch.full((1, 3, 8, 8), 0.5), torch.full((1, 3, 8, 8), v))[0] for v in (0.4, 0.6)]
    assert M.summarize(scores)["mean"] == pytest.approx(20.0, abs=1e-4)
    assert M.summarize_paired(scores, [np.array(19.0), np.array(19.0)])["mean"] == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("bad", [float("nan"), -float("inf")])
def test_undefined_scores_are_refused_not_counted_as_exact_matches(bad):
    # NaN (VIF of a flat image) and -inf were counted in n_infinite, read as perfect reconstructions
    with pytest.raises(EvalError, match="NaN or -inf"):
        M.summarize([30.0, bad, 31.0])
    with pytest.raises(EvalError, match="NaN or -inf"):
        M.summarize_paired([30.0, 31.0], [bad, 30.0])


def test_lpips_without_weights_says_how_to_get_them(tmp_path):
    with pytest.raises(M.MetricUnavailable, match="--lpips-weights"):
        M.LPIPS(tmp_path / "missing.pth")


def _alexnet_features() -> torch.nn.Sequential:
    """torchvision's AlexNet ``features`` layout (indices matter: the checkpoint keys use them)."""
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(), nn.MaxPool2d(3, 2), nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(),
        nn.MaxPool2d(3, 2), nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(), nn.Conv2d(384, 256, 3, padding=1),
        nn.ReLU(), nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2),
    )


def test_lpips_loads_a_local_backbone(tmp_path, monkeypatch):
    """A stand-in for torchvision builds the same AlexNet layout (so the test needs no torchvision), and
    the local state dict (random weights) must land in torchmetrics' LPIPS slices."""
    import sys
    import types

    import torchmetrics.functional.image.lpips as tm_lpips

    monkeypatch.setitem(sys.modules, "torchvision", types.ModuleType("torchvision"))
    monkeypatch.setattr(tm_lpips, "_get_tv_model_features", lambda net, pretrained=False: _alexnet_features())
    torch.manual_seed(0)
    state = {f"features.{k}": v for k, v in _alexnet_features().state_dict().items()}
    state["classifier.1.weight"] = torch.zeros(2, 2)  # a full torchvision checkpoint has more than features
    torch.save(state, tmp_path / "alexnet.pth")
    lpips = M.LPIPS(tmp_path / "alexnet.pth")
    loaded = lpips.model.state_dict()
    torch.testing.assert_close(loaded["net.slice1.0.weight"], state["features.0.weight"])
    torch.testing.assert_close(loaded["net.slice5.10.weight"], state["features.10.weight"])
    x = torch.rand(2, 3, 64, 64)
    gen = torch.Generator().manual_seed(0)
    small = (x + 0.02 * torch.randn(x.shape, generator=gen)).clamp(0, 1)
    large = (x + 0.2 * torch.randn(x.shape, generator=gen)).clamp(0, 1)
    assert lpips(x, x).abs().max() < 1e-6
    d_small, d_large = lpips(small, x), lpips(large, x)
    assert d_small.shape == (2,) and (d_large > d_small).all() and (d_small > 0).all()
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(M.MetricUnavailable, match="not a torchvision alex state dict"):
        M.LPIPS(tmp_path / "other.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "alexnet.pth").read_bytes()[:300])
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "text.pth").write_text("features.0.weight: 1\n")
    torch.save({"features.0.weight": _Marker(tmp_path / "ran")}, tmp_path / "code.pth")
    for bad, words in [("cut.pth", "truncated, corrupt"), ("empty.pth", "truncated, corrupt"),
                       ("text.pth", "a text file"), ("code.pth", "holds pickled Python objects")]:
        with pytest.raises(M.MetricUnavailable, match=f"{bad}.*{words}"):  # tracebacks before, or torch's advice
            M.LPIPS(tmp_path / bad)
    assert not (tmp_path / "ran").exists()


class _Marker:
    """A pickle whose loading would create ``path``."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


# ----------------------------------------------------------------------------- Fréchet statistics
def _two_pass(x: np.ndarray, y: np.ndarray) -> float:
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _features(seed: int, n: int, dim: int = 24, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    # a large common offset: an uncentred E[xx^T] (or a naive one-pass sum) would go badly wrong here
    return rng.normal(size=(n, dim)) @ mixing + 50.0 + shift


def _stream(x: np.ndarray, batch_sizes=(1, 7, 64, 3)) -> M.FrechetStats:
    stats_, i, k = M.FrechetStats(), 0, 0
    while i < len(x):
        b = batch_sizes[k % len(batch_sizes)]
        stats_.update(torch.from_numpy(x[i:i + b]))
        i, k = i + b, k + 1
    return stats_


def test_streamed_frechet_equals_two_pass():
    x, y = _features(0, 500), _features(1, 400, shift=0.3)
    sx, sy = _stream(x), _stream(y)
    assert sx.count == 500
    np.testing.assert_allclose(sx.mean, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sx.covariance, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-12)
    expected = _two_pass(x, y)
    assert expected > 1.0
    assert sx.frechet_distance(sy) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_refuses_a_mean_and_covariance_of_different_dimensions():
    # both sides (5,) means beside 4x4 covariances: a number came out
    with pytest.raises(EvalError, match=r"\(5, 5\) covariance, got \(4, 4\)"):
        M.frechet_distance(np.zeros(5), np.eye(4), np.ones(5), np.eye(4))
    with pytest.raises(EvalError, match="differ in dimension"):
        M.frechet_distance(np.zeros(4), np.eye(4), np.zeros(5), np.eye(5))


def test_merging_shards_equals_the_union():
    x = _features(2, 301)
    y = _features(3, 250, shift=0.5)
    a, b = _stream(x[:120]), _stream(x[120:], batch_sizes=(50,))
    merged = a.merge(b)
    whole = _stream(x, batch_sizes=(301,))
    assert merged.count == 301
    np.testing.assert_allclose(merged.mean, whole.mean, rtol=1e-12)
    np.testing.assert_allclose(merged.m2, whole.m2, rtol=1e-9)
    assert merged.frechet_distance(_stream(y)) == pytest.approx(_two_pass(x, y), rel=1e-6)
    # merging an empty shard changes nothing; merging into an empty one copies
    assert M.FrechetStats().merge(merged).count == 301
    assert merged.merge(M.FrechetStats()).count == 301


def test_identical_sets_give_zero_and_singular_covariances_are_handled():
    x = _features(4, 200)
    assert abs(_stream(x).frechet_distance(_stream(x[::-1].copy()))) < 1e-6
    few = _features(5, 10, dim=24)  # 10 samples in 24 dimensions: singular covariances
    other = _features(6, 12, dim=24, shift=1.0)
    value = _stream(few).frechet_distance(_stream(other))
    assert np.isfinite(value) and value > 0


def test_stats_save_load_and_gather(tmp_path):
    from accelerate import Accelerator

    x = _features(7, 64)
    s = _stream(x)
    back = M.FrechetStats.load(s.save(tmp_path / "stats.npz"))
    np.testing.assert_array_equal(back.m2, s.m2)
    assert back.count == 64
    gathered = s.gather(Accelerator(cpu=True))  # one process: the gather is the identity
    np.testing.assert_allclose(gathered.mean, s.mean)
    with pytest.raises(EvalError, match="dimension"):
        s.update(np.zeros((2, 5)))
    with pytest.raises(EvalError, match="NaN"):
        M.FrechetStats().update(np.full((2, 3), np.nan))


def test_metrics_on_no_pixels_no_images_and_odd_values():
    # PSNR and flicker of 0x0 images were NaN; SSIM of an empty batch an IndexError inside torchmetrics
    with pytest.raises(EvalError, match=r"images shaped \(1, 3, 0, 0\) have no pixels"):
        M.psnr(torch.rand(1, 3, 0, 0), torch.rand(1, 3, 0, 0))
    with pytest.raises(EvalError, match="have no pixels"):
        M.flicker_score(torch.rand(3, 3, 0, 4), torch.rand(3, 3, 0, 4))
    assert M.ssim(torch.rand(0, 3, 16, 16), torch.rand(0, 3, 16, 16)).shape == (0,)
    # mean_ci: values that are no numbers named (raw numpy errors), a tensor that requires grad averaged
    for values in (["a"], [[1.0, 2.0], [3.0]], {"a": 1}):
        with pytest.raises(EvalError, match="mean_ci takes a sequence of numbers"):
            M.mean_ci(values)
    assert M.mean_ci(torch.tensor([1.0, 2.0, 3.0], requires_grad=True)).mean == pytest.approx(2.0)
    # numpy scalars are numbers (np.float32 is no float subclass: "must be ... got np.float32(0.9)")
    assert M.mean_ci([1.0, 2.0, 3.0], confidence=np.float32(0.9)).confidence == pytest.approx(0.9)
    assert M.psnr(torch.full((1, 3, 4, 4), 0.5), torch.full((1, 3, 4, 4), 0.25), data_range=np.float32(1.0)).item() \
        == pytest.approx(12.04, abs=0.01)


def test_stats_files_round_trip_empty_and_take_paths_as_save_decoder_does(tmp_path, monkeypatch):
    # empty statistics were saved as object arrays that load could not read ("write it again" gave the same file)
    empty = M.FrechetStats.load(M.FrechetStats().save(tmp_path / "empty.npz"))
    assert empty.count == 0 and empty.mean is None
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    path = _stream(_features(7, 16, dim=4)).save("~/stats/s.npz")  # it made a folder named '~'
    assert path == tmp_path / "home" / "stats" / "s.npz" and not (tmp_path / "~").exists()
    assert M.FrechetStats.load("~/stats/s.npz").count == 16
    with pytest.raises(TypeError, match="FrechetStats.load's path must be a path"):
        M.FrechetStats.load(5)
    assert M.FrechetStats.load(M.FrechetStats(3).save(tmp_path / "d3.npz")).dim == 3  # it came back with None
    # numpy's and AttributeError's messages before
    for bad in (-1, "3", 2.5, True):
        with pytest.raises(EvalError, match="dim is the feature count"):
            M.FrechetStats(bad)
    with pytest.raises(EvalError, match="features must be an \\(N, D\\) array of numbers, got str"):
        M.FrechetStats().update("abc")
    for call in ("merge", "frechet_distance"):
        with pytest.raises(EvalError, match=f"FrechetStats.{call} takes another FrechetStats, got NoneType"):
            getattr(M.FrechetStats(), call)(None)


@pytest.mark.parametrize("damage, problem", [
    ("truncated", "cannot read Frechet statistics from"), ("text", "cannot read Frechet statistics from"),
    ("missing", "cannot read Frechet statistics from"), ("no m2", "cannot read Frechet statistics from"),
    ("m2 not square", "holds no Frechet statistics"), ("float count", "holds no Frechet statistics"),
    ("nan mean", "holds no Frechet statistics"),  # loaded, and every distance from it was NaN
])
def test_damaged_stats_files_are_named(tmp_path, damage, problem):
    path = _stream(_features(7, 16, dim=4)).save(tmp_path / "stats.npz")
    if damage == "truncated":  # a raw BadZipFile / EOFError before
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "text":
        path.write_text("not an npz")
    elif damage == "missing":
        path = tmp_path / "nowhere.npz"
    elif damage == "no m2":  # a KeyError naming 'm2' before
        np.savez(path, count=16, mean=np.zeros(4))
    elif damage == "m2 not square":  # loaded, then failed in sqrtm far from the file
        np.savez(path, count=16, mean=np.zeros(4), m2=np.zeros((4, 3)))
    elif damage == "nan mean":
        np.savez(path, count=16, mean=np.array([np.nan, 0, 0, 0]), m2=np.eye(4))
    else:
        np.savez(path, count=16.5, mean=np.zeros(4), m2=np.zeros((4, 4)))
    with pytest.raises(EvalError, match=problem) as info:
        M.FrechetStats.load(path)
    assert path.name in str(info.value)


# ----------------------------------------------------------------------------- flicker
def _clip(frames: int = 8, size: int = 32) -> torch.Tensor:
    """A smooth moving gradient kept inside [0.25, 0.75] so added noise never clips."""
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    clip = torch.stack([0.5 + 0.25 * torch.sin(6 * x + 0.3 * t + c) * torch.cos(4 * y)
                        for t in range(frames) for c in range(3)]).view(frames, 3, size, size)
    return clip.double()


def test_flicker_zero_for_perfect_reconstruction_and_grows_with_noise():
    clip = _clip()
    assert M.flicker_score(clip, clip) == 0.0
    gen = torch.Generator().manual_seed(0)
    previous = 0.0
    for sigma in (0.005, 0.02, 0.05):
        noisy = clip + sigma * torch.randn(clip.shape, generator=gen, dtype=torch.float64)
        value = M.flicker_score(noisy, clip)
        assert value > previous
        previous = value


def test_temporally_smooth_error_flickers_less_at_equal_psnr():
    clip = _clip()
    gen = torch.Generator().manual_seed(1)
    pattern = 0.02 * torch.randn(clip.shape[1:], generator=gen, dtype=torch.float64)
    independent = 0.02 * torch.randn(clip.shape, generator=gen, dtype=torch.float64)
    # rescale each frame's noise to the same energy as the fixed pattern: identical per-frame PSNR
    independent *= pattern.norm() / independent.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    smooth, flickering = clip + pattern, clip + independent
    assert torch.allclose(M.psnr(smooth, clip).double(), M.psnr(flickering, clip).double(), atol=1e-4)
    assert M.flicker_score(smooth, clip) == pytest.approx(0.0, abs=1e-12)
    assert M.flicker_score(flickering, clip) > 0.01


# ----------------------------------------------------------------------------- feature extractors
class TinyRandomExtractor:
    """Stands in for VideoMAE: a fixed random 3D conv + pooling."""

    name = "tiny"
    num_frames = 4

    def __init__(self):
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Conv3d(3, 16, 3, padding=1), torch.nn.ReLU(),
                                       torch.nn.AdaptiveAvgPool3d(1), torch.nn.Flatten())

    @torch.no_grad()
    def __call__(self, clips: torch.Tensor) -> torch.Tensor:
        return self.net(clips.permute(0, 2, 1, 3, 4).float())


def test_fvd_with_a_tiny_extractor():
    extractor = TinyRandomExtractor()
    assert isinstance(extractor, M.FeatureExtractor)
    gen = torch.Generator().manual_seed(0)
    real = torch.rand(40, 4, 3, 16, 16, generator=gen)
    degraded = (real + 0.3 * torch.randn(real.shape, generator=gen)).clamp(0, 1)
    s_real = M.FrechetStats().update(extractor(real))
    assert abs(s_real.frechet_distance(M.FrechetStats().update(extractor(real)))) < 1e-6
    assert s_real.frechet_distance(M.FrechetStats().update(extractor(degraded))) > 1e-4


def _tiny_videomae(folder):
    from transformers import VideoMAEConfig, VideoMAEModel

    config = VideoMAEConfig(image_size=32, patch_size=16, num_frames=4, tubelet_size=2, hidden_size=32,
                            num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    torch.manual_seed(0)
    VideoMAEModel(config).save_pretrained(folder)
    return folder


def test_videomae_extractor_from_a_local_folder(tmp_path):
    extractor = M.VideoMAEExtractor(_tiny_videomae(tmp_path / "videomae"))
    assert isinstance(extractor, M.FeatureExtractor) and extractor.num_frames == 4
    feats = extractor(torch.rand(3, 4, 3, 40, 48))
    assert feats.shape == (3, 32) and torch.isfinite(feats).all()
    with pytest.raises(EvalError, match="4-frame clips"):
        extractor(torch.rand(1, 8, 3, 32, 32))
    assert isinstance(M.load_feature_extractor(f"videomae:{tmp_path / 'videomae'}"), M.VideoMAEExtractor)


def test_fvd_without_transformers_names_the_extra(tmp_path, monkeypatch):
    from fastdec.errors import MissingDependencyError

    folder = _tiny_videomae(tmp_path / "videomae")
    monkeypatch.setitem(sys.modules, "transformers", None)  # a base install, without the [metrics] extra
    with pytest.raises(MissingDependencyError, match=r'FVD \(its VideoMAE features\) needs transformers.*'
                                                     r'pip install "fastdec\[metrics\]"'):
        M.VideoMAEExtractor(folder)


def test_videomae_weights_with_pickled_code_are_refused_not_run(tmp_path):
    folder = _tiny_videomae(tmp_path / "videomae")
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save({**state, "extra": _Marker(tmp_path / "ran")}, folder / "pytorch_model.bin")
    with pytest.raises(EvalError, match="holds pickled Python objects, not only tensors .*never unpickles code"):
        M.VideoMAEExtractor(folder)  # torch's UnpicklingError traceback, which advised weights_only=False
    assert not (tmp_path / "ran").exists()
    (folder / "pytorch_model.bin").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")
    with pytest.raises(EvalError, match="cannot be read: truncated, corrupt or in another format \\(a git-lfs"):
        M.VideoMAEExtractor(folder)  # a pointer file is no pickle with code
    (folder / "pytorch_model.bin").write_bytes(b"")  # EOFError
    with pytest.raises(EvalError, match="cannot load VideoMAE weights"):
        M.VideoMAEExtractor(folder)
    (folder / "pytorch_model.bin").unlink()
    (folder / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\n")  # SafetensorError
    with pytest.raises(EvalError, match="cannot load VideoMAE weights .*git lfs pull"):
        M.VideoMAEExtractor(folder)


def test_videomae_loader_errors_name_the_problem(tmp_path):
    with pytest.raises(EvalError, match="not found.*config.json"):
        M.VideoMAEExtractor(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalError, match="not a VideoMAE checkpoint folder"):
        M.VideoMAEExtractor(tmp_path / "empty")
    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"not a folder")
    with pytest.raises(EvalError, match="not a VideoMAE checkpoint folder"):
        M.VideoMAEExtractor(weights)
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "config.json").write_text('{"model_type": "vit"}')
    with pytest.raises(EvalError, match="model_type='vit'"):
        M.VideoMAEExtractor(wrong)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((_tiny_videomae(tmp_path / "ok") / "config.json").read_text())
    with pytest.raises(EvalError, match="broken"):
        M.VideoMAEExtractor(broken)  # config without weights
    with pytest.raises(EvalError, match="unknown feature extractor"):
        M.load_feature_extractor("clip:/x")


class _ScriptedInception(torch.nn.Module):
    def forward(self, x: torch.Tensor, return_features: bool = True) -> torch.Tensor:
        return x.float().mean(dim=(2, 3)).repeat(1, 4)


class _ScriptedI3D(torch.nn.Module):
    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = False) -> torch.Tensor:
        if rescale:
            x = x / 255 * 2 - 1
        return x.mean(dim=(2, 3, 4)).repeat(1, 2)


def test_torchscript_extractors(tmp_path):
    torch.jit.script(_ScriptedInception()).save(str(tmp_path / "inception.pt"))
    torch.jit.script(_ScriptedI3D()).save(str(tmp_path / "i3d.pt"))
    clips = torch.rand(2, 10, 3, 8, 8)
    inception = M.load_feature_extractor(f"inception:{tmp_path / 'inception.pt'}")
    assert inception(clips).shape == (2, 12)
    i3d = M.load_feature_extractor(f"i3d:{tmp_path / 'i3d.pt'}")
    feats = i3d(clips)
    assert feats.shape == (2, 6)
    torch.testing.assert_close(feats[:, :3], clips.mean(dim=(1, 3, 4)) * 2 - 1, atol=1e-5, rtol=0)
    with pytest.raises(EvalError, match="at least 9 frames"):
        i3d(torch.rand(1, 8, 3, 8, 8))
    with pytest.raises(EvalError, match="i3d TorchScript file"):
        M.TorchScriptExtractor(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(EvalError, match="not a TorchScript module"):
        M.TorchScriptExtractor(tmp_path / "junk.pt")


# ----------------------------------------------------------------------------- VIF and gradient energy (issue 13)
def _astronaut_crop() -> np.ndarray:
    return data.astronaut()[100:260, 120:280].astype(np.float64) / 255  # 160 x 160: a face, hair and a flag


def test_vif_is_one_for_the_image_itself_and_falls_with_blur_and_noise():
    photo = _astronaut_crop()
    rng = np.random.default_rng(0)
    x = _t(photo)
    # identical inputs: every local covariance equals the variance, so each scale's information ratio is 1;
    # float32 gives exactly that (the same operations on the same numbers on both sides), 1e-6 is float32 eps
    assert float(M.vif(x, x)[0]) == pytest.approx(1.0, abs=1e-6)
    blur_1 = _t(filters.gaussian(photo, sigma=1.0, channel_axis=2))
    blur_3 = _t(filters.gaussian(photo, sigma=3.0, channel_axis=2))
    noise_small = _t(np.clip(photo + rng.normal(0, 0.01, photo.shape), 0, 1))
    noise_large = _t(np.clip(photo + rng.normal(0, 0.05, photo.shape), 0, 1))
    scores = {name: float(M.vif(y, x)[0]) for name, y in
              (("blur 1", blur_1), ("blur 3", blur_3), ("noise .01", noise_small), ("noise .05", noise_large))}
    assert all(0 < v < 0.9 for k, v in scores.items() if k != "noise .01"), scores
    assert scores["blur 3"] < scores["blur 1"] and scores["noise .05"] < scores["noise .01"] < 1, scores
    # in 8-bit units noise is a loss of information; on [0, 1] tensors torchmetrics' sigma_n^2 = 2 would hide it
    from torchmetrics.functional.image import visual_information_fidelity

    assert float(visual_information_fidelity(noise_large.double(), x.double())) > 0.95 > 0.6 > scores["noise .05"]


def test_vif_is_torchmetrics_vif_in_8_bit_units():
    from torchmetrics.image import VisualInformationFidelity

    photo = _astronaut_crop()
    x = _t(photo)
    y = _t(np.clip(filters.gaussian(photo, sigma=0.8, channel_axis=2)
                   + np.random.default_rng(1).normal(0, 0.02, photo.shape), 0, 1))
    pred, target = torch.cat([y, x]), torch.cat([x, y])
    reference = VisualInformationFidelity(reduction="none")(pred.double() * 255, target.double() * 255)
    # float32 on mean-centred 0-255 values vs the float64 metric class: 1e-4 covers float32's rounding of
    # local variances (measured: < 1e-4 on real decodes, see M.vif), far below a 0.01 CI
    torch.testing.assert_close(M.vif(pred, target).double(), reference, rtol=0, atol=1e-4)
    assert float(M.vif(y, x)[0]) != pytest.approx(float(M.vif(x, y)[0]), abs=1e-3)  # the reference is the 2nd
    assert M.vif(x * 0.5, x * 0.5, data_range=0.5)[0] == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(M.MetricUnavailable, match="at least 41 px"):
        M.vif(torch.rand(1, 3, 40, 64), torch.rand(1, 3, 40, 64))
    assert M.vif(torch.rand(2, 3, 41, 41), torch.rand(2, 3, 41, 41)).shape == (2,)


def test_gradient_energy_ratio_against_scipy_sobel():
    from scipy import ndimage

    photo = _astronaut_crop()
    x = _t(photo)
    blurred = filters.gaussian(photo, sigma=1.5, channel_axis=2)
    noisy = np.clip(photo + np.random.default_rng(2).normal(0, 0.05, photo.shape), 0, 1)

    def energy(image: np.ndarray) -> float:  # scipy's Sobel per channel, the 1-px border (padded) cut off
        image = image.astype(np.float32).astype(np.float64)  # what the float32 tensor holds
        return sum(float((ndimage.sobel(image[..., c], axis=a)[1:-1, 1:-1] ** 2).sum())
                   for c in range(3) for a in (0, 1))

    for other in (blurred, noisy):
        expected = energy(other) / energy(photo)
        # float64 sums of the same products in another order: 1e-6 relative is ample
        assert float(M.gradient_energy_ratio(_t(other), x)[0]) == pytest.approx(expected, rel=1e-6)
    assert float(M.gradient_energy_ratio(x, x)[0]) == 1.0  # the same number divided by itself
    # blur removes edge energy, noise adds some (measured here: 0.34 and 1.13)
    assert float(M.gradient_energy_ratio(_t(blurred), x)[0]) < 0.5
    assert float(M.gradient_energy_ratio(_t(noisy), x)[0]) > 1.05
    flat = torch.full((1, 3, 16, 16), 0.5)
    assert torch.isnan(M.gradient_energy_ratio(torch.rand(1, 3, 16, 16), flat)).all()
    with pytest.raises(EvalError, match="crop both"):
        M.gradient_energy_ratio(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 20))
