"""fastdec.video (PyAV/PIL IO) and the `fastdec decode-video` command."""
from __future__ import annotations

import os
import shutil
import warnings

import numpy as np
import pytest
import torch
from conftest import shared_path

from fastdec.cli import main
from fastdec.video import VideoError, VideoWriter, read_video, video_info, write_video


pytestmark = pytest.mark.usefixtures("one_thread")


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a.float() - b.float()) ** 2).mean()
    return float(10 * torch.log10(255**2 / mse))


def _listing(folder) -> list[str]:
    return sorted(os.listdir(folder))


@pytest.fixture
def realshort():
    return shared_path("data", "video", "clips", "realshort.mp4")


def test_video_info_of_clips(realshort):
    info = video_info(realshort)
    assert (info.num_frames, info.height, info.width) == (36, 240, 320)
    assert info.fps == pytest.approx(30.02, abs=0.01)
    dog = video_info(shared_path("data", "video", "clips", "01_dog.mp4"))
    assert (dog.num_frames, dog.height, dog.width) == (289, 720, 1280)


def test_h264_round_trip(realshort, tmp_path):
    frames = read_video(realshort, start=0, num_frames=16)
    assert frames.shape == (16, 3, 240, 320) and frames.dtype == torch.uint8
    out = write_video(frames, tmp_path / "clip.mp4", fps=30)
    info = video_info(out)
    assert (info.num_frames, info.height, info.width, info.fps) == (16, 240, 320, 30.0)
    again = read_video(out)
    assert again.shape == frames.shape
    assert psnr(again, frames) > 35
    assert _listing(tmp_path) == ["clip.mp4"]  # no temporary files left


def test_random_access_equals_sequential_decode(realshort):
    full = read_video(realshort)
    assert full.shape[0] == 36
    assert torch.equal(read_video(realshort, start=29, num_frames=7), full[29:])
    # a long clip: the reader seeks to a keyframe instead of decoding from the start
    dog = shared_path("data", "video", "clips", "01_dog.mp4")
    from fastdec.video import iter_video

    sequential = torch.cat(list(iter_video(dog, 0, 103, chunk=8)))[100:]
    assert torch.equal(read_video(dog, start=100, num_frames=3), sequential)


def test_frame_folder(tmp_path):
    folder = shared_path("data", "video", "frames", "davis_tennis")
    info = video_info(folder)
    assert (info.num_frames, info.height, info.width, info.fps) == (70, 480, 854, None)
    frames = read_video(folder, start=5, num_frames=3)
    from PIL import Image

    expected = np.array(Image.open(folder / "00006.jpg").convert("RGB"))
    assert torch.equal(frames[1].permute(1, 2, 0), torch.from_numpy(expected))
    with pytest.raises(VideoError, match="70 frames"):
        read_video(folder, start=68, num_frames=3)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(VideoError, match="no image frames"):
        read_video(empty)


def test_gif_and_odd_sizes(tmp_path):
    torch.manual_seed(0)
    frames = torch.rand(5, 3, 33, 47)
    gif = write_video(frames, tmp_path / "a.gif", fps=10)
    back = read_video(gif)
    assert back.shape == (5, 3, 33, 47)
    assert psnr(back, frames * 255) > 15  # palette quantisation of noise is coarse; gradients in real video fare better
    with pytest.warns(UserWarning, match="even sizes"):
        mp4 = write_video(frames, tmp_path / "odd.mp4")
    info = video_info(mp4)
    assert (info.num_frames, info.height, info.width) == (5, 34, 48)


def test_frame_rates_a_file_cannot_play_are_refused_before_writing(tmp_path, capsys):
    """1e-9 fps became a 24 fps .mp4 and 1e9 fps a 10 fps .gif, with exit 0: out of range is an error now,
    also when the rate is the input's (a 60 fps clip to .gif)."""
    frames = torch.rand(2, 3, 16, 16)
    for fps, suffix, words in ((1e-9, ".mp4", "0.01 to 1000 fps"), (1e9, ".mp4", "0.01 to 1000 fps"),
                               (60, ".gif", "write an .mp4"), (float("nan"), ".mp4", "finite"), ("24", ".gif", "'24'")):
        with pytest.raises(VideoError, match=words):
            write_video(frames, tmp_path / f"a{suffix}", fps=fps)
    assert not list(tmp_path.iterdir())  # refused before a temporary file was made
    clip = write_video(frames, tmp_path / "clip60.mp4", fps=60)
    decoder = tmp_path / "dec.safetensors"
    from factories import tiny_decoder
    from fastdec import save_decoder

    save_decoder(tiny_decoder("tae-64", "flux2"), decoder)
    out = tmp_path / "clip.gif"
    argv = ["decode-video", str(clip), "--decoder", str(decoder), "--teacher",
            str(shared_path("weights", "taef2_encoder.pth")), "--out", str(out), "--quiet"]
    assert main(argv) == 2
    assert "the input's frame rate (choose another with --fps) 60 is outside" in capsys.readouterr().err
    assert main([*argv, "--fps", "30"]) == 0 and read_video(out).shape == (2, 3, 16, 16)


