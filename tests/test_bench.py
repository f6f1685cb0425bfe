"""`fastdec bench` and its measuring harness (tiny sizes: the whole file runs in a few minutes)."""
from __future__ import annotations

import json
import math
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import fastdec.resolve
from fastdec.bench import (
    SDXL_VAE_CONFIG, BenchConfig, RowSpec, count_flops, count_parameters, peak_memory, plot_speedup,
    prepare_row, render_table, run_bench, time_callable, write_json,
)
from fastdec.cli import main
from fastdec.errors import BenchError
from fastdec.io.checkpoints import save_decoder

ROW_FIELDS = {"name", "kind", "backend", "size", "median_s", "speedup", "peak_mem_mb", "params", "gflops"}
TINY = ["--sizes", "64", "--repeats", "1", "--warmup", "0"]


# ----------------------------------------------------------------------------- builders for the memory probe
def allocating_builder(megabytes: int):
    """Probe builder: one call holds a ``megabytes`` MiB tensor (written, so its pages are resident)."""
    def call():
        return torch.ones(megabytes * 2**20 // 4).sum()

    return call, lambda: torch.ones(16).sum()


@pytest.fixture
def tiny_checkpoint(tmp_path, make_decoder) -> tuple[Path, nn.Module]:
    decoder = make_decoder("tae-64", "sdxl")
    return save_decoder(decoder, tmp_path / "tiny-tae.safetensors"), decoder


@pytest.fixture
def count_resolves(monkeypatch) -> list[str]:
    """Every ``resolve_decoder`` call of this process, by spec (the bench's one construction path)."""
    calls: list[str] = []
    resolve = fastdec.resolve.resolve_decoder

    def counting(spec, *args, **kwargs):
        calls.append(str(spec))
        return resolve(spec, *args, **kwargs)

    monkeypatch.setattr(fastdec.resolve, "resolve_decoder", counting)
    return calls


# ----------------------------------------------------------------------------- harness
def test_conv_flops_equal_analytic_count():
    n, c_in, c_out, k, h, w = 2, 8, 16, 3, 10, 12
    conv = nn.Conv2d(c_in, c_out, k, padding=1)
    x = torch.randn(n, c_in, h, w)
    assert count_flops(lambda: conv(x)) == 2 * n * c_out * c_in * k * k * h * w
    strided = nn.Conv2d(c_in, c_out, k, stride=2, padding=1)  # output 5 x 6
    assert count_flops(lambda: strided(x)) == 2 * n * c_out * c_in * k * k * 5 * 6


def test_time_callable_excludes_warmup_and_takes_the_median():
    # a fake clock that each call advances by its own duration: exact numbers, no sleeping
    now = [0.0]
    durations = iter([0.5, 0.01, 0.05, 0.03])  # the first (0.5 s) is the warm-up

    def fn():
        now[0] += next(durations)

    stats = time_callable(fn, warmup=1, repeats=3, clock=lambda: now[0])
    assert stats.n == 3
    assert stats.runs == pytest.approx([0.01, 0.05, 0.03])  # the warm-up run is not among them
    assert stats.median_s == pytest.approx(0.03)
    assert stats.p10_s == pytest.approx(0.014) and stats.p90_s == pytest.approx(0.046)
    with pytest.raises(ValueError, match="repeats"):
        time_callable(fn, warmup=0, repeats=0)


def test_count_parameters_counts_shared_weights_once():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    assert count_parameters(model) == 20
    assert count_parameters([model, shared]) == 20


def test_peak_memory_isolated_process_sees_the_allocation():
    builder = f"{__name__}:allocating_builder"
    big = peak_memory(builder, {"megabytes": 64}, threads=1)
    small = peak_memory(builder, {"megabytes": 1}, threads=1)
    assert big.error is None and small.error is None, (big.error, small.error)
    # the two calls differ by 63 MiB of written memory; allocator and page-cache effects are far smaller
    assert big.peak_mb - small.peak_mb > 32, (big, small)
    assert "isolated process" in big.method
    failed = peak_memory(f"{__name__}:no_such_builder", {}, threads=1)
    assert failed.peak_mb is None and "AttributeError" in failed.error


PINNED: list[torch.Tensor] = []


def heap_reusing_builder(blocks: int = 200):
    """A call whose freed memory glibc keeps: a probe after a full-size warm-up call would read ~0 for it."""
    def call():
        chunks = [torch.ones(2**17) for _ in range(blocks)]  # blocks x 512 KB, all alive at once
        PINNED.append(torch.ones(64))  # outlives the call, above the chunks: glibc cannot trim them from the top
        return sum(float(c[0]) for c in chunks)

    def tiny():  # frees one 512 KB block, after which glibc serves blocks this size from its heap, not mmap
        return float(torch.ones(2**17)[0])

    return call, tiny


@pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc behaviour")
def test_peak_memory_after_a_full_size_warm_up_sees_the_whole_call():
    """With ``warm_calls`` (compiled rows), the warm-up's freed pages are handed back before the measured call:
    without that, this 100 MB call read 0.5 MB (and a compiled 8-frame decode anything from 0 to 56 MB)."""
    stats = peak_memory(f"{__name__}:heap_reusing_builder", {"blocks": 200}, threads=1, warm_calls=1)
    assert stats.error is None, stats.error
    assert 90 < stats.peak_mb < 130, stats  # 200 x 0.5 MB written, plus the interpreter's own small change


def full_size_warm_up_builder(blocks: int = 200):
    """A row whose "tiny" warm-up is the call itself, as at 64 px, where the 8x8 warm-up latents are full size."""
    call, _ = heap_reusing_builder(blocks)
    return call, call


@pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc behaviour")
def test_peak_memory_after_a_warm_up_of_full_size_sees_the_whole_call():
    """The heap went back to the OS only with ``warm_calls``: SDXL's VAE at 64 px read 2 MB for a decode whose
    convs hold 8 MB each (one such warm-up, no warm_calls)."""
    stats = peak_memory(f"{__name__}:full_size_warm_up_builder", {"blocks": 200}, threads=1)
    assert stats.error is None, stats.error
    assert 90 < stats.peak_mb < 130, stats
    assert "freed heap returned to the OS first" in stats.method


def test_write_json_is_strict_and_atomic(tmp_path):
    path = write_json(tmp_path / "sub" / "out.json", {"a": float("nan"), "b": [1.5, float("inf")], "c": 2})
    assert json.loads(path.read_text()) == {"a": None, "b": [1.5, None], "c": 2}
    assert [p.name for p in path.parent.iterdir()] == ["out.json"]  # no temp file left behind


def test_render_table_shows_present_columns():
    from rich.console import Console

    rows = [{"name": "a", "median_s": 0.5, "speedup": 2.0, "my_metric": 3}]
    console = Console(width=200, record=True)
    console.print(render_table(rows, "title", columns=["name", "median_s", "speedup", "my_metric"]))
    text = console.export_text()
    assert "500" in text and "2.0x" in text and "my_metric" in text


# ----------------------------------------------------------------------------- baselines
def _spec(**overrides) -> RowSpec:
    fields = dict(name="sdxl-vae", kind="baseline", backend="eager", size=64, batch=1, frames=1, latent_space="sdxl",
                  dtype="fp32", device="cpu", channels_last=False, seed=0, baseline="sdxl")
    return RowSpec(**{**fields, **overrides})


def test_sdxl_baseline_is_the_real_config_and_fp16_follows_force_upcast():
    from diffusers import AutoencoderKL

    prepared = prepare_row(_spec())
    vae = AutoencoderKL(**SDXL_VAE_CONFIG)
    assert count_parameters(prepared.modules) == count_parameters([vae.decoder, vae.post_quant_conv])
    assert prepared.latent_shape == (1, 4, 8, 8)
    # an SDXL pipeline in fp16 decodes with the VAE upcast to fp32 (force_upcast=True): the row must too
    assert prepare_row(_spec(dtype="fp16")).run_dtype == "fp32"
    assert prepare_row(_spec(dtype="fp16", upcast=False)).run_dtype == "fp16"


def test_svd_baseline_decodes_frames_as_one_clip():
    prepared = prepare_row(_spec(name="svd-vae", baseline="svd", frames=2))
    assert prepared.images == 2 and prepared.latent_shape == (2, 4, 8, 8)
    with torch.inference_mode():
        out = prepared.fn()
    assert out.shape == (2, 3, 64, 64) and 0 <= out.min() and out.max() <= 1


def test_channels_last_flag_works_for_the_svd_baseline():
    """SVD's decoder has 5-D Conv3d weights: channels_last must convert its 2-D convs only, not crash."""
    prepared = prepare_row(_spec(name="svd-vae", baseline="svd", frames=2, channels_last=True))
    convs = [m for m in prepared.modules[0].modules() if isinstance(m, nn.modules.conv._ConvNd)]
    assert any(c.weight.ndim == 5 for c in convs)
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs if c.weight.ndim == 4)
    reference = prepare_row(_spec(name="svd-vae", baseline="svd", frames=2))
    with torch.inference_mode():
        # same weights (same seed), another memory layout: fp32 kernels sum in another order, ~1e-6 per layer
        assert (prepared.fn() - reference.fn()).abs().max() < 1e-4


