import os

import numpy as np
import pytest

from panda.data.frames import frame_geometry, preprocess_frames
from panda.data.video import decode_video, sample_frame_indices
from panda.errors import VideoDecodeError


@pytest.mark.parametrize("n, fps, frames, expected", [
    (300, 30.0, 8, [0, 30, 60, 90, 150, 180, 210, 270]),  # 10 candidates at 1 fps -> linspace pick
    (16, 8.0, 4, [0, 5, 10, 15]),  # 2 candidates < 4 -> even stride through the video
    (3, 30.0, 8, [0, 1, 2]),  # shorter than F: fewer frames (the caller pads)
    (240, 30.0, 8, [0, 30, 60, 90, 120, 150, 180, 210]),  # exactly F candidates
])
def test_frame_sampling_follows_the_release(n, fps, frames, expected):
    assert sample_frame_indices(n, fps, frames) == expected


@pytest.mark.parametrize("backend", ["decord", "pyav", "torchcodec"])
def test_decode_generated_mp4(make_video, backend):
    path = make_video(width=64, height=48, frames=16)
    video = decode_video(path, frames=4, backend=backend)
    assert video.frames.shape == (4, 48, 64, 3) and video.frames.dtype == np.uint8
    assert video.indices == [0, 5, 10, 15] and video.backend == backend
    # the red object moves right (wrapping around): each frame's red column profile is the
    # previous one shifted right by less than half the width
    red = ((video.frames[..., 0] > 150) & (video.frames[..., 1] < 100)).sum(1).astype(float)  # (4, W)
    width = red.shape[1]
    for before, after in zip(red, red[1:]):
        shift = int(np.argmax([np.dot(np.roll(before, k), after) for k in range(width)]))
        assert 0 < shift < width // 2


def test_decord_and_pyav_agree(make_video):
    path = make_video(frames=16)
    a, b = decode_video(path, 4, backend="decord"), decode_video(path, 4, backend="pyav")
    assert a.indices == b.indices
    assert np.abs(a.frames.astype(int) - b.frames.astype(int)).mean() < 3


def test_pyav_fallback_decodes_what_decord_cannot(make_video):
    # decord's bundled FFmpeg has no AV1 decoder; auto falls back to PyAV
    path = make_video(name="clip_av1.mp4", codec="libsvtav1", width=64, height=64, frames=16)
    video = decode_video(path, 4, backend="auto")
    assert video.backend == "pyav" and video.frames.shape == (4, 64, 64, 3)


def test_corrupt_missing_and_empty_files_raise_clear_errors(tmp_path, make_video):
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(os.urandom(4096))
    with pytest.raises(VideoDecodeError, match="garbage.mp4") as err:
        decode_video(garbage, 4)
    assert "decord" in err.value.reason and "pyav" in err.value.reason
    with pytest.raises(VideoDecodeError, match="file not found"):
        decode_video(tmp_path / "nope.mp4", 4)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(VideoDecodeError, match="empty"):
        decode_video(empty, 4)
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(open(make_video(frames=16), "rb").read()[:600])
    with pytest.raises(VideoDecodeError, match="truncated.mp4"):
        decode_video(truncated, 4)


def test_short_video_yields_fewer_frames_then_padding(make_video):
    path = make_video(frames=2)
    video = decode_video(path, frames=4)
    assert len(video.frames) == 2
    pixels, mask = preprocess_frames(video.frames, 4, 56, 7)
    assert mask[2:].sum() == 0 and mask[:2].sum() > 0


def test_release_geometry_for_16_9_and_portrait():
    g = frame_geometry(720, 1280, 448, 14)
    assert (g.out_h, g.out_w, g.top, g.left) == (252, 448, 84, 0)  # ceil(9) patches -> 252 px at row 84
    p = frame_geometry(1280, 720, 448, 14)
    assert (p.out_h, p.out_w, p.top, p.left) == (448, 252, 0, 84)
    sq = frame_geometry(300, 300, 448, 14)
    assert (sq.out_h, sq.out_w, sq.top, sq.left) == (448, 448, 0, 0)


