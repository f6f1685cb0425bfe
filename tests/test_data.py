"""Image/video folders, crops and the latent cache (also damaged ones), and the old import paths."""
from __future__ import annotations

import json
import re
import warnings

import numpy as np
import pytest
import torch
from _train_helpers import make_images, tiny_encoder_file

from fastdec.errors import DataError
from fastdec.teachers import load_teacher
from fastdec.train.cache import CachedCrops, LatentCache, build_cache
from fastdec.train.data import Crop, ImageFolder, VideoFolder

pytestmark = pytest.mark.usefixtures("one_thread")


def test_corrupt_image_is_skipped_with_one_warning(tmp_path):
    folder = make_images(tmp_path / "data", 3)
    (folder / "sub").mkdir()
    make_images(folder / "sub", 1, seed=1, suffix=".jpg")  # recursive, and JPEG
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (folder / "notes.txt").write_text("not an image")
    with pytest.warns(UserWarning, match="broken.png") as record:
        data = ImageFolder(folder, resolution=32)
    assert len([w for w in record if "broken.png" in str(w.message)]) == 1
    assert len(data) == 4 and [p.name for p in data.skipped] == ["broken.png"]


def test_empty_and_all_bad_folders_are_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty.*no image files"):
        ImageFolder(tmp_path / "empty", resolution=32)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jpg").write_bytes(b"nope")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataError, match="bad.*1 image files, none readable"):
            ImageFolder(bad, resolution=32)
    with pytest.raises(DataError, match="does not exist"):
        ImageFolder(tmp_path / "missing", resolution=32)
    with pytest.raises(DataError, match="multiple of"):
        ImageFolder(make_images(tmp_path / "ok", 1), resolution=36)


def test_crops_are_deterministic_and_load_the_right_pixels(tmp_path):
    from PIL import Image

    folder = make_images(tmp_path / "data", 2, size=(40, 56))
    data = ImageFolder(folder, resolution=32)
    crops = data.random_crops(per_file=5, seed=3)
    assert crops == data.random_crops(per_file=5, seed=3) and crops != data.random_crops(per_file=5, seed=4)
    assert {c.flip for c in crops} == {True, False}
    for crop in crops:
        pixels = data.load(crop)
        reference = np.asarray(Image.open(data.files[crop.file]).convert("RGB"))[
            crop.top:crop.top + 32, crop.left:crop.left + 32]
        if crop.flip:
            reference = reference[:, ::-1]
        assert pixels.shape == (3, 32, 32)
        torch.testing.assert_close(pixels, torch.from_numpy(reference.copy()).permute(2, 0, 1).float() / 255)
    # images smaller than the crop are upscaled (shorter side = resolution), not dropped
    small = ImageFolder(make_images(tmp_path / "small", 1, size=(20, 30)), resolution=32)
    assert small.sizes == [(48, 32)] and small.load(small.center_crops()[0]).shape == (3, 32, 32)


def _teacher(tmp_path):
    return load_teacher(tiny_encoder_file(tmp_path / "weights" / "taesdxl_encoder.pth"))


def test_cache_is_aligned_and_reused(tmp_path):
    teacher = _teacher(tmp_path)
    data = ImageFolder(make_images(tmp_path / "data", 5), resolution=32)
    cache = build_cache(data, teacher, tmp_path / "cache", per_file=3, seed=0, batch_size=4, shard_size=4,
                        progress=False)
    assert len(cache) == 15 and len(list(cache.folder.glob("shard_*.safetensors"))) == 4
    pairs = CachedCrops(cache, data)
    for j in range(len(cache)):
        pixels, latent, index = pairs[j]
        assert index == j and latent.shape == (4, 4, 4)
        # the stored latent is the teacher's encoding of exactly these pixels (fp16 storage)
        torch.testing.assert_close(latent, teacher.encode(pixels[None])[0], rtol=2e-3, atol=2e-3)

    calls = []
    original = teacher.encode
    teacher.encode = lambda x: calls.append(len(x)) or original(x)
    again = build_cache(data, teacher, tmp_path / "cache", per_file=3, seed=0, progress=False)
    assert again.folder == cache.folder and calls == []  # reused: nothing encoded
    other = build_cache(data, teacher, tmp_path / "cache", per_file=3, seed=1, progress=False)
    assert other.folder != cache.folder and sum(calls) == 15  # different crops -> a new cache


