"""Fidelity metrics: PSNR/SSIM/MS-SSIM/VIF/LPIPS, the gradient-energy ratio (sharpness), confidence
intervals, streamed Fréchet statistics, temporal metrics (flicker, frame-difference error, temporal energy,
excess motion, TecoGAN's tOF with scikit-image's optical flow), and feature extractors for Fréchet
distances (FID / FVD).

All image tensors are RGB in [0, 1], (N, 3, H, W); clips are (N, T, 3, H, W). Per-image functions
return one value per image so callers can build confidence intervals and per-image tables.
Bad inputs raise :class:`~fastdec.errors.EvalError`; a metric whose weights or package are missing
raises :class:`~fastdec.errors.MetricUnavailable` with the fix.
"""
from __future__ import annotations

import math
import numbers
import os
import pickle
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import EvalError, InputTypeError, MetricUnavailable, import_optional, is_number
from ..io.files import as_path, atomic_write, read_json_object
from ..io.images import check_pixel_range
from ..io.pickles import asks_for_code, load_weights_only, refusal_message

# SSIM with the settings of Wang et al. and scikit-image's reference (gaussian_weights=True):
# 11x11 Gaussian window, sigma 1.5, K1=0.01, K2=0.03, population (not sample) covariance.
SSIM_KERNEL = 11
SSIM_SIGMA = 1.5
MS_SSIM_SCALES = 5

# what `fastdec eval` reports for each kind of input, and the references every decode is compared with
IMAGE_METRICS = ("psnr", "ssim", "ms_ssim", "vif", "gradient_energy", "lpips")
VIDEO_METRICS = ("psnr", "ssim", "flicker", "temporal_energy", "excess_motion", "tof")
REFERENCES = ("original", "teacher")
# None: neither; the value to aim for is 1 (the gradient-energy ratio: below is blur, above is added texture)
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "ms_ssim": True, "vif": True, "gradient_energy": None, "lpips": False,
                    "flicker": False, "temporal_energy": None, "excess_motion": False, "tof": False,
                    "fid": False, "fvd": False}

# VIF-P as torchmetrics computes it: 4 scales of valid 17/9/5/3-px Gaussian windows, so at least 41 px per side,
# and a visual-noise variance of 2 in 8-bit grey levels, hence the 0-255 scale the images are passed in
VIF_MIN_SIZE = 41
VIF_PIXEL_SCALE = 255.0
VIF_NOISE_VARIANCE = 2.0


# ----------------------------------------------------------------------------- per-image metrics
def _check_pair(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0, metric: str = "the metric") -> None:
    if not is_number(data_range) or not 0 < data_range < math.inf:
        raise EvalError(f"data_range is the pixels' full scale (1.0 for [0, 1], 255 for 8-bit), got {data_range!r}")
    for images in (pred, target):  # 0-255 or [-1, 1] images scored against data_range 1 gave wrong numbers
        check_pixel_range(images, metric, data_range)
    if pred.shape != target.shape:
        raise EvalError(
            f"prediction {tuple(pred.shape)} and reference {tuple(target.shape)} differ in shape: "
            "crop both to the same size (multiples of the decoder's spatial factor) before comparing"
        )
    if pred.ndim != 4 or pred.shape[1] != 3:
        raise EvalError(f"expected RGB images shaped (N, 3, H, W), got {tuple(pred.shape)}")
    if 0 in pred.shape[-2:]:  # PSNR of no pixels was NaN, a score with nothing behind it
        raise EvalError(f"images shaped {tuple(pred.shape)} have no pixels to compare")


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image, (N,). Identical images give +inf."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    _check_pair(pred, target, data_range, "PSNR")
    return peak_signal_noise_ratio(
        pred.double(), target.double(), data_range=data_range, reduction="none", dim=(1, 2, 3)
    ).float()


