"""fastdec bench --pipeline: whole-pipeline time with the original VAE decoder vs fast decoders."""
from __future__ import annotations

import json
import sys

import pytest
import torch

import fastdec.resolve
from fastdec.bench.pipeline import DecodeTimer, build_sdxl_pipeline, time_pipeline
from fastdec.cli import main


def test_pipeline_bench_end_to_end_json(tmp_path, capsys, monkeypatch):
    resolved = []
    resolve = fastdec.resolve.resolve_decoder
    monkeypatch.setattr(fastdec.resolve, "resolve_decoder", lambda spec, *a, **k: resolved.append(spec) or resolve(spec, *a, **k))
    out = tmp_path / "pipe.json"
    status = main(["bench", "--pipeline", "--sizes", "64", "--steps", "2", "--repeats", "1", "--warmup", "0",
                   "--decoders", "tae-64", "--json", str(out)])
    printed = capsys.readouterr().out
    assert status == 0
    assert resolved == ["tae-64"]  # built once, swapped in for every round
    assert "illustrative" in printed and "fastdec.swap_decoder" in printed and "tae-64" in printed
    payload = json.loads(out.read_text())
    assert payload["kind"] == "pipeline" and payload["pipeline_config"] == "tiny" and payload["illustrative"] is True
    assert payload["steps"] == 2 and payload["sizes"] == [64]
    rows = {r["name"]: r for r in payload["rows"]}
    assert list(rows) == ["SDXL VAE (original)", "tae-64"]
    original, fast = rows["SDXL VAE (original)"], rows["tae-64"]
    assert original["speedup"] == pytest.approx(1.0) and original["decode_speedup"] == pytest.approx(1.0)
    for row in (original, fast):
        assert 0 < row["decode_s"] < row["total_s"]
        assert row["decoder_share"] == pytest.approx(row["decode_s"] / row["total_s"])
        assert row["image_size"] == [64, 64]
    assert fast["speedup"] == pytest.approx(original["total_s"] / fast["total_s"])
    rest_fixed = original["total_s"] / (original["total_s"] - original["decode_s"] + fast["decode_s"])
    assert fast["speedup_decode_only"] == pytest.approx(rest_fixed)
    assert original["speedup_decode_only"] == pytest.approx(1.0)
    for row in (original, fast):
        assert 0 < row["decode_cpu_s"] < row["total_cpu_s"]
        assert row["decoder_share_cpu"] == pytest.approx(row["decode_cpu_s"] / row["total_cpu_s"])
    assert fast["speedup_cpu"] == pytest.approx(original["total_cpu_s"] / fast["total_cpu_s"])
    # the same denoising in both runs: only the decoder differs
    assert fast["latent_digest"] == original["latent_digest"]
    assert payload["system"]["torch"] == torch.__version__


def test_decode_timer_sees_every_decode_and_swap_changes_the_decoder(make_decoder):
    from fastdec import restore_decoder, swap_decoder
    from fastdec.pipelines import FastVAE

    pipe = build_sdxl_pipeline("tiny")
    original_vae = pipe.vae
    swap_decoder(pipe, make_decoder("tae-64", "sdxl"))
    assert isinstance(pipe.vae, FastVAE)
    result = time_pipeline(pipe, size=64, steps=1, seed=0, warmup=1, repeats=2, device="cpu")
    assert len(result["decode_runs_s"]) == 2 and len(result["total_runs_s"]) == 2
    assert result["same_latents_every_run"]
    assert "decode" not in pipe.vae.__dict__  # the timing wrapper is removed afterwards

    # NaN latents (random fp16 denoisers overflow) are cleaned before the fast decoder, which would refuse them
    timer = DecodeTimer("cpu")
    timer.install(pipe.vae)
    with torch.inference_mode():
        image = pipe.vae.decode(torch.full((1, 4, 4, 4), float("nan")), return_dict=False)[0]
    timer.remove(pipe.vae)
    assert timer.nonfinite_latents and torch.isfinite(image).all()
    restore_decoder(pipe)
    assert pipe.vae is original_vae

    timer = DecodeTimer("cpu")
    timer.install(pipe.vae)
    with torch.inference_mode():
        pipe.vae.decode(torch.zeros(1, 4, 4, 4))
    timer.remove(pipe.vae)
    assert len(timer.seconds) == 1 and timer.seconds[0] > 0


def test_pipeline_bench_refuses_real_configs_on_cpu(capsys):
    assert main(["bench", "--pipeline", "--pipeline-config", "real", "--device", "cpu"]) == 2
    assert "needs --device cuda" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--decoders", "no-such-decoder"], "'no-such-decoder' is not a decoder file"),
    (["--steps", "0"], "--steps and --repeats must be >= 1"),
    (["--sizes", "60"], "size 60 must be a positive multiple of 8"),
    # it failed after the whole run, blaming the decoder for latents that differed
    (["--dtype", "fp16", "--device", "cpu"], "--pipeline --dtype fp16 needs a GPU (--device cuda)"),
])
def test_pipeline_bench_bad_requests(argv, message, capsys):
    assert main(["bench", "--pipeline", *argv]) == 2
    assert message in capsys.readouterr().err


def test_pipeline_bench_without_transformers_names_the_extra(tmp_path, capsys, monkeypatch):
    # a wheel install without [pipelines] printed transformers' ModuleNotFoundError traceback
    monkeypatch.setitem(sys.modules, "transformers", None)
    out = tmp_path / "pipe.json"
    assert main(["bench", "--pipeline", "--sizes", "64", "--steps", "1", "--decoders", "tae-64", "--json",
                 str(out)]) == 2
    err = capsys.readouterr().err
    assert "bench --pipeline" in err and "needs transformers" in err and 'pip install "fastdec[pipelines]"' in err
    assert "Traceback" not in err and not out.exists()