def test_a_cache_being_built_is_waited_for_then_reused(tmp_path, capsys):
    """Two runs of a sweep sharing one cache root: the second waits while the first holds the cache's lock,
    then reuses what it built, instead of both writing the same shards (each deleting the other's files)."""
    import shutil
    import threading

    from filelock import FileLock

    teacher = _teacher(tmp_path)
    data = ImageFolder(make_images(tmp_path / "data", 2), resolution=32)
    finished = build_cache(data, teacher, tmp_path / "first", per_file=1, progress=False).folder
    calls, original = [], teacher.encode
    teacher.encode = lambda x: calls.append(len(x)) or original(x)
    (tmp_path / "cache").mkdir()
    built = []
    second = threading.Thread(target=lambda: built.append(
        build_cache(data, teacher, tmp_path / "cache", per_file=1, progress=True)))
    with FileLock(str(tmp_path / "cache" / f".{finished.name}.lock")):  # the first run is building
        second.start()
        second.join(timeout=3)
        assert second.is_alive() and not list((tmp_path / "cache" / finished.name).iterdir())  # waiting, writing nothing
        shutil.copytree(finished, tmp_path / "cache" / finished.name, dirs_exist_ok=True)  # the first run's cache
    second.join(timeout=60)
    assert not second.is_alive() and len(built[0]) == 2 and calls == []  # reused: nothing encoded twice
    assert "waiting for another run that is building the latent cache" in capsys.readouterr().err


def test_interrupted_cache_build_resumes(tmp_path):
    teacher = _teacher(tmp_path)
    data = ImageFolder(make_images(tmp_path / "data", 6), resolution=32)
    reference = build_cache(data, teacher, tmp_path / "clean", per_file=2, shard_size=4, progress=False)

    original, calls = teacher.encode, []

    def failing_encode(x):
        calls.append(len(x))
        if len(calls) == 3:
            raise KeyboardInterrupt  # the user pressed Ctrl-C during the third batch
        return original(x)

    teacher.encode = failing_encode
    with pytest.raises(KeyboardInterrupt):
        build_cache(data, teacher, tmp_path / "cache", per_file=2, batch_size=2, shard_size=4, progress=False)
    folder = next(p for p in (tmp_path / "cache").iterdir() if p.is_dir())
    index = json.loads((folder / "index.json").read_text())
    assert not index["complete"] and index["next"] == 4 and len(index["shards"]) == 1
    with pytest.raises(DataError, match="incomplete"):
        LatentCache(folder)
    teacher.encode, calls[:] = (lambda x: calls.append(len(x)) or original(x)), []
    resumed = build_cache(data, teacher, tmp_path / "cache", per_file=2, batch_size=2, shard_size=4, progress=False)
    assert sum(calls) == 8  # only the 8 crops not yet stored
    assert resumed.crops == reference.crops
    for j in range(len(resumed)):
        torch.testing.assert_close(resumed.latent(j), reference.latent(j))