def test_canvas_is_normalised_mean_and_mask_marks_the_frame():
    frames = np.full((1, 720, 1280, 3), 255, np.uint8)
    pixels, mask = preprocess_frames(frames, 1, 448, 14)
    assert mask[0, 84:336].min() == 1 and mask[0, :84].max() == 0 and mask[0, 336:].max() == 0
    assert pixels[0, :, :84].abs().max() == 0  # canvas = mean -> 0 after normalising
    assert pixels[0, :, 84:336].min() > 1.0  # white, normalised


def test_decord_native_messages_stay_off_the_terminal_and_end_up_in_the_error(tmp_path, make_video, capfd):
    """decord's C++ logger and FFmpeg write straight to file descriptor 2; a corrupt file must give
    one clear error and no native lines on the console."""
    truncated = tmp_path / "cut.mp4"
    truncated.write_bytes(open(make_video(frames=16), "rb").read()[-900:])  # no header: the moov atom is gone
    with pytest.raises(VideoDecodeError, match=r"cut\.mp4.*decord: RuntimeError: ERROR opening") as err:
        decode_video(truncated, 4, backend="decord")
    assert "video_reader.cc" not in err.value.reason
    console = capfd.readouterr()
    assert "ERROR opening" not in console.err and "moov atom" not in console.err and console.err == ""


def test_torchcodec_decodes_every_codec_of_the_zoo_like_pyav_and_names_bad_files(tmp_path):
    """data.video_backend=torchcodec: the same sampled indices and pixels as PyAV (both
    are FFmpeg) on H.264, AV1, VP9, HEVC, GIF and variable frame rate, from a path and from bytes;
    damaged files raise the one error type naming the file."""
    from video_zoo import build_zoo

    build_zoo(str(tmp_path), frames=4)
    videos = tmp_path / "videos"
    for name in ("good.mp4", "av1.mp4", "vp9.webm", "hevc.mp4", "anim.gif", "vfr.mp4", "short.mp4"):
        ours = decode_video(videos / name, 4, backend="torchcodec", threads=2)
        ref = decode_video(videos / name, 4, backend="pyav")
        assert ours.backend == "torchcodec" and ours.indices == ref.indices, name
        assert ours.frames.shape == ref.frames.shape and np.abs(ours.frames.astype(int) - ref.frames).mean() < 1.0, name
        blob = decode_video((videos / name).read_bytes(), 4, backend="torchcodec", name=name)
        assert np.array_equal(blob.frames, ours.frames)
    for name in ("garbage.mp4", "audio.m4a"):
        with pytest.raises(VideoDecodeError, match=name.replace(".", r"\.")) as err:
            decode_video(videos / name, 4, backend="torchcodec")
        assert "torchcodec" in err.value.reason
    # like decord, it counts the frames that are there; prepare compares that with the header
    from panda.data.prepare import PrepareOptions, inspect_video

    opts = PrepareOptions(records=[], video_root=str(videos), output="", frames=4, backend="torchcodec")
    with pytest.raises(VideoDecodeError, match="file cut short") as err:
        inspect_video(str(videos / "truncated.mp4"), opts)
    assert err.value.code == "truncated"


def test_a_missing_torchcodec_stops_the_run_at_config_time_naming_the_install(monkeypatch):
    import sys

    from conftest import compose
    from panda.config import to_train_config

    assert to_train_config(compose(["data.video_backend=torchcodec"])).data.video_backend == "torchcodec"
    monkeypatch.setitem(sys.modules, "torchcodec.decoders", None)  # what an absent package looks like to import
    with pytest.raises(ValueError, match=r"torchcodec is not installed.*\[torchcodec\].*apt-get install"):
        to_train_config(compose(["data.video_backend=torchcodec"]))