def test_corrupt_and_truncated_files_raise_video_error(realshort, tmp_path):
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"not a video" * 100)
    with pytest.raises(VideoError, match="garbage.mp4"):
        read_video(garbage)
    data = realshort.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])  # index (moov) at the end: unreadable
    with pytest.raises(VideoError, match="cut.mp4"):
        video_info(cut)
    # index at the start (+faststart): the header promises frames the file no longer holds
    ours = write_video(read_video(realshort, 0, 16), tmp_path / "ours.mp4", fps=30)
    data = ours.read_bytes()
    cut2 = tmp_path / "cut2.mp4"
    cut2.write_bytes(data[: len(data) * 6 // 10])
    with pytest.raises(VideoError, match="cut2.mp4"):
        read_video(cut2)
    with pytest.raises(VideoError, match="does not exist"):
        read_video(tmp_path / "missing.mp4")
    with pytest.raises(VideoError, match="36 frames"):
        read_video(realshort, start=30, num_frames=10)


def test_failed_writes_leave_no_file(tmp_path):
    frames = torch.rand(4, 3, 16, 16)
    bad = frames.clone()
    bad[2, 0, 0, 0] = float("nan")
    with pytest.raises(VideoError, match="NaN"):
        write_video(bad, tmp_path / "nan.mp4")
    with pytest.raises(VideoError, match="permute"):
        write_video(frames.permute(0, 2, 3, 1), tmp_path / "hwc.mp4")
    with pytest.raises(RuntimeError, match="crash"):
        with VideoWriter(tmp_path / "crash.mp4") as writer:
            writer.write(frames)
            raise RuntimeError("crash mid-video")
    assert _listing(tmp_path) == []
    # an existing file is left as it was when a rewrite fails
    keep = write_video(frames, tmp_path / "keep.mp4")
    before = keep.read_bytes()
    with pytest.raises(VideoError):
        with VideoWriter(keep) as writer:
            writer.write(frames)
            writer.write(torch.rand(1, 3, 8, 8))  # size change
    assert keep.read_bytes() == before and _listing(tmp_path) == ["keep.mp4"]
    with pytest.raises(VideoError, match=".mp4 or .gif"):
        write_video(frames, tmp_path / "x.avi")


@pytest.mark.parametrize("suffix", [".mp4", ".gif"])
def test_a_video_is_on_disk_before_it_is_renamed_into_place(tmp_path, monkeypatch, suffix):
    # without an fsync, a crash just after the rename could leave a complete-looking name over missing data
    import os as os_module

    events = []
    real_fsync, real_replace = os_module.fsync, os_module.replace
    monkeypatch.setattr(os_module, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os_module, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    write_video(torch.rand(3, 3, 16, 16), tmp_path / f"v{suffix}")
    assert events == ["fsync", "replace"]


def test_a_killed_writes_partial_video_is_removed_by_the_next_write(tmp_path):
    # a SIGTERM'd decode-video left .out.mp4.*.fastdec-tmp.mp4, and a successful rerun to the same --out kept it
    import subprocess
    import sys

    from fastdec.io import files

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # the killed writer: its process is gone
    tag = f"{files._owner_tag().partition('-')[0]}-{dead.pid}"
    stale = tmp_path / f".out.mp4.{tag}.k1ll3d.fastdec-tmp.mp4"
    stale.write_bytes(b"partial H.264")
    other = tmp_path / f".other.mp4.{tag}.k1ll3d.fastdec-tmp.mp4"  # another output's: not this write's to remove
    other.write_bytes(b"partial")
    write_video(torch.rand(2, 3, 16, 16), tmp_path / "out.mp4")
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name, "out.mp4"]
    with pytest.raises(TypeError, match="the video output must be a path"):
        VideoWriter(3)


# ----------------------------------------------------------------------------- decode-video CLI
def _tiny(kind: str):
    from factories import tiny_decoder

    from fastdec.models.temporal import CausalTAEDecoder, TemporalTAEDecoder

    image = tiny_decoder("tae-64", "svd", width=16)
    if kind == "image":
        return image
    if kind == "causal":
        decoder = CausalTAEDecoder.from_image_decoder(image)
        for name, p in decoder.named_parameters():
            if name.endswith("memory.weight"):
                torch.nn.init.normal_(p, std=0.05)
        return decoder.eval()
    decoder = TemporalTAEDecoder.from_image_decoder(image, head_dim=8, chunk_size=4, chunk_overlap=1)
    torch.nn.init.normal_(decoder.temporal_mid.out.weight, std=0.2)
    return decoder.eval()


@pytest.mark.parametrize("kind,fmt", [("causal", ".pt"), ("temporal", ".npy"), ("image", ".safetensors")])
def test_decode_video_cli_latents(tmp_path, kind, fmt, capsys):
    from safetensors.torch import save_file

    from fastdec.checkpoints import save_decoder

    decoder = _tiny(kind)
    ckpt = save_decoder(decoder, tmp_path / "dec.safetensors")
    torch.manual_seed(1)
    z = torch.randn(9, 4, 8, 8) * 0.5
    path = tmp_path / f"lat{fmt}"
    if fmt == ".pt":
        torch.save(z, path)
    elif fmt == ".npy":
        np.save(path, z[None].numpy())
    else:
        save_file({"latents": z}, str(path))
    out = tmp_path / "out.mp4"
    assert main(["decode-video", str(path), "--decoder", str(ckpt), "--out", str(out), "--chunk", "2", "--quiet"]) == 0
    video = read_video(out)
    assert video.shape == (9, 3, 64, 64)
    with torch.no_grad():
        expected = decoder(z[None])[0] if decoder.is_video else decoder(z)
    assert psnr(video, expected * 255) > 30  # equal up to H.264
    assert "wrote 9 frames" in capsys.readouterr().err


def test_decode_video_cli_errors(tmp_path, realshort, capsys):
    from fastdec.checkpoints import save_decoder

    ckpt = save_decoder(_tiny("causal"), tmp_path / "dec.safetensors")
    out = tmp_path / "out.mp4"
    assert main(["decode-video", str(realshort), "--decoder", str(ckpt), "--out", str(out)]) == 2
    assert "--teacher" in capsys.readouterr().err
    torch.save(torch.randn(2, 3, 9, 4, 8, 8), tmp_path / "bad.pt")
    assert main(["decode-video", str(tmp_path / "bad.pt"), "--decoder", str(ckpt), "--out", str(out)]) == 2
    assert "(T, C, h, w)" in capsys.readouterr().err
    torch.save(torch.randn(3, 16, 8, 8), tmp_path / "c16.pt")
    assert main(["decode-video", str(tmp_path / "c16.pt"), "--decoder", str(ckpt), "--out", str(out)]) == 2
    assert "16" in capsys.readouterr().err
    assert not out.exists()


def test_decode_video_refuses_options_it_would_not_use(tmp_path, realshort, capsys):
    # each was accepted and changed nothing: two GIFs at --crf 0 and 51 were the same file, --raw did not
    # touch a video's latents, --parallel decoded an image decoder frame by frame as before
    from factories import tiny_decoder

    from fastdec.checkpoints import save_decoder

    causal = save_decoder(_tiny("causal"), tmp_path / "causal.safetensors")
    image = save_decoder(tiny_decoder("tae-64", "sd15"), tmp_path / "image.safetensors")
    torch.save(torch.randn(3, 4, 8, 8), tmp_path / "clip.pt")
    cases = [
        ([str(tmp_path / "clip.pt"), "--decoder", str(causal), "--out", str(tmp_path / "v.gif"), "--crf", "0"],
         "--crf sets H.264 quality, and a .gif is not H.264"),
        ([str(realshort), "--decoder", str(causal), "--teacher", str(causal), "--raw",
          "--out", str(tmp_path / "v.mp4")], "this input is a video, which --teacher encodes"),
        ([str(tmp_path / "clip.pt"), "--decoder", str(image), "--parallel", "--out", str(tmp_path / "v.mp4")],
         "decodes frame by frame (image decoder: expect flicker) whatever it is given: drop --parallel"),
    ]
    for argv, message in cases:
        assert main(["decode-video", *argv, "--quiet"]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert not (tmp_path / "v.gif").exists() and not (tmp_path / "v.mp4").exists()
    assert main(["decode-video", str(tmp_path / "clip.pt"), "--decoder", str(causal), "--out",
                 str(tmp_path / "v.gif"), "--quiet"]) == 0  # a .gif without --crf is written


def test_decode_video_will_not_write_over_its_input(tmp_path, realshort, capsys):
    from fastdec.checkpoints import save_decoder

    ckpt = save_decoder(_tiny("causal"), tmp_path / "dec.safetensors")
    clip = tmp_path / "clip.mp4"
    shutil.copy(realshort, clip)
    before = clip.read_bytes()
    # reconstructing a clip into itself replaced the original with its decode (the same path, or another
    # spelling of it)
    for out in (clip, tmp_path / "sub" / ".." / "clip.mp4"):
        (tmp_path / "sub").mkdir(exist_ok=True)
        assert main(["decode-video", str(clip), "--decoder", str(ckpt), "--teacher", str(ckpt), "--out",
                     str(out)]) == 2
        assert "is the input video: write the decode to another file" in capsys.readouterr().err
    assert clip.read_bytes() == before


def test_decode_video_refuses_a_teacher_of_another_size_and_frames_past_the_end(tmp_path, realshort, capsys):
    """TAESana's encoder gives 32 channels like FLUX.2's, but /32: a FLUX.2 decoder (x8) would write a video a
    quarter the size with exit 0. And a --start past the last frame is refused before 'decoding -N frames'."""
    sana = shared_path("weights", "taesana_encoder.pth")
    out = tmp_path / "v.mp4"
    base = ["decode-video", str(realshort), "--decoder", "flux2-video", "--out", str(out), "--quiet"]
    assert main([*base, "--teacher", str(sana), "--num-frames", "2"]) == 2
    err = capsys.readouterr().err
    assert "teacher and decoder are of different latent spaces" in err and "Traceback" not in err
    assert "encodes 32-channel latents at /32, not 'flux2' (32 channels, /8)" in err
    frames = video_info(realshort).num_frames
    assert main([*base, "--teacher", str(shared_path("weights", "taef2_encoder.pth")), "--start", "100"]) == 2
    err = capsys.readouterr().err
    assert f"has {frames} frames; --start 100 is past the last one ({frames - 1})" in err and "decoding -" not in err
    assert not out.exists()


def test_decode_video_cli_reconstructs_through_teacher(tmp_path, realshort, taef2_encoder_path, taef2_decoder_path):
    """Reconstruct mode with the real TAEF2 pair: a causal decoder made from TAEF2's decoder keeps its quality."""
    from fastdec.checkpoints import load_decoder, save_decoder
    from fastdec.models.temporal import CausalTAEDecoder

    causal = CausalTAEDecoder.from_image_decoder(load_decoder(taef2_decoder_path))
    ckpt = save_decoder(causal, tmp_path / "taef2-causal.safetensors")
    clip = tmp_path / "clip.mp4"
    shutil.copy(realshort, clip)
    out = tmp_path / "recon.mp4"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = main(["decode-video", str(clip), "--decoder", str(ckpt), "--teacher", str(taef2_encoder_path),
                   "--out", str(out), "--num-frames", "2", "--quiet"])
    assert rc == 0
    recon, original = read_video(out), read_video(realshort, 0, 2)
    assert recon.shape == original.shape == (2, 3, 240, 320)
    assert psnr(recon, original) > 27  # TAEF2 alone: ~31 dB on images; plus one H.264 pass


def test_ctrl_c_during_decode_video_is_exit_130_without_a_traceback_or_a_partial_file(tmp_path, monkeypatch,
                                                                                      capsys):
    from factories import tiny_decoder

    from fastdec import save_decoder
    from fastdec.io import video as video_io

    decoder = save_decoder(tiny_decoder("tae-causal-64", "sdxl"), tmp_path / "causal.safetensors")
    torch.save(torch.randn(6, 4, 4, 4), tmp_path / "clip.pt")
    write = video_io.VideoWriter.write

    def interrupted_after_one_chunk(self, frames):
        if self.frames_written:
            raise KeyboardInterrupt
        write(self, frames)

    monkeypatch.setattr(video_io.VideoWriter, "write", interrupted_after_one_chunk)
    out = tmp_path / "out.mp4"
    assert main(["decode-video", str(tmp_path / "clip.pt"), "--decoder", str(decoder), "--out", str(out),
                 "--chunk", "2", "--quiet"]) == 130
    err = capsys.readouterr().err
    assert "fastdec decode-video: interrupted" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["causal.safetensors", "clip.pt"]  # no partial video
