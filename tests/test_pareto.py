"""benchmarks/pareto.py: PSNR (a `fastdec eval images` report) against cost (a `fastdec bench --json` result).

The inputs are tiny synthetic files with the structure the real writers produce: metric summaries from
``MeanCI.to_dict`` (what ``fastdec.eval.metrics.summarize`` stores), report and row keys as in
``fastdec.eval.run.build_report`` / ``fastdec.bench.images._row_record``, written with fastdec's ``write_json``
(NaN becomes null, as in a real report).
"""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
from PIL import Image

from fastdec.eval.metrics import MeanCI
from fastdec.io.files import write_json

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "pareto.py"


def _pareto():
    spec = importlib.util.spec_from_file_location("pareto", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # @dataclass looks its module up there while the class is made
    spec.loader.exec_module(module)
    return module


# eval name -> (PSNR mean, CI half-width, n); "single" has one image: its CI is NaN, null in the JSON
PSNR = {"teacher": (28.5287, 0.7002, 100), "flux2-hifi": (30.0961, 0.6543, 100), "single": (25.0, math.nan, 1)}
# bench name -> (GFLOPs per call, median s per call) per setting; batch 2, so per image = half of each
COST = {"taef2": {"fp32/eager": (280.0, 0.90), "bf16/channels_last": (280.0, 0.40)},
        "flux2-hifi": {"fp32/eager": (610.0, 1.80), "bf16/channels_last": (610.0, 0.70)},
        "single": {"fp32/eager": (50.0, 0.20), "bf16/channels_last": (50.0, 0.10)},
        "sdxl-vae": {"fp32/eager": (5000.0, 9.0), "bf16/channels_last": (5000.0, 4.0)}}
BATCH = 2


def _summary(mean: float, half: float, n: int) -> dict:
    return MeanCI(mean, mean - half, mean + half, n).to_dict()


def _report() -> dict:
    decoders = {name: {"source": "teacher decoder" if name == "teacher" else f"/x/{name}.safetensors",
                       "metrics": {"original": {"psnr": _summary(*v), "ssim": _summary(0.9, 0.01, v[2])},
                                   "teacher": {"psnr": _summary(v[0] + 3, 0.5, v[2])}}}
                for name, v in PSNR.items()}
    return {"kind": "images", "count": 100, "unit": "images", "settings": {"data": "/data/images/val"},
            "decoders": decoders, "notes": [], "skipped": {"count": 0, "files": {}},
            "files": {"csv": "per_image.csv", "figures": []}}


def _row(name: str, setting: str, size: int, gflops: float, median_s: float) -> dict:
    dtype, backend = setting.split("/")
    return {"name": name, "kind": "baseline" if name == "sdxl-vae" else "checkpoint", "backend": backend,
            "size": size, "batch": BATCH, "frames": 1, "images": BATCH, "latent_shape": [BATCH, 32, size // 8, size // 8],
            "dtype": dtype, "requested_dtype": dtype, "device": "cpu",
            "channels_last": backend in ("channels_last", "compile"), "median_s": median_s, "p10_s": median_s,
            "p90_s": median_s, "runs_s": [median_s], "warmup": 1, "repeats": 1, "per_image_s": median_s / BATCH,
            "speedup": None, "peak_mem_mb": None, "peak_mem_method": None, "params": 1_000_000, "weights_mb": 4.0,
            "gflops": gflops, "note": ""}


def _bench() -> dict:
    rows = [_row(name, setting, size, gflops * (size / 512) ** 2, s * (size / 512) ** 2)
            for size in (256, 512) for name, settings in COST.items() for setting, (gflops, s) in settings.items()]
    return {"benchmark": "fastdec bench (image decoders)", "system": {"cpu": "Test CPU", "torch_threads": 2,
                                                                    "device": "cpu", "torch": "2.x"},
            "settings": {"sizes": [256, 512], "batch": BATCH, "dtypes": ["fp32", "bf16"]}, "rows": rows,
            "skipped": [], "failed": []}


@pytest.fixture
def inputs(tmp_path: Path) -> tuple[Path, Path]:
    return write_json(tmp_path / "eval" / "report.json", _report()), write_json(tmp_path / "bench.json", _bench())


def _argv(inputs, tmp_path: Path, *extra: str) -> list[str]:
    return ["--eval", str(inputs[0]), "--bench", str(inputs[1]), "--out", str(tmp_path / "out" / "pareto.png"),
            "--name", "teacher=taef2", *extra]


def _expected_line(label: str, bench: str, eval_name: str, setting: str) -> str:
    """The table row, computed here from the inputs: per-image GFLOPs and ms at 512 px, PSNR and its CI."""
    gflops, median_s = COST[bench][setting]
    mean, half, _ = PSNR[eval_name]
    ci = "—" if math.isnan(half) else f"{mean - half:.2f}, {mean + half:.2f}"
    return f"| {label} | {gflops / BATCH:.1f} | {median_s / BATCH * 1e3:.1f} | {mean:.2f} [{ci}] |"


def test_png_and_table_from_the_default_fp32_eager_rows(inputs, tmp_path, capsys):
    table = tmp_path / "out" / "table.md"
    assert _pareto().main(_argv(inputs, tmp_path, "--label", "teacher=TAEF2", "--table", str(table))) == 0
    png = tmp_path / "out" / "pareto.png"
    assert png.stat().st_size > 0
    with Image.open(png) as im:
        assert im.format == "PNG" and im.width > 100 and im.height > 100
        im.verify()
    text = table.read_text()
    lines = text.splitlines()
    assert lines[0] == "| decoder | GFLOPs@512 | ms@512 (fp32/eager) | PSNR [95% CI] |"
    assert lines[2:] == [_expected_line("TAEF2", "taef2", "teacher", "fp32/eager"),
                         _expected_line("flux2-hifi", "flux2-hifi", "flux2-hifi", "fp32/eager"),
                         _expected_line("single", "single", "single", "fp32/eager")]
    assert lines[2] == "| TAEF2 | 140.0 | 450.0 | 28.53 [27.83, 29.23] |"  # the same, by hand
    assert text in capsys.readouterr().out  # printed as well
    assert not list((tmp_path / "out").glob(".*"))  # atomic writes leave no temporary file behind


def test_setting_picks_the_bf16_channels_last_rows(inputs, tmp_path, capsys):
    argv = _argv(inputs, tmp_path, "--setting", "bf16/channels_last", "--decoders", "teacher", "flux2-hifi")
    assert _pareto().main(argv) == 0
    out = capsys.readouterr().out
    assert _expected_line("teacher", "taef2", "teacher", "bf16/channels_last") in out
    assert _expected_line("flux2-hifi", "flux2-hifi", "flux2-hifi", "bf16/channels_last") in out
    assert "| single |" not in out  # left out by --decoders
    assert (tmp_path / "out" / "pareto.png").stat().st_size > 0


def test_a_missing_name_names_both_sides(inputs, tmp_path, capsys):
    argv = _argv(inputs, tmp_path)[:-2] + ["--name", "teacher=taef2-typo"]  # no bench row is called that
    assert _pareto().main(argv) == 2
    err = capsys.readouterr().err
    assert "'teacher' (as 'taef2-typo')" in err
    assert "The eval report has: teacher, flux2-hifi, single" in err
    assert "the bench JSON has at 512 px fp32/eager: taef2, flux2-hifi, single, sdxl-vae" in err
    assert "--name EVAL=BENCH" in err
    assert not (tmp_path / "out" / "pareto.png").exists()


def test_unmapped_eval_name_and_unknown_keys_are_errors(inputs, tmp_path, capsys):
    pareto = _pareto()
    argv = ["--eval", str(inputs[0]), "--bench", str(inputs[1]), "--out", str(tmp_path / "p.png")]
    assert pareto.main(argv) == 2  # 'teacher' is 'taef2' on the bench side
    assert "eval decoder(s) 'teacher'." in capsys.readouterr().err
    assert pareto.main(argv + ["--name", "teachr=taef2"]) == 2
    assert "--name: no decoder 'teachr' in the eval report (it has: teacher, flux2-hifi, single)" in \
        capsys.readouterr().err


def test_unknown_setting_and_size_list_what_there_is(inputs, tmp_path, capsys):
    pareto = _pareto()
    assert pareto.main(_argv(inputs, tmp_path, "--setting", "fp16/onnx")) == 2
    assert "settings there: bf16/channels_last, fp32/eager" in capsys.readouterr().err
    assert pareto.main(_argv(inputs, tmp_path, "--size", "1024")) == 2
    assert "sizes: 256, 512" in capsys.readouterr().err


def test_pareto_front_keeps_only_undominated_points():
    pareto = _pareto()
    points = [pareto.Point(n, n, n, g, ms, psnr, None, None, 1)
              for n, g, ms, psnr in [("a", 1, 5, 25.0), ("b", 2, 1, 27.0), ("c", 3, 2, 26.0), ("d", 4, 9, 30.0)]]
    assert [p.name for p in pareto.pareto_front(points, "gflops")] == ["a", "b", "d"]
    assert [p.name for p in pareto.pareto_front(points, "ms")] == ["b", "d"]