def test_undecodable_file_is_skipped_once_during_caching(tmp_path):
    folder = make_images(tmp_path / "data", 4)
    data = ImageFolder(folder, resolution=32)
    # the file passed the scan but cannot be decoded when its crops are encoded (replaced, truncated on disk)
    good = (folder / "img_003.png").read_bytes()
    (folder / "img_003.png").write_bytes(good[: len(good) // 2])
    with pytest.warns(UserWarning, match="img_003.png") as record:
        cache = build_cache(data, _teacher(tmp_path), tmp_path / "cache", per_file=3, progress=False)
    assert len([w for w in record if "img_003" in str(w.message)]) == 1  # one warning, not one per crop
    assert len(cache) == 9 and cache.index["skipped_files"] == [3]
    assert all(c.file != 3 for c in cache.crops)


def test_crop_round_trips_through_json():
    crop = Crop(3, 10, 20, 64, True, 5, stride=2)
    assert Crop.from_list(json.loads(json.dumps(crop.to_list()))) == crop
    # a cache index written before strides existed holds 6 values: consecutive frames
    assert Crop.from_list([3, 10, 20, 64, 1, 5]) == Crop(3, 10, 20, 64, True, 5, stride=1)


def _numbered_frames(folder, count: int, size: int = 32):
    """A frame folder whose frame i is flat grey level 10 * i: a loaded clip says which frames it holds."""
    from PIL import Image

    folder.mkdir(parents=True)
    for i in range(count):
        Image.new("RGB", (size, size), (10 * i,) * 3).save(folder / f"frame_{i:03d}.png")
    return folder


def _frame_numbers(clip: torch.Tensor) -> list[int]:
    return [round(float(frame.mean()) * 255 / 10) for frame in clip]


def test_clips_have_a_random_start_and_stride(tmp_path):
    _numbered_frames(tmp_path / "videos" / "long", 12)
    _numbered_frames(tmp_path / "videos" / "short", 7)
    data = VideoFolder(tmp_path / "videos", resolution=32, frames=4, max_stride=3)
    crops = data.random_crops(per_file=40, seed=0)
    long, short = data.files.index(tmp_path / "videos" / "long"), data.files.index(tmp_path / "videos" / "short")
    # every stride up to the largest is drawn; in the 7-frame video a 4-frame clip fits strides 1 and 2 only
    assert {c.stride for c in crops if c.file == long} == {1, 2, 3}
    assert {c.stride for c in crops if c.file == short} == {1, 2}
    for crop in crops[::7]:
        frames = _frame_numbers(data.load(crop))
        assert frames == [crop.start + k * crop.stride for k in range(4)]
        assert frames[-1] < (12 if crop.file == long else 7)
    # the default is consecutive frames, as before strides existed
    assert {c.stride for c in VideoFolder(tmp_path / "videos", 32, 4).random_crops(10, seed=0)} == {1}
    with pytest.raises(DataError, match="--max-frame-stride must be 1 or more"):
        VideoFolder(tmp_path / "videos", 32, 4, max_stride=0)


def test_the_largest_stride_is_part_of_the_cache_key(tmp_path):
    from fastdec.train.cache import cache_key

    _numbered_frames(tmp_path / "videos" / "clip", 12)
    teacher = _teacher(tmp_path)
    keys = {stride: cache_key(VideoFolder(tmp_path / "videos", 32, 4, max_stride=stride), teacher, 2, 0)
            for stride in (1, 2, 3)}
    assert len(set(keys.values())) == 3


def test_a_retrained_teacher_with_the_old_size_and_mtime_gets_a_new_cache(tmp_path):
    import os
    import shutil

    path = tiny_encoder_file(tmp_path / "weights" / "taesdxl_encoder.pth", seed=0)
    old = path.stat()
    data = ImageFolder(make_images(tmp_path / "data", 2), resolution=32)
    first = build_cache(data, load_teacher(path), tmp_path / "cache", per_file=1, progress=False)
    tiny_encoder_file(path, seed=1)  # re-trained: same layout, so the same file size
    os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns))  # as cp -p and rsync -t leave it
    assert path.stat().st_size == old.st_size and path.stat().st_mtime_ns == old.st_mtime_ns
    second = build_cache(data, load_teacher(path), tmp_path / "cache", per_file=1, progress=False)
    assert second.folder != first.folder
    assert not torch.equal(second.latent(0), first.latent(0))
    # the same bytes copied elsewhere (a new mtime) are the same teacher: the cache is reused
    (tmp_path / "elsewhere").mkdir()
    copy = shutil.copy(path, tmp_path / "elsewhere" / path.name)
    assert build_cache(data, load_teacher(copy), tmp_path / "cache", per_file=1, progress=False).folder == second.folder


def test_a_data_file_touched_within_the_same_second_changes_the_cache_key(tmp_path):
    import os

    from fastdec.train.cache import cache_key

    data = ImageFolder(make_images(tmp_path / "data", 2), resolution=32)
    teacher = _teacher(tmp_path)
    image = data.files[0]
    second = 1_700_000_000 * 10**9
    os.utime(image, ns=(second, second + 1_000))
    before = cache_key(data, teacher, 1, 0)
    os.utime(image, ns=(second, second + 900_000_000))  # rewritten 0.9 s later, same size
    assert cache_key(data, teacher, 1, 0) != before


def test_frame_folder_clips(tmp_path):
    make_images(tmp_path / "videos" / "clip_a", 6, size=(40, 48))
    data = VideoFolder(tmp_path / "videos", resolution=32, frames=4)
    assert len(data) == 1
    crops = data.random_crops(per_file=2, seed=0)
    assert all(0 <= c.start <= 2 for c in crops)
    clip = data.load(crops[0])
    assert clip.shape == (4, 3, 32, 32) and 0 <= clip.min() and clip.max() <= 1