def ssim(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Structural similarity per image, (N,), matching scikit-image's ``structural_similarity``
    with ``gaussian_weights=True, sigma=1.5, use_sample_covariance=False``.

    torchmetrics computes the SSIM map over a reflect-padded image; the reference implementation
    (Wang et al., scikit-image) averages only where the 11x11 window fits inside the image, so the
    5-pixel border is cropped from torchmetrics' full map before averaging.
    """
    from torchmetrics.functional.image import structural_similarity_index_measure

    _check_pair(pred, target, data_range, "SSIM")
    if pred.shape[0] == 0:  # as psnr: no images, no scores (torchmetrics raised IndexError)
        return torch.zeros(0)
    pad = (SSIM_KERNEL - 1) // 2
    if min(pred.shape[-2:]) <= 2 * pad:
        raise EvalError(f"SSIM needs images larger than {2 * pad} px per side, got {tuple(pred.shape[-2:])}")
    # float32: float64 convolutions are ~10x slower on CPU; float32 agrees with skimage (float64) to ~1e-5-1e-4
    # on real frames (5.4e-5 seen at 128 px), far below the 1e-3 that tells two decoders apart
    _, full = structural_similarity_index_measure(
        pred.float(), target.float(), gaussian_kernel=True, sigma=SSIM_SIGMA, kernel_size=SSIM_KERNEL,
        data_range=data_range, reduction="none", return_full_image=True,
    )
    return full[..., pad:-pad, pad:-pad].double().mean(dim=(1, 2, 3)).float()


def ms_ssim_min_size(kernel_size: int = SSIM_KERNEL, scales: int = MS_SSIM_SCALES) -> int:
    """Smallest image side MS-SSIM accepts: the whole window must still fit after ``scales - 1``
    halvings (176 px for 5 scales of an 11-px window, torchmetrics' limit)."""
    return kernel_size * 2 ** (scales - 1)


def ms_ssim(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Multi-scale SSIM per image, (N,) (torchmetrics, 5 scales, the standard weights).

    Raises ``MetricUnavailable`` for images smaller than ``ms_ssim_min_size()`` (176 px) per side.
    """
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

    _check_pair(pred, target, data_range, "MS-SSIM")
    need = ms_ssim_min_size()
    if min(pred.shape[-2:]) < need:
        raise MetricUnavailable(
            f"MS-SSIM needs images of at least {need} px per side (5 scales of an 11-px window), got "
            f"{tuple(pred.shape[-2:])}: use larger images or a larger --resolution"
        )
    return multiscale_structural_similarity_index_measure(
        pred.float(), target.float(), gaussian_kernel=True, sigma=SSIM_SIGMA, kernel_size=SSIM_KERNEL,
        data_range=data_range, reduction="none",
    ).float()


def vif(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Pixel-domain visual information fidelity (VIF-P, Sheikh & Bovik 2006) of ``pred`` against the reference
    ``target``, per image, (N,): torchmetrics' ``visual_information_fidelity``, the function behind its
    ``VisualInformationFidelity`` metric. 1 = the decode carries all of the reference's information; blur and
    noise lower it (contrast enhancement can lift it above 1).

    What torchmetrics computes, and what fastdec passes it:

    - range: torchmetrics uses the pixel values as given, with a visual-noise variance sigma_n^2 = 2, which
      the published VIF states in 8-bit grey levels. fastdec passes ``x / data_range * 255`` (as piq and
      sewar do). Fed [0, 1] tensors, the same sigma_n^2 = 2 would be a noise of std 1.4 (140% of the pixel
      range) that drowns every real distortion: VIF then sees gain only (blur), not noise. Measured on 4
      BSDS val photos: Gaussian noise of std 0.05 scores 0.97-1.00 on [0, 1] tensors and 0.33-0.38 in 8-bit units.
      (Scores taken on [0, 1] tensors, like the 0.874 quoted for TAEF2 in issue 13, are therefore not
      comparable with these.)
    - colour: torchmetrics computes VIF on each channel separately and averages the channels; fastdec passes
      RGB, so this is the mean of the R, G and B VIFs (the paper's VIF is defined on grey images).
    - size: torchmetrics refuses images under 41 x 41 px; here that is ``MetricUnavailable``.
    - precision: float32, after subtracting the reference's per-channel mean from both images. VIF depends
      only on local variances and covariances, which a common offset leaves unchanged, and the offset removes
      most of float32's cancellation in E[x^2] - E[x]^2 at the 0-255 scale. Measured on 8 BSDS val photos
      decoded by TAEF2: within 1e-4 of float64 (which is ~20x slower on a CPU).
    """
    from torchmetrics.functional.image import visual_information_fidelity

    _check_pair(pred, target, data_range, "VIF")
    if min(pred.shape[-2:]) < VIF_MIN_SIZE:
        raise MetricUnavailable(f"VIF needs images of at least {VIF_MIN_SIZE} px per side (4 scales of valid "
                                f"Gaussian windows), got {tuple(pred.shape[-2:])}")
    offset = target.float().mean(dim=(2, 3), keepdim=True)
    scale = VIF_PIXEL_SCALE / data_range
    return visual_information_fidelity((pred.float() - offset) * scale, (target.float() - offset) * scale,
                                       sigma_n_sq=VIF_NOISE_VARIANCE, reduction="none").float()


def gradient_energy(images: torch.Tensor) -> torch.Tensor:
    """Sobel gradient energy per image, (N,): the sum over RGB channels and pixels of Gx^2 + Gy^2, with the
    3 x 3 Sobel filters at valid positions only (no padding, whose border would add edges of its own)."""
    if images.ndim != 4:
        raise EvalError(f"expected images shaped (N, C, H, W), got {tuple(images.shape)}")
    if min(images.shape[-2:]) < 3:
        raise EvalError(f"the Sobel filter needs images of at least 3 px per side, got {tuple(images.shape[-2:])}")
    smooth = torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64, device=images.device)
    diff = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64, device=images.device)
    sobel_x = torch.outer(smooth, diff)  # d/dx, smoothed across rows
    kernels = torch.stack([sobel_x, sobel_x.T])[:, None].repeat(images.shape[1], 1, 1, 1)
    grads = F.conv2d(images.double(), kernels, groups=images.shape[1])  # float64: a sum of ~1e6 squares
    return grads.pow(2).sum(dim=(1, 2, 3))


def gradient_energy_ratio(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sharpness beside fidelity: the decode's Sobel gradient energy over the reference's, per image, (N,).

        ratio = sum_c sum_px (Gx(D)^2 + Gy(D)^2) / sum_c sum_px (Gx(O)^2 + Gy(O)^2)

    (:func:`gradient_energy`; D the decode, O the reference). Blur removes high frequencies, so a blurrier
    decode scores below 1 (issue 13: a plain-L1 fine-tune of TAEF2 kept 72% of the original's gradient energy,
    TAEF2 itself 95%); 1 = as much edge energy as the reference; above 1 = edges the reference lacks (noise,
    ringing, invented texture). It is a check, not a fidelity score (the right amount of wrong texture also
    scores 1), so it sits beside PSNR and VIF. NaN where the reference has no gradient at all (a flat image).
    torchmetrics has no such metric; this is written here in torch.
    """
    _check_pair(pred, target, metric="the gradient-energy ratio")
    reference = gradient_energy(target)
    ratio = gradient_energy(pred) / reference.masked_fill(reference == 0, float("nan"))
    return ratio.float()


class LPIPS:
    """LPIPS distance per image, from torchmetrics' implementation with a LOCAL backbone.

    ``backbone_weights`` is a torchvision state dict of the backbone (``alex``: AlexNet, e.g.
    ``alexnet-owt-7be5be79.pth``; ``vgg``: VGG16 ``vgg16-397923af.pth``); the small LPIPS linear
    heads ship inside torchmetrics. Nothing is downloaded: a missing file or package raises
    ``MetricUnavailable`` with the fix.
    """

    def __init__(self, backbone_weights: str | os.PathLike, net: str = "alex", device: str | torch.device = "cpu"):
        path = Path(backbone_weights).expanduser()
        if not path.is_file():
            raise MetricUnavailable(
                f"LPIPS backbone weights '{path}' not found. Download torchvision's {net} ImageNet weights "
                "(alex: https://download.pytorch.org/models/alexnet-owt-7be5be79.pth, "
                "vgg: https://download.pytorch.org/models/vgg16-397923af.pth) on a connected machine and "
                "pass the file with --lpips-weights"
            )
        try:
            import torchvision  # noqa: F401  (torchmetrics builds the backbone from torchvision)
            from torchmetrics.functional.image.lpips import _LPIPS
        except ImportError as e:
            raise MetricUnavailable(
                f"LPIPS needs torchvision for its backbone ({e}): pip install torchvision (the build matching your torch)"
            ) from e
        model = _LPIPS(pretrained=True, net=net, pnet_rand=True)  # random backbone, replaced just below
        try:
            state = load_weights_only(path, MetricUnavailable, f"torchvision {net} weights file (LPIPS backbone)")
        except OSError as e:
            raise MetricUnavailable(f"cannot read LPIPS backbone weights '{path}': {e.strerror or e}") from e
        if not isinstance(state, dict):
            raise MetricUnavailable(f"'{path}' is not a torchvision {net} state dict (it holds a "
                                    f"{type(state).__name__})")
        features = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
        if not features:
            raise MetricUnavailable(f"'{path}' is not a torchvision {net} state dict (no 'features.*' entries)")
        # torchmetrics splits torchvision's `features` Sequential into slices that keep the indices
        loaded = {}
        for name, param in model.named_parameters():
            if not name.startswith("net."):
                continue
            key = ".".join(name.split(".")[2:])  # net.sliceK.<index>.<param> -> <index>.<param>
            if key not in features or features[key].shape != param.shape:
                raise MetricUnavailable(f"'{path}' does not match the LPIPS {net} backbone (features.{key})")
            loaded[name] = features[key]
        result = model.load_state_dict(loaded, strict=False)
        if result.unexpected_keys:
            raise MetricUnavailable(f"'{path}': unexpected LPIPS keys {result.unexpected_keys[:3]}")
        self.model = model.eval().to(device)
        self.device = device

    @torch.no_grad()
    def __call__(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_pair(pred, target, metric="LPIPS")
        out = self.model(pred.float().to(self.device) * 2 - 1, target.float().to(self.device) * 2 - 1)
        return out.flatten().cpu()


# ----------------------------------------------------------------------------- confidence intervals
@dataclass(frozen=True)
class MeanCI:
    """Mean of per-sample values with a two-sided confidence interval (Student t, ``n - 1`` dof)."""

    mean: float
    low: float
    high: float
    n: int
    confidence: float = 0.95

    def to_dict(self) -> dict[str, float | int]:
        return {"mean": self.mean, "ci_low": self.low, "ci_high": self.high, "n": self.n, "confidence": self.confidence}

    def __str__(self) -> str:
        half = (self.high - self.low) / 2
        return f"{self.mean:.4f} ± {half:.4f}" if math.isfinite(half) else f"{self.mean:.4f}"


def mean_ci(values: Any, confidence: float = 0.95) -> MeanCI:
    """Mean with a t-distribution confidence interval: mean ± t_{(1+c)/2, n-1} * s / sqrt(n).

    Non-finite values (PSNR of an exact reconstruction is +inf) are rejected: averaging them
    would print a meaningless number.
    """
    from scipy import stats

    if not is_number(confidence) or not 0 < confidence < 1:
        # 95 (a percentage) gave a NaN interval that printed as none at all
        raise EvalError(f"confidence must be a fraction between 0 and 1 (0.95 for 95%), got {confidence!r}")
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
    try:
        x = np.asarray(values, dtype=np.float64).ravel()
    except (TypeError, ValueError) as e:  # ["a"], a ragged list, a dict
        raise EvalError(f"mean_ci takes a sequence of numbers, got {type(values).__name__} ({e})") from e
    if x.size == 0:
        raise EvalError("no values to average")
    if not np.isfinite(x).all():
        raise EvalError(f"{int((~np.isfinite(x)).sum())} non-finite values (exact reconstructions give PSNR=inf)")
    mean = float(x.mean())
    if x.size == 1:
        return MeanCI(mean, float("nan"), float("nan"), 1, confidence)
    sem = float(x.std(ddof=1) / math.sqrt(x.size))
    half = float(stats.t.ppf((1 + confidence) / 2, df=x.size - 1)) * sem
    return MeanCI(mean, mean - half, mean + half, int(x.size), confidence)


def _score(value: Any) -> Any:
    """A 0-dim tensor or array (``psnr(a, b)[0]``) as its number; anything else as it is."""
    if isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim == 0 and value.dtype not in (torch.bool, np.bool_):
        return value.item()
    return value


def _measured(values: Any, what: str) -> list[float | None]:
    """``values`` as a list of numbers and Nones; anything else (None itself, a string, a dict of scores) is named."""
    given = type(values).__name__
    if isinstance(values, torch.Tensor) and values.ndim:
        values = values.detach().cpu().tolist()
    if values is None or isinstance(values, (str, bytes, dict)) or not isinstance(values, Iterable) or \
            getattr(values, "ndim", 1) == 0:
        raise InputTypeError(f"{what} takes a sequence of scores (numbers, None where not measured), got {given}")
    values = [_score(v) for v in values]
    bad = [v for v in values if v is not None and not is_number(v)]
    if bad:
        raise InputTypeError(f"{what} takes numbers (None where not measured), got {bad[0]!r}")
    return [None if v is None else float(v) for v in values]


def _refuse_undefined(values: Sequence[float]) -> None:
    # only +inf has a meaning (an exact match); NaN (a metric undefined on a flat image) and -inf were counted
    # as exact matches, so a broken score read as a perfect one
    bad = [v for v in values if math.isnan(v) or v == -math.inf]
    if bad:
        raise EvalError(f"{len(bad)} scores are NaN or -inf (the metric is undefined on those samples): leave them "
                        "out as None; only +inf (an exact reconstruction) is counted, as n_infinite")


def summarize(values: Iterable[float | None], confidence: float = 0.95) -> dict[str, Any] | None:
    """Mean and t-interval of the finite values (``None``: not measured, left out). Exact matches
    (PSNR = inf) are counted as ``n_infinite``, not averaged; only inf values give a mean of inf.
    NaN or -inf (no exact match, an undefined score) is an :class:`EvalError`."""
    measured = [v for v in _measured(values, "summarize") if v is not None]
    _refuse_undefined(measured)
    finite = [v for v in measured if math.isfinite(v)]
    if not finite:
        return {"mean": float("inf"), "n": len(measured), "n_infinite": len(measured)} if measured else None
    result = mean_ci(finite, confidence).to_dict()
    if len(finite) < len(measured):
        result["n_infinite"] = len(measured) - len(finite)
    return result


def paired_differences(values: Sequence[float | None], baseline: Sequence[float | None]) -> list[float | None]:
    """Per-sample ``value - baseline`` of two decoders scored on the same samples (in the same order).

    ``None`` where either side was not measured, so the pair is left out (never a one-sided mean);
    ``+inf`` where either side is non-finite (an exact reconstruction, PSNR = inf): ``inf - inf`` would be
    NaN and ``finite - inf`` a meaningless -inf, so such a pair is marked for :func:`summarize` to count as
    ``n_infinite`` rather than average.
    """
    values, baseline = _measured(values, "paired_differences"), _measured(baseline, "paired_differences")
    if len(values) != len(baseline):
        raise EvalError(f"paired differences need the same samples: {len(values)} values vs {len(baseline)} baseline")
    _refuse_undefined([v for v in (*values, *baseline) if v is not None])
    return [None if v is None or b is None else v - b if math.isfinite(v) and math.isfinite(b) else math.inf
            for v, b in zip(values, baseline)]


def summarize_paired(values: Sequence[float | None], baseline: Sequence[float | None],
                     confidence: float = 0.95) -> dict[str, Any] | None:
    """:func:`summarize` of the :func:`paired_differences`: the mean difference and its t-interval.

    The interval is over the per-sample differences, so the variation the two decoders share (some images
    are simply harder) cancels: much tighter than comparing two independent intervals. When every pair held
    an exact match there is no difference to average: the mean is NaN (``null`` in report.json), not inf.
    """
    result = summarize(paired_differences(values, baseline), confidence)
    if result is not None and not math.isfinite(result["mean"]):
        result["mean"] = float("nan")
    return result


# ----------------------------------------------------------------------------- temporal consistency
def flicker_score(decoded: torch.Tensor, original: torch.Tensor) -> float:
    """Temporal-consistency error of a decoded clip against the original, (T, 3, H, W) in [0, 1].

        flicker = mean_{t=1..T-1} mean_px | (D_{t+1} - D_t) - (O_{t+1} - O_t) |

    The decoded clip's frame-to-frame change minus the original's: 0 for a perfect reconstruction
    and for any error that is constant in time (a static bias), large when the error changes from
    frame to frame (flicker, boiling textures). In units of the [0, 1] pixel range; lower is better.
    """
    _check_clips(decoded, original, "flicker")
    return float(np.mean(frame_diff(decoded, original)))  # frames are equal-sized: the mean of the per-pair means


def _check_clips(decoded: torch.Tensor, original: torch.Tensor, metric: str) -> None:
    for clip in (decoded, original):  # frame differences are in units of the [0, 1] range
        check_pixel_range(clip, metric)
    if decoded.shape != original.shape or decoded.ndim != 4:
        raise EvalError(f"expected two clips shaped (T, 3, H, W), got {tuple(decoded.shape)} and {tuple(original.shape)}")
    if decoded.shape[0] < 2:
        raise EvalError(f"{metric} needs at least 2 frames")
    if 0 in decoded.shape[-2:]:  # the mean over no pixels was NaN
        raise EvalError(f"{metric}: frames shaped {tuple(decoded.shape[1:])} have no pixels")


def frame_diff(decoded: torch.Tensor, original: torch.Tensor) -> list[float]:
    """Per frame pair, the frame-difference error, (T - 1) values for t = 1..T-1:

        frame_diff_t = mean_px | (D_t - D_{t-1}) - (O_t - O_{t-1}) |

    The series :func:`flicker_score` averages (equal-sized frames: its mean *is* the flicker score), kept
    per pair so a plot shows where in the clip a decoder flickers.
    """
    _check_clips(decoded, original, "frame_diff")
    d, o = decoded.double(), original.double()
    return ((d[1:] - d[:-1]) - (o[1:] - o[:-1])).abs().mean(dim=(1, 2, 3)).tolist()


def frame_motion(clip: torch.Tensor) -> torch.Tensor:
    """mean_px |X_t - X_{t-1}| per frame pair, (T - 1,) in float64: how much the clip moves (or flickers)."""
    x = clip.double()
    return (x[1:] - x[:-1]).abs().mean(dim=(1, 2, 3))


def temporal_energy(decoded: torch.Tensor, original: torch.Tensor) -> float | None:
    """How much the decode moves relative to the original, warping-free:

        temporal_energy = sum_t mean_px |D_t - D_{t-1}| / sum_t mean_px |O_t - O_{t-1}|

    1 = as much frame-to-frame change as the original; > 1 added flicker or boiling; < 1 temporally smoothed.
    ``None`` when the original does not change at all (a static clip): the ratio is undefined there, and
    inf/NaN would poison the means; :func:`excess_motion` still measures such a clip.
    """
    _check_clips(decoded, original, "temporal_energy")
    return motion_metrics(decoded, original)[0]


def excess_motion(decoded: torch.Tensor, original: torch.Tensor) -> float:
    """The frame-to-frame change the decode adds, warping-free:

        excess_motion = mean_t max(0, mean_px |D_t - D_{t-1}| - mean_px |O_t - O_{t-1}|)

    0 when the decode never changes more than the original (a static clip decoded static), growing with
    injected flicker; unlike :func:`temporal_energy` it is defined on static clips, and smoothing in one
    pair cannot cancel flicker in another (the clamp is per pair). Pixels in [0, 1]; lower is better.
    """
    _check_clips(decoded, original, "excess_motion")
    return motion_metrics(decoded, original)[1]


def motion_metrics(decoded: torch.Tensor, original: torch.Tensor) -> tuple[float | None, float]:
    """(:func:`temporal_energy`, :func:`excess_motion`) from one :func:`frame_motion` of each clip: both
    need the same two motion series, and on a 32-frame clip each series is a second of CPU time."""
    _check_clips(decoded, original, "motion metrics")
    decoded_motion, original_motion = frame_motion(decoded), frame_motion(original)
    moved = float(original_motion.sum())
    energy = float(decoded_motion.sum()) / moved if moved > 0 else None
    return energy, float((decoded_motion - original_motion).clamp(min=0).mean())


# ----------------------------------------------------------------------------- tOF (optical flow)
# Rec. 709 luma weights, those of skimage.color.rgb2gray: the flow is estimated on one luminance channel
LUMA_WEIGHTS = (0.2125, 0.7154, 0.0721)


def optical_flow_ilk() -> Any:
    """scikit-image's ``optical_flow_ilk`` (iterative Lucas-Kanade), or ``MetricUnavailable`` naming the fix.

    fastdec estimates no flow itself: tOF uses this maintained implementation or is not computed.
    """
    try:
        from skimage.registration import optical_flow_ilk as ilk
    except ImportError as e:
        raise MetricUnavailable(
            f"tOF (--tof) needs scikit-image's optical flow (skimage.registration.optical_flow_ilk), which "
            f'could not be imported ({e}): pip install "fastdec[metrics]"') from e
    return ilk


def clip_flows(clip: torch.Tensor) -> np.ndarray:
    """Optical flow of each frame pair of a clip (T, 3, H, W) in [0, 1]: (T - 1, 2, H, W) float32, in pixels,
    ``optical_flow_ilk(luma[t - 1], luma[t])`` with scikit-image's defaults on the float luminance."""
    if clip.ndim != 4 or clip.shape[1] != 3 or clip.shape[0] < 2:
        raise EvalError(f"tOF needs an RGB clip of at least 2 frames (T, 3, H, W), got {tuple(clip.shape)}")
    ilk = optical_flow_ilk()
    weights = torch.tensor(LUMA_WEIGHTS, dtype=torch.float64, device=clip.device).view(1, 3, 1, 1)
    luma = (clip.double() * weights).sum(dim=1).float().cpu().numpy()
    return np.stack([ilk(luma[t - 1], luma[t]) for t in range(1, luma.shape[0])])


def tof(decoded_flows: np.ndarray, original_flows: np.ndarray) -> float:
    """TecoGAN's tOF from precomputed :func:`clip_flows` (the original's are computed once per clip and
    shared by every decoder):

        tOF = mean_t mean_px || flow(D_{t-1}, D_t) - flow(O_{t-1}, O_t) ||_2

    The end-point distance between the decode's motion field and the original's, in pixels of flow:
    0 when the decode moves exactly like the original; lower is better.
    """
    if decoded_flows.shape != original_flows.shape:
        raise EvalError(f"tOF needs flows of the same clip size, got {decoded_flows.shape} and "
                        f"{original_flows.shape}")
    diff = decoded_flows.astype(np.float64) - original_flows.astype(np.float64)
    return float(np.sqrt((diff ** 2).sum(axis=1)).mean())


# ----------------------------------------------------------------------------- Fréchet statistics
class FrechetStats:
    """Streamed first and second moments of feature vectors, in float64.

    Keeps ``count``, ``mean`` and ``m2 = sum_i (x_i - mean)(x_i - mean)^T`` and merges batches with
    Chan et al.'s parallel update, so the covariance is centred exactly (never E[xx^T] alone) and
    memory is O(D^2) whatever the number of samples. Statistics from shards (processes, files)
    combine with ``merge``; ``covariance`` is the unbiased estimate, identical to ``np.cov``.
    """

    def __init__(self, dim: int | None = None):
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or dim < 1):
            raise EvalError(f"FrechetStats' dim is the feature count, a whole number >= 1 (or None), got {dim!r}")
        self.count = 0
        self.mean: np.ndarray | None = None if dim is None else np.zeros(dim)
        self.m2: np.ndarray | None = None if dim is None else np.zeros((dim, dim))

    @property
    def dim(self) -> int | None:
        return None if self.mean is None else int(self.mean.shape[0])

    def _combine(self, count: int, mean: np.ndarray, m2: np.ndarray) -> None:
        if count == 0:
            return
        if self.mean is None or self.count == 0:
            if self.dim is not None and self.dim != mean.shape[0]:
                raise EvalError(f"feature dimension {mean.shape[0]} does not match the statistics' {self.dim}")
            self.count, self.mean, self.m2 = count, mean.copy(), m2.copy()
            return
        if mean.shape[0] != self.dim:
            raise EvalError(f"feature dimension {mean.shape[0]} does not match the statistics' {self.dim}")
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + m2 + np.outer(delta, delta) * (self.count * count / total)
        self.count = total

    def update(self, features: torch.Tensor | np.ndarray) -> "FrechetStats":
        """Add a batch of features (N, D)."""
        try:
            x = features.detach().cpu().double().numpy() if isinstance(features, torch.Tensor) \
                else np.asarray(features, np.float64)
        except (TypeError, ValueError) as e:  # "abc", ragged lists
            raise EvalError(f"features must be an (N, D) array of numbers, got {type(features).__name__} ({e})") from e
        if x.ndim != 2:
            raise EvalError(f"features must be (N, D), got shape {x.shape}")
        if not np.isfinite(x).all():
            raise EvalError("features contain NaN or inf: check the extractor's input range and weights")
        if x.shape[0]:
            batch_mean = x.mean(axis=0)
            centred = x - batch_mean
            self._combine(x.shape[0], batch_mean, centred.T @ centred)
        return self

    def merge(self, other: "FrechetStats") -> "FrechetStats":
        """Fold another shard's statistics into these (in place); returns self."""
        _check_stats(other, "merge")
        if other.count:
            self._combine(other.count, other.mean, other.m2)
        return self

    @property
    def covariance(self) -> np.ndarray:
        if self.count < 2:
            raise EvalError(f"a covariance needs at least 2 samples, have {self.count}")
        return self.m2 / (self.count - 1)

    def frechet_distance(self, other: "FrechetStats", eps: float = 1e-6) -> float:
        _check_stats(other, "frechet_distance")
        return frechet_distance(self.mean, self.covariance, other.mean, other.covariance, eps=eps)

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "FrechetStats":
        mean = state.get("mean")
        stats = cls(len(mean)) if mean is not None and len(mean) else cls()  # FrechetStats(3) comes back with dim 3
        if state["count"]:
            stats._combine(int(state["count"]), np.asarray(state["mean"], np.float64), np.asarray(state["m2"], np.float64))
        return stats

    def save(self, path: str | os.PathLike) -> Path:
        state = self.state_dict()
        if self.mean is None:  # no samples yet: empty arrays, not None (an object array load refuses to unpickle)
            state = {"count": 0, "mean": np.zeros(0), "m2": np.zeros((0, 0))}
        return atomic_write(path, lambda tmp: np.savez(tmp, count=state["count"], mean=state["mean"], m2=state["m2"]), suffix=".npz")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FrechetStats":
        """Statistics written by :meth:`save`; a missing, damaged or foreign file is an error naming it."""
        path = as_path(path, "FrechetStats.load's path")
        try:
            with np.load(path) as f:  # allow_pickle stays False: an .npz of plain arrays only
                state = {"count": f["count"], "mean": f["mean"], "m2": f["m2"]}
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
            raise EvalError(f"cannot read Frechet statistics from '{path}' ({e}): it should be an .npz that "
                            "FrechetStats.save wrote (count, mean, m2); write it again") from e
        count, mean, m2 = state["count"], state["mean"], state["m2"]
        if count.shape != () or not np.issubdtype(count.dtype, np.integer) or count < 0 \
                or mean.ndim != 1 or m2.shape != (mean.size, mean.size) \
                or not (np.issubdtype(mean.dtype, np.floating) and np.isfinite(mean).all() and np.isfinite(m2).all()):
            raise EvalError(f"'{path}' holds no Frechet statistics: count {count.shape} {count.dtype}, mean "
                            f"{mean.shape} {mean.dtype}, m2 {m2.shape} (expected a count, a finite (D,) mean and "
                            "(D, D) m2)")
        return cls.from_state_dict({"count": int(count), "mean": mean, "m2": m2})

    def gather(self, accelerator: Any) -> "FrechetStats":
        """Merge the statistics of every process of an ``accelerate.Accelerator`` (all get the total)."""
        from accelerate.utils import gather_object

        shards = gather_object([self.state_dict()])
        total = FrechetStats()
        for shard in shards:
            total.merge(FrechetStats.from_state_dict(shard))
        return total


def _check_stats(other: Any, doing: str) -> None:
    if not isinstance(other, FrechetStats):  # an AttributeError on .count before
        raise EvalError(f"FrechetStats.{doing} takes another FrechetStats, got {type(other).__name__}")


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}), with scipy.linalg.sqrtm.

    As in the reference FID code: when the product is singular (fewer samples than dimensions)
    ``eps`` is added to both diagonals; a small imaginary part from numerical error is dropped, a
    large one is an error.
    """
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise EvalError(f"statistics differ in dimension: {mu1.shape} vs {mu2.shape}")
    if mu1.ndim != 1 or sigma1.shape != (mu1.size, mu1.size):  # a mean of 5 features beside a 4x4 covariance
        raise EvalError(f"a mean of shape {mu1.shape} needs a ({mu1.size}, {mu1.size}) covariance, got {sigma1.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise EvalError(
                f"matrix square root has a large imaginary component ({np.abs(covmean.imag).max():.3g}): "
                "the covariances are too ill-conditioned; use more samples"
            )
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


# ----------------------------------------------------------------------------- feature extractors
@runtime_checkable
class FeatureExtractor(Protocol):
    """Clips (N, T, 3, H, W) in [0, 1] -> features (N, D). Images are clips with T = 1."""

    name: str
    num_frames: int | None  # frames per clip the extractor was trained with (None: any)

    def __call__(self, clips: torch.Tensor) -> torch.Tensor: ...


_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class VideoMAEExtractor:
    """VideoMAE (V2) features: the mean over tokens of the last hidden state (the encoder output the
    classification head would pool), from a transformers ``VideoMAEModel``.

    ``path`` is a LOCAL folder holding ``config.json`` and the weights (``model.safetensors`` or
    ``pytorch_model.bin``) as written by ``VideoMAEModel.save_pretrained``. For FVD with VideoMAE V2
    ViT-g convert the released checkpoint to that layout once; clips are resized to the model's
    ``image_size`` (224) and must have ``num_frames`` frames (16, or 8 for the 8-frame variant).
    """

    name = "videomae"

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        folder = Path(path).expanduser()
        if not folder.exists():
            raise EvalError(
                f"VideoMAE checkpoint '{folder}' not found: pass a local folder with config.json and "
                "model.safetensors (VideoMAEModel.save_pretrained layout); nothing is downloaded"
            )
        if not folder.is_dir() or not (folder / "config.json").is_file():
            raise EvalError(
                f"'{folder}' is not a VideoMAE checkpoint folder: expected a directory with config.json and "
                "model.safetensors / pytorch_model.bin (from VideoMAEModel.save_pretrained)"
            )
        config = read_json_object(folder / "config.json", EvalError, "VideoMAE config")
        if config.get("model_type") != "videomae":
            raise EvalError(f"'{folder}/config.json' has model_type={config.get('model_type')!r}, expected 'videomae'")
        VideoMAEModel = import_optional("transformers", "metrics", "FVD (its VideoMAE features)").VideoMAEModel
        try:
            self.model = VideoMAEModel.from_pretrained(str(folder), local_files_only=True, torch_dtype=dtype)
        except Exception as e:
            # transformers loads a pytorch_model.bin weights-only: one holding more than tensors is refused (5.x
            # raises torch's UnpicklingError, whose text advises weights_only=False; 4.x wraps it in an OSError)
            causes = list(_causes(e))
            refusal = next((c for c in causes if asks_for_code(c)), None)
            if refusal is not None:
                raise EvalError(refusal_message(folder, refusal, "VideoMAE checkpoint")) from e
            if any(isinstance(c, pickle.UnpicklingError) for c in causes):  # torch's text: weights_only=False
                raise EvalError(f"the weights in '{folder}' cannot be read: truncated, corrupt or in another format "
                                "(a git-lfs pointer?); save the model again with save_pretrained") from e
            # anything else (a truncated or git-lfs model.safetensors is a SafetensorError; an empty .bin an
            # EOFError) is named too: the CLI shows fastdec's errors as one line, others as a traceback
            raise EvalError(f"cannot load VideoMAE weights from '{folder}' ({type(e).__name__}: {e}): save the "
                            "model again with save_pretrained (a git-lfs pointer needs `git lfs pull`)") from e
        self.model = self.model.eval().to(device)
        self.num_frames = int(self.model.config.num_frames)
        self.image_size = int(self.model.config.image_size)
        self.device, self.dtype = device, dtype

    @torch.no_grad()
    def __call__(self, clips: torch.Tensor) -> torch.Tensor:
        if clips.ndim != 5 or clips.shape[2] != 3:
            raise EvalError(f"clips must be (N, T, 3, H, W), got {tuple(clips.shape)}")
        if clips.shape[1] != self.num_frames:
            raise EvalError(f"this VideoMAE takes {self.num_frames}-frame clips, got {clips.shape[1]}")
        n, t = clips.shape[:2]
        frames = F.interpolate(clips.flatten(0, 1).float(), size=(self.image_size, self.image_size),
                               mode="bilinear", antialias=True, align_corners=False)
        mean = torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1)
        pixels = ((frames - mean) / std).view(n, t, 3, self.image_size, self.image_size)
        hidden = self.model(pixel_values=pixels.to(self.device, self.dtype)).last_hidden_state
        return hidden.float().mean(dim=1).cpu()


def _causes(error: BaseException) -> Iterable[BaseException]:
    """``error`` and the exceptions it was raised from or during, innermost last."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