# ----------------------------------------------------------------------------- one construction path
def test_a_bench_row_builds_its_decoder_once(tiny_checkpoint, count_resolves, monkeypatch):
    """Params, FLOPs, timing and every backend row derive from one build in this process."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)  # inductor's compile time is not the point
    path, decoder = tiny_checkpoint
    payload = run_bench(BenchConfig(sizes=[32], decoders=[str(path)], baselines=["none"], repeats=1, warmup=0,
                                    backends=["eager", "channels_last", "compile"], memory=False))
    assert count_resolves == [str(path)]
    rows = {r["backend"]: r for r in payload["rows"]}
    assert set(rows) == {"eager", "channels_last", "compile"}
    for row in rows.values():
        assert row["name"] == "tiny-tae" and row["kind"] == "checkpoint"
        assert row["params"] == count_parameters(decoder)
        assert row["gflops"] == rows["eager"]["gflops"] > 0  # backend rows reuse the eager count


def test_checkpoint_rows_resolve_again_in_the_memory_probe(tiny_checkpoint, count_resolves):
    path, decoder = tiny_checkpoint
    payload = run_bench(BenchConfig(sizes=[32], decoders=[str(path), "tae-64"], baselines=["none"], repeats=1,
                                    warmup=0))
    assert count_resolves == [str(path), "tae-64"]  # the probe's builds happen in its own process
    rows = {r["name"]: r for r in payload["rows"]}
    assert rows["tiny-tae"]["kind"] == "checkpoint" and rows["tae-64"]["kind"] == "preset"
    for row in rows.values():
        assert row["peak_mem_mb"] is not None and row["peak_mem_mb"] >= 0, row.get("peak_mem_error")
    assert rows["tae-64"]["params"] > 10 * rows["tiny-tae"]["params"]


# ----------------------------------------------------------------------------- the command
def test_bench_end_to_end_json_fields_speedup_and_plot(tmp_path, capsys):
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    rc = main(["bench", *TINY, "--decoders", "tae-64", "tae-192", "--baselines", "sdxl", "tiny",
               "--json", str(out_json), "--plot", str(out_png)])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "speed-up" in stdout and "tae-192" in stdout and "torch" in stdout

    payload = json.loads(out_json.read_text())
    for key in ("cpu", "torch_threads", "torch", "device", "dtype"):
        assert key in payload["system"]
    if hasattr(__import__("os"), "getloadavg"):  # a busy machine must be visible in the results
        assert payload["system"]["load_avg_1m_start"] >= 0 and payload["system"]["load_avg_1m"] >= 0
    rows = {r["name"]: r for r in payload["rows"]}
    assert list(rows) == ["sdxl-vae", "autoencoder-tiny", "tae-64", "tae-192"]
    assert payload["reference"] == "sdxl-vae"
    for row in rows.values():
        assert ROW_FIELDS <= set(row), ROW_FIELDS - set(row)
        assert row["size"] == 64 and row["median_s"] > 0 and row["gflops"] > 0
        assert row["peak_mem_mb"] is not None and row["peak_mem_mb"] >= 0, row.get("peak_mem_error")
        assert math.isclose(row["speedup"], rows["sdxl-vae"]["median_s"] / row["median_s"], rel_tol=1e-9)
    assert rows["sdxl-vae"]["speedup"] == 1.0
    from fastdec import create_decoder

    assert rows["tae-64"]["params"] == count_parameters(create_decoder("tae-64", "sdxl"))
    # TAE-64 is TAESD's layout: the same parameters and FLOPs as diffusers' AutoencoderTiny decoder
    assert rows["tae-64"]["params"] == rows["autoencoder-tiny"]["params"]
    assert math.isclose(rows["tae-64"]["gflops"], rows["autoencoder-tiny"]["gflops"], rel_tol=1e-6)
    assert rows["sdxl-vae"]["gflops"] > 10 * rows["tae-64"]["gflops"]

    from PIL import Image

    with Image.open(out_png) as image:
        image.verify()
        assert image.format == "PNG" and image.size[0] > 400


def test_console_script_in_a_subprocess(tmp_path):
    script = Path(sys.executable).with_name("fastdec")
    if not script.exists():
        pytest.skip("the fastdec console script is not installed next to this interpreter")
    out_json = tmp_path / "b.json"
    done = subprocess.run([str(script), "bench", *TINY, "--decoders", "tae-64", "--baselines", "sdxl", "--no-memory",
                           "--json", str(out_json)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "tae-64" in done.stdout and "sdxl-vae" in done.stdout
    rows = json.loads(out_json.read_text())["rows"]
    assert [r["name"] for r in rows] == ["sdxl-vae", "tae-64"] and rows[1]["speedup"] > 0


@pytest.mark.parametrize("argv, message", [
    (["--decoders", "tae-65"], "'tae-65' is not a decoder file, folder, pretrained name or Hub id"),
    (["--decoders", "tae-causal-64"], "is a video decoder: benchmark it with `fastdec bench --video"),
    (["--sizes", "100"], "multiple of 8"),
    (["--latent-space", "sdxxl"], "unknown latent space 'sdxxl'"),
    (["--decoders", "missing.safetensors"], "decoder file 'missing.safetensors' not found"),
    (["--video", "--pipeline"], "choose one of --video and --pipeline"),
    (["--video", "--decoders", "tae-64"], "'tae-64' is an image decoder"),
    (["--pipeline", "--dtype", "fp32", "bf16"], "one dtype at a time"),
])
def test_bad_requests_give_clear_errors(argv, message, capsys):
    no_memory = [] if "--pipeline" in argv else ["--no-memory"]  # the pipeline bench measures no memory
    assert main(["bench", "--repeats", "1", *no_memory, *argv]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and "Traceback" not in captured.err
    assert captured.err.startswith("fastdec bench: error: ")


@pytest.mark.parametrize("mode, flag", [([], "--json"), ([], "--plot"), (["--video"], "--json"),
                                        (["--pipeline"], "--json")])
def test_unwritable_output_fails_before_the_benchmark_runs(mode, flag, tmp_path, monkeypatch, capsys):
    import fastdec.bench.images
    import fastdec.bench.pipeline
    import fastdec.bench.video

    def must_not_run(*args, **kwargs):
        raise AssertionError("the benchmark ran although its output cannot be written")

    for module, name in ((fastdec.bench.images, "run_bench"), (fastdec.bench.video, "run_video_bench"),
                         (fastdec.bench.pipeline, "run_pipeline_bench")):
        monkeypatch.setattr(module, name, must_not_run)
    assert main(["bench", *mode, flag, str(tmp_path)]) == 2  # a folder where the file should go
    assert f"{flag} '{tmp_path}' is a folder" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    # each was silently ignored: --pipeline timed eager rows whatever --backends said, --video drew no plot
    (["--pipeline", "--backends", "compile"],
     "--pipeline does not read --backends (only the image bench and --video)"),
    (["--pipeline", "--batch", "4", "--no-memory"], "--pipeline does not read --batch (only the image bench), --no-memory (only the image bench and --video)"),
    (["--video", "--plot", "p.png"], "--video does not read --plot (only the image bench)"),
    (["--push-frames", "8"], "the image bench (no --video or --pipeline) does not read --push-frames (only --video)"),
    (["--steps", "5"], "does not read --steps (only --pipeline)"),
    (["--video", "--no-upcast"], "--video does not read --no-upcast"),
    # it changes only fp16 rows of a force_upcast VAE: with neither the run was the one without it
    (["--no-upcast"], "--no-upcast runs the fp16 rows of force_upcast VAEs (sdxl, svd) in fp16, and --dtype has no fp16"),
    (["--no-upcast", "--dtype", "fp16", "--baselines", "tiny"], "and --baselines tiny times none"),
    # 'none sdxl' benchmarked sdxl
    (["--baselines", "none", "sdxl"], "--baselines none means no baselines, but sdxl was given too"),
    (["--video", "--baselines", "svd", "none"], "--baselines none means no baselines, but svd was given too"),
    # a plot of speed-ups with no speed-up reference failed after the whole run
    (["--baselines", "none", "--plot", "p.png"], "--plot draws each row's speed-up over a baseline (sdxl, svd)"),
    (["--baselines", "tiny", "--plot", "p.png"], "--baselines tiny has none"),
    # SVD's settings with no SVD row: the image rows reported frames 1 while the settings said 4
    (["--frames", "4", "--baselines", "none"], "--frames set how the SVD baseline is timed, and --baselines none"),
    (["--video", "--svd-chunk", "4", "--baselines", "none"], "--svd-chunk set how the SVD baseline is timed"),
])
def test_options_a_mode_does_not_read_are_refused_before_it_runs(argv, message, monkeypatch, capsys):
    import fastdec.bench.images
    import fastdec.bench.pipeline
    import fastdec.bench.video

    def must_not_run(*args, **kwargs):
        raise AssertionError("the benchmark ran although an option was refused")

    for module, name in ((fastdec.bench.images, "run_bench"), (fastdec.bench.video, "run_video_bench"),
                         (fastdec.bench.pipeline, "run_pipeline_bench")):
        monkeypatch.setattr(module, name, must_not_run)
    assert main(["bench", *argv]) == 2
    assert message in capsys.readouterr().err


def test_an_option_left_at_its_default_counts_as_not_given(monkeypatch, capsys):
    import fastdec.bench.pipeline

    ran = []
    monkeypatch.setattr(fastdec.bench.pipeline, "run_pipeline_bench",
                        lambda cfg, console: ran.append(cfg) or {"wall_s": 0.0})
    monkeypatch.setattr(fastdec.bench.pipeline, "print_pipeline_report", lambda *args: None)
    # the image and video benches' own defaults spelled out are not requests the pipeline bench ignores
    assert main(["bench", "--pipeline", "--batch", "1", "--push-frames", "1"]) == 0, capsys.readouterr().err
    assert len(ran) == 1


def test_missing_onnx_runtime_skips_its_rows(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if onnxruntime were not installed
    payload = run_bench(BenchConfig(sizes=[64], decoders=["tae-64"], baselines=["none"], backends=["eager", "onnx"],
                                    repeats=1, warmup=0, memory=False))
    assert [(r["name"], r["backend"]) for r in payload["rows"]] == [("tae-64", "eager")]
    assert payload["rows"][0]["speedup"] is None  # no baseline in the run: no speed-up, not a made-up one
    (skip,) = payload["skipped"]
    assert skip["backend"] == "onnx" and "onnxruntime" in skip["reason"]
    assert skip["reason"].endswith('pip install "fastdec[onnx]"')  # the extra that has it
    # only that backend asked for: nothing can be timed, an error (it was exit 0 with an empty table)
    with pytest.raises(BenchError, match="nothing can be timed.*--backends onnx: the onnx backend needs onnxruntime"):
        run_bench(BenchConfig(sizes=[64], decoders=["tae-64"], baselines=["none"], backends=["onnx"], repeats=1,
                              warmup=0, memory=False))


def test_plot_needs_speedups(tmp_path):
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_speedup([{"name": "a", "speedup": None, "gflops": 1.0}], tmp_path / "p.png")
    rows = [{"name": "a", "size": 64, "speedup": 1.0, "gflops": 10.0, "params": 1e6, "images": 1},
            {"name": "b", "size": 64, "speedup": 8.0, "gflops": 1.0, "params": 1e5, "images": 1}]
    assert plot_speedup(rows, tmp_path / "p.png", x="params").stat().st_size > 1000


def test_several_dtypes_give_stock_and_like_for_like_speedups(count_resolves):
    payload = run_bench(BenchConfig(sizes=[64], decoders=["tae-64"], baselines=["sdxl"], dtypes=["fp32", "bfloat16"],
                                    backends=["eager", "channels_last", "onnx"], repeats=1, warmup=0, memory=False))
    assert count_resolves == ["tae-64"]  # five tae-64 rows (and an ONNX export) from one build
    rows = {(r["name"], r["backend"], r["requested_dtype"]): r for r in payload["rows"]}
    # baselines run eager and channels_last (their fastest form counts), our decoder every backend but bf16 ONNX
    assert set(rows) == {("sdxl-vae", b, d) for b in ("eager", "channels_last") for d in ("fp32", "bf16")} | {
        ("tae-64", b, d) for b in ("eager", "channels_last") for d in ("fp32", "bf16")} | {("tae-64", "onnx", "fp32")}
    assert rows["tae-64", "channels_last", "bf16"]["dtype"] == "bf16"
    (skip,) = payload["skipped"]
    assert skip["backend"] == "onnx bf16" and "fp32" in skip["reason"]
    assert payload["reference"] == "sdxl-vae" and payload["reference_dtype"] == "fp32"
    stock = rows["sdxl-vae", "eager", "fp32"]["per_image_s"]
    for (name, backend, dtype), row in rows.items():
        fastest = min(rows["sdxl-vae", b, dtype]["per_image_s"] for b in ("eager", "channels_last"))
        assert row["speedup"] == pytest.approx(stock / row["per_image_s"], rel=1e-9)
        assert row["speedup_same_dtype"] == pytest.approx(fastest / row["per_image_s"], rel=1e-9)


def test_svd_frames_outside_the_video_frames_are_refused():
    # SVD at a length no row has was never timed, and every speed-up came out empty
    from fastdec.bench.video import VideoBenchConfig, validate_video_config
    from fastdec.errors import BenchError

    with pytest.raises(BenchError, match="--svd-frames 3 not in --video-frames 2 8"):
        validate_video_config(VideoBenchConfig(decoders=["tae-causal-64"], frames=[2, 8], svd_frames=[3, 8]))
    assert validate_video_config(VideoBenchConfig(decoders=["tae-causal-64"], frames=[2, 8],
                                                  svd_frames=[8])).svd_frames == [8]


@pytest.mark.parametrize("extra, problem", [
    ({"backends": ["eager", "compile"]}, "--backends compile (only causal decoders compile"),
    ({"deflicker": True}, "--deflicker (it times a streaming decoder's pushes"),
    ({"push_frames": [4]}, "--push-frames (it sets a streaming decoder's push size)"),
])
def test_video_options_no_decoder_has_a_row_for_are_refused(extra, problem, monkeypatch):
    # a temporal decoder alone has no compiled, deflickered or streaming row: the run gave none and said nothing
    import fastdec.bench.video as video
    from fastdec.errors import BenchError

    monkeypatch.setattr(video, "_bench_video_row", lambda *a: pytest.fail("a row was timed"))
    cfg = video.VideoBenchConfig(decoders=["tae-temporal-192"], baselines=["none"], sizes=[64], frames=[2], **extra)
    with pytest.raises(BenchError, match=f"no decoder of --decoders tae-temporal-192 has a row for {re.escape(problem)}"):
        video.run_video_bench(cfg)