def test_damaged_cache_names_its_folder_and_says_to_delete_it(tmp_path):
    teacher = _teacher(tmp_path)
    data = ImageFolder(make_images(tmp_path / "data", 3), resolution=32)
    cache = build_cache(data, teacher, tmp_path / "cache", per_file=2, shard_size=4, progress=False)
    shard = cache.folder / "shard_00001.safetensors"
    intact = shard.read_bytes()
    shard.write_bytes(intact[: len(intact) // 2])  # cut short (a full disk, an interrupted copy)
    with pytest.raises(DataError, match=f"{cache.folder.name}.*damaged.*shard_00001.*delete that folder"):
        build_cache(data, teacher, tmp_path / "cache", per_file=2, shard_size=4, progress=False)
    shard.write_bytes(intact)
    index = cache.folder / "index.json"
    index.write_text(index.read_text()[:50])
    with pytest.raises(DataError, match=f"{cache.folder.name}.*index.json is unreadable.*delete"):
        LatentCache(cache.folder)


def test_old_import_paths_are_the_new_objects():
    import fastdec.cache
    import fastdec.data
    import fastdec.losses
    import fastdec.train.cache
    import fastdec.train.data
    import fastdec.train.losses

    assert fastdec.data.ImageFolder is ImageFolder and fastdec.data.DataError is DataError
    assert fastdec.data.VideoFolder is VideoFolder and fastdec.data.Crop is Crop
    assert fastdec.cache.build_cache is build_cache and fastdec.cache.LatentCache is LatentCache
    assert fastdec.losses.DistillLoss is fastdec.train.losses.DistillLoss
    from fastdec.io.images import IMAGE_SUFFIXES
    from fastdec.io.video import VIDEO_SUFFIXES

    assert fastdec.train.data.IMAGE_SUFFIXES is IMAGE_SUFFIXES and fastdec.data.VIDEO_SUFFIXES is VIDEO_SUFFIXES


def test_exclude_leaves_held_out_files_and_frame_folders_out(tmp_path):
    make_images(tmp_path / "photos", 4)
    folder = ImageFolder(tmp_path / "photos", 32, exclude=["img_001.png", " img_003.png "])
    assert [p.name for p in folder.files] == ["img_000.png", "img_002.png"]
    # a held-out frame folder among clips: named by its folder name or its path relative to --data
    make_images(tmp_path / "video" / "clip_a", 3, size=(32, 32))
    make_images(tmp_path / "video" / "clip_b", 3, size=(32, 32))
    for exclude in (["clip_b"], ["clip_b/"]):
        clips = VideoFolder(tmp_path / "video", 32, 2, exclude=exclude)
        assert [p.name for p in clips.files] == ["clip_a"]
    # a typo must not silently train on the held-out set
    with pytest.raises(DataError, match=r"--exclude names img_9\.png, which is not in .*photos"):
        ImageFolder(tmp_path / "photos", 32, exclude=["img_9.png"])
    # a file named by its whole path (it was refused, the path shown without its leading '/')
    absolute = ImageFolder(tmp_path / "photos", 32, exclude=[str(tmp_path / "photos" / "img_001.png")])
    assert [p.name for p in absolute.files] == ["img_000.png", "img_002.png", "img_003.png"]
    outside = str(tmp_path / "elsewhere.png")
    with pytest.raises(DataError, match=f"--exclude names {re.escape(outside)}, which is not in"):
        ImageFolder(tmp_path / "photos", 32, exclude=[outside])
    # leaving out everything says so (it said the folder has no image files)
    with pytest.raises(DataError, match="--exclude leaves out all 4 files or folders in .*photos.*nothing is left"):
        ImageFolder(tmp_path / "photos", 32, exclude=[f"img_00{i}.png" for i in range(4)])


def test_eval_video_exclude_scores_only_the_held_out_clips(tmp_path):
    from fastdec.eval.run import list_videos

    for name in ("a", "b", "c"):
        make_images(tmp_path / name, 2, size=(32, 32))
    assert [p.name for p in list_videos(tmp_path, exclude=["a", "c"])] == ["b"]
    with pytest.raises(DataError, match="--exclude names zz"):
        list_videos(tmp_path, exclude=["zz"])


def test_short_side_resizes_files_before_cropping(tmp_path):
    """--short-side: frames and images are resized (down or up) so the shorter side is that, then cropped."""
    from PIL import Image

    from fastdec.train.cache import cache_key

    frames = tmp_path / "videos" / "clip"
    frames.mkdir(parents=True)
    # a left-to-right ramp, 96x48: halved to 48x24, the crops see the whole ramp at half scale
    ramp = np.tile(np.linspace(0, 255, 96, dtype=np.float64).round().astype(np.uint8)[None, :, None], (48, 1, 3))
    for i in range(5):
        Image.fromarray(ramp).save(frames / f"frame_{i:03d}.png")
    data = VideoFolder(tmp_path / "videos", resolution=16, frames=3, short_side=24)
    assert data.sizes == [(48, 24)]
    crop = Crop(0, 4, 30, 16, False, 0)
    clip = data.load(crop)
    assert clip.shape == (3, 3, 16, 16)
    # the reference: the same antialiased resize of the whole frame, then the crop (same op: float32 noise only)
    full = torch.from_numpy(ramp).permute(2, 0, 1).float()[None] / 255
    expected = torch.nn.functional.interpolate(full, size=(24, 48), mode="bicubic", antialias=True).clamp(0, 1)
    torch.testing.assert_close(clip[0], expected[0, :, 4:20, 30:46], atol=1e-5, rtol=0)
    # halved: a column step of the crop spans two of the original's (255/95 grey levels each)
    step = float((clip[0, 0, 8, 1:] - clip[0, 0, 8, :-1]).mean())
    assert step == pytest.approx(2 * 1 / 95, rel=0.05)
    # upscaling too, and images as well as videos
    images = ImageFolder(make_images(tmp_path / "images", 1, size=(40, 20)), resolution=16, short_side=32)
    assert images.sizes == [(32, 64)] and images.load(images.random_crops(1, 0)[0]).shape == (3, 16, 16)
    # the scale is part of the cache key (no short side: the key of caches written before the option)
    teacher = _teacher(tmp_path)
    keys = {s: cache_key(VideoFolder(tmp_path / "videos", 16, 3, short_side=s), teacher, 2, 0) for s in (None, 24, 32)}
    assert len(set(keys.values())) == 3
    with pytest.raises(DataError, match="--short-side 8 is smaller than the --resolution 16"):
        VideoFolder(tmp_path / "videos", resolution=16, frames=3, short_side=8)


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".tiff"])  # PIL turns TIFFs itself, the others on request
def test_photos_stored_rotated_are_cropped_upright(tmp_path, suffix):
    """A photo with EXIF orientation 6 (stored on its side, shown turned 90 degrees) is cut into crops of the
    upright picture, as fastdec eval reads it; its orientation is in the cache key, an upright photo's is not."""
    from PIL import Image

    from fastdec.io.images import load_image
    from fastdec.train.cache import cache_key

    rng = np.random.default_rng(0)
    stored = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)  # 40 wide, 24 high as stored
    folder = tmp_path / "photos"
    folder.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6
    photo = folder / f"side{suffix}"
    Image.fromarray(stored).save(photo, exif=exif)
    data = ImageFolder(folder, resolution=16)
    assert data.sizes == [(24, 40)]  # upright: 24 wide, 40 high
    upright = load_image(photo)[0]
    assert upright.shape == (3, 40, 24)
    crop = Crop(0, 20, 3, 16, False)
    torch.testing.assert_close(data.load(crop), upright[:, 20:36, 3:19], atol=0, rtol=0)  # same decode, exactly
    assert data.describe()[0].endswith(":exif6")
    Image.fromarray(stored).save(photo)  # the same pixels stored without the tag
    plain = ImageFolder(folder, resolution=16)
    assert plain.sizes == [(40, 24)] and not plain.describe()[0].endswith("exif6")
    teacher = _teacher(tmp_path)
    assert cache_key(plain, teacher, 2, 0) != cache_key(data, teacher, 2, 0)
    # a picture whose upright shape no longer fits the planned crops is refused, never stretched to fit
    with pytest.raises(DataError, match=r"decodes upright at 40x24 px, not the shape .* planned for \(24x40"):
        data.load(crop)