class TorchScriptExtractor:
    """Features from a local TorchScript detector in the StyleGAN(-V) convention.

    ``kind="i3d"``: ``i3d_torchscript.pt`` (Kinetics-400 I3D, the original FVD network), called on
    (N, 3, T, H, W) in [0, 255] with ``rescale=True, resize=True, return_features=True`` (400-d).
    ``kind="inception"``: ``inception-2015-12-05.pt`` (the FID network), called on uint8
    (N, 3, H, W) with ``return_features=True`` (2048-d); clips are flattened to frames.

    A TorchScript file is a program, not only weights: its code runs when it is called (it can read and write
    files). The reference networks exist only in this form, so pass only the files from their releases (or
    ones you made), never one from an unknown source.
    """

    def __init__(self, path: str | os.PathLike, kind: str = "i3d", device: str | torch.device = "cpu"):
        if kind not in ("i3d", "inception"):
            raise EvalError(f"kind must be 'i3d' or 'inception', got {kind!r}")
        file = Path(path).expanduser()
        if not file.is_file():
            raise EvalError(f"{kind} TorchScript file '{file}' not found: pass the local .pt file")
        try:
            with warnings.catch_warnings():
                # the reference I3D/Inception detectors only exist as TorchScript; the deprecation is not actionable
                warnings.simplefilter("ignore", DeprecationWarning)
                self.model = torch.jit.load(str(file), map_location=device).eval()
        except RuntimeError as e:
            raise EvalError(f"'{file}' is not a TorchScript module ({e}); {kind} needs the TorchScript export") from e
        self.name, self.kind, self.device = kind, kind, device
        self.num_frames = None

    @torch.no_grad()
    def __call__(self, clips: torch.Tensor) -> torch.Tensor:
        if clips.ndim != 5:
            raise EvalError(f"clips must be (N, T, 3, H, W), got {tuple(clips.shape)}")
        if self.kind == "i3d":
            if clips.shape[1] < 9:
                raise EvalError(f"I3D needs clips of at least 9 frames, got {clips.shape[1]}")
            x = (clips.float().permute(0, 2, 1, 3, 4) * 255).contiguous().to(self.device)
            return self.model(x, rescale=True, resize=True, return_features=True).float().cpu()
        frames = (clips.flatten(0, 1).clamp(0, 1) * 255).round().to(torch.uint8).to(self.device)
        feats = self.model(frames, return_features=True).float().cpu()
        return feats.view(clips.shape[0], clips.shape[1], -1).mean(dim=1)


def load_feature_extractor(spec: str, device: str | torch.device = "cpu") -> FeatureExtractor:
    """``videomae:FOLDER``, ``i3d:FILE.pt`` or ``inception:FILE.pt`` (a bare folder means VideoMAE)."""
    kind, sep, path = spec.partition(":")
    if not sep:
        kind, path = "videomae", spec
    if kind == "videomae":
        return VideoMAEExtractor(path, device=device)
    if kind in ("i3d", "inception"):
        return TorchScriptExtractor(path, kind=kind, device=device)
    raise EvalError(f"unknown feature extractor {kind!r} in {spec!r}: use videomae:DIR, i3d:FILE.pt or inception:FILE.pt")