def test_16_bit_and_float_images_are_read_right_or_refused(tmp_path):
    """PIL's convert('RGB') clips 16-bit grey to white and float samples to black, which eval scored and
    training trained on: 16-bit is scaled to 8 bits now, and float or 32-bit integer samples are refused."""
    from PIL import Image

    from fastdec.io.images import load_image

    ramp = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    folder = tmp_path / "deep"
    folder.mkdir()
    Image.fromarray(ramp).save(folder / "grey16.png")
    image = load_image(folder / "grey16.png")
    expected = torch.from_numpy((ramp / 257).round() / 255).float()
    # 8-bit rounding of the 16-bit value: within half an 8-bit level of it, in every channel
    assert image.shape == (1, 3, 64, 64) and (image - expected).abs().max() <= 0.5 / 255 + 1e-6
    crop = ImageFolder(folder, 32).random_crops(1, seed=0)[0]
    pixels = ImageFolder(folder, 32).load(crop)
    top, left = crop.top, crop.left
    window = image[0, :, top:top + 32, left:left + 32]
    assert torch.equal(pixels, window.flip(-1) if crop.flip else window)  # training reads what eval reads
    for mode, array in (("F", ramp.astype(np.float32) / 65535), ("I", ramp.astype(np.int32))):
        Image.fromarray(array).save(tmp_path / f"{mode}.tif")
        with pytest.raises(DataError, match=f"PIL mode {mode}.*save it as an 8- or 16-bit image"):
            load_image(tmp_path / f"{mode}.tif")
