"""Frame decoding with PyAV: N frames evenly spaced over a video, seeking instead of decoding everything.

Public API (also used by `ltm predict` to read inputs the way prep does):
    sample_frames(path, n) -> list[(frame_index, rgb uint8 array (H, W, 3))]
        `n` frames at evenly spaced indices over the whole video (`n=None`: every frame). Where the next wanted
        frame lies further ahead than `seek_gap` frames, the container seeks to the keyframe before it and decodes
        forward from there, so a 32-frame sample of a long video decodes only a few GOPs.
    frames_at(path, indices) -> {frame_index: rgb array}, exactly those frames (a video aligned with another)
    probe(path) -> VideoInfo(frames, fps, width, height)
    read_image(path) -> rgb uint8 array
    evenly_spaced(total, n) -> list[int]
    VideoError: raised with the file name for a missing, corrupt, truncated or frameless video.
"""

from __future__ import annotations

import logging
import os
import platform
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

log = logging.getLogger(__name__)

VIDEO_EXTS = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv"}
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


class VideoError(RuntimeError):
    """A video (or image) that cannot be decoded; the message names the file and the cause."""


@dataclass
class VideoInfo:
    frames: int
    fps: float
    width: int
    height: int


def evenly_spaced(total: int, n: int | None) -> list[int]:
    """`n` distinct indices spread evenly over `range(total)` (all of them when n is None or n >= total)."""
    if total <= 0:
        return []
    if n is None or n >= total:
        return list(range(total))
    if n == 1:
        return [total // 2]
    return sorted({int(round(i * (total - 1) / (n - 1))) for i in range(n)})


def _open(path: str | Path):
    path = Path(path)
    if not path.is_file():
        raise VideoError(f"{path}: no such file")
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise VideoError(f"{path}: cannot open video ({exc})") from exc
    if not container.streams.video:
        container.close()
        raise VideoError(f"{path}: no video stream")
    return container


def _frame_count(stream, container) -> int:
    if stream.frames:
        return int(stream.frames)
    rate = stream.average_rate or stream.guessed_rate
    if stream.duration and stream.time_base and rate:
        return int(round(float(stream.duration * stream.time_base * rate)))
    if container.duration and rate:
        return int(round(container.duration / av.time_base * float(rate)))
    return 0


def probe(path: str | Path) -> VideoInfo:
    container = _open(path)
    try:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or Fraction(25)
        return VideoInfo(_frame_count(stream, container), float(rate), stream.width, stream.height)
    finally:
        container.close()


def sample_frames(path: str | Path, n: int | None = 32, seek_gap: int = 48) -> list[tuple[int, np.ndarray]]:
    """Decode `n` evenly spaced frames (index, RGB array); `n=None` decodes every frame.

    Frame indices come from presentation timestamps (index = (pts - start) * time_base * fps), so a seek lands
    on the right frame. A truncated file yields the frames that decode; none at all raises VideoError.
    """
    container = _open(path)
    out: list[tuple[int, np.ndarray]] = []
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate or Fraction(25)
        tb = stream.time_base or Fraction(1, 90000)
        start = stream.start_time or 0
        total = _frame_count(stream, container)
        if n is None or total <= 0:
            wanted = None  # every frame (or unknown length: decode all, then pick)
        else:
            wanted = evenly_spaced(total, n)

        def index_of(frame) -> int:
            if frame.pts is None:
                return -1
            return int(round(float((frame.pts - start) * tb * rate)))

        try:
            if wanted is None:
                for i, frame in enumerate(container.decode(stream)):
                    idx = index_of(frame)
                    out.append((idx if idx >= 0 else i, frame.to_ndarray(format="rgb24")))
                if n is not None and out:
                    keep = set(evenly_spaced(len(out), n))
                    out = [f for j, f in enumerate(out) if j in keep]
            else:
                out = _decode_wanted(container, stream, wanted, index_of, rate, tb, start, seek_gap)
        except av.FFmpegError as exc:
            if not out:
                raise VideoError(f"{path}: corrupt video ({exc})") from exc
            log.warning("%s: decoding stopped early (%s); keeping %d frames", path, exc, len(out))
    finally:
        container.close()
    if not out:
        raise VideoError(f"{path}: no decodable frames (empty, truncated or corrupt video)")
    return out


def _avcc_disposable(data: bytes) -> bool:
    """True when an H.264 packet (length-prefixed NAL units, as in MP4) holds only non-reference slices
    (nal_ref_idc 0): no other frame is predicted from it, so it can be left undecoded."""
    i, vcl = 0, False
    n = len(data)
    while i + 5 <= n:
        size = int.from_bytes(data[i:i + 4], "big")
        header = data[i + 4]
        if header & 0x1F in (1, 5):  # coded slice
            if header >> 5 & 3:
                return False
            vcl = True
        i += 4 + size
    return vcl


def _decode_wanted(container, stream, wanted, index_of, rate, tb, start, seek_gap) -> list[tuple[int, np.ndarray]]:
    out: dict[int, np.ndarray] = {}
    wanted_set = set(wanted)
    ctx = stream.codec_context
    extradata = ctx.extradata or b""
    # MP4 H.264 with 4-byte NAL lengths (avcC): unwanted non-reference frames are skipped without decoding them
    can_skip = ctx.name == "h264" and len(extradata) > 4 and extradata[0] == 1 and extradata[4] & 3 == 3

    def frames():
        for packet in container.demux(stream):
            if (can_skip and packet.pts is not None and packet.size
                    and int(round(float((packet.pts - start) * tb * rate))) not in wanted_set
                    and _avcc_disposable(bytes(packet))):
                continue
            yield from packet.decode()

    pos = -1  # index of the last decoded frame
    decoded = None
    frame = None
    for target in wanted:
        if decoded is None or target - pos > seek_gap:
            if decoded is None and target > seek_gap:
                # decode the first frame before the first seek: some encodes (FF++'s) carry their parameter sets
                # in-band with the first keyframe only, and a decoder that starts at a later keyframe without
                # them returns grey garbage instead of the frame
                next(frames(), None)
            # seek to the keyframe at or before the target; decoding restarts there
            ts = int(start + target / (rate * tb)) if target > 0 else start
            container.seek(max(ts, start), stream=stream, backward=True, any_frame=False)
            decoded = frames()
            pos = -1
        while pos < target:
            frame = next(decoded, None)
            if frame is None:  # end of stream (or a truncated file): nothing more to find
                return sorted(out.items())
            pos = index_of(frame)
        # pos == target, or the stream skips that index: the first frame after it stands in
        if pos not in out:
            out[pos] = frame.to_ndarray(format="rgb24")
    return sorted(out.items())


def frames_at(path: str | Path, indices, seek_gap: int = 48) -> dict[int, np.ndarray]:
    """The RGB frames at exactly these indices, for a video aligned frame by frame with one already sampled (FF++'s
    mask videos and the originals of its fakes), decoded as `sample_frames` decodes. An index the video does not
    reach is absent from the result (never another frame standing in: that would misalign the pair)."""
    wanted = sorted({int(i) for i in indices})
    container = _open(path)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate or Fraction(25)
        tb = stream.time_base or Fraction(1, 90000)
        start = stream.start_time or 0

        def index_of(frame) -> int:
            return -1 if frame.pts is None else int(round(float((frame.pts - start) * tb * rate)))

        try:
            got = _decode_wanted(container, stream, wanted, index_of, rate, tb, start, seek_gap) if wanted else []
        except av.FFmpegError as exc:
            raise VideoError(f"{path}: corrupt video ({exc})") from exc
    finally:
        container.close()
    keep = set(wanted)
    return {i: frame for i, frame in got if i in keep}


def read_image(path: str | Path) -> np.ndarray:
    """An image file as RGB uint8 (H, W, 3); VideoError naming the file when it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise VideoError(f"{path}: unreadable image ({exc})") from exc


# libx264 settings that make an encode a function of its frames alone. Measured with PyAV 18's libx264 on an AVX-512
# CPU: one 32-frame 192 px clip encoded 10 times with the defaults gave 6 different streams, decoded frames up to 52
# grey levels apart. The cause is x264's AVX-512 code with macroblock-tree rate control (mbtree=0, or SIMD limited to
# AVX2, gives one stream; one thread alone still gives three). Limiting SIMD to SSE2 gives the bytes of x264's C
# code, so x86-64 machines with and without AVX-512, and other architectures (asm=0: the C code itself), write
# the same file; one thread, because x264's output depends on its thread count (the core count, by default).
X264_ASM = "SSE2" if platform.machine().lower() in ("x86_64", "amd64") else "0"
X264_OPTIONS = {"threads": "1", "x264-params": f"asm={X264_ASM}"}


def encode_h264(frames, out, fps: int = 25, crf: int = 23, preset: str = "fast", container: str | None = None) -> None:
    """Encode RGB uint8 frames of one size as H.264 (yuv420p, constant quality `crf`; FF++ "c23" is x264 at 23) into
    `out`, a path or a binary file object (`container` then names its format, e.g. "h264"). yuv420p needs even
    sides: an odd one is padded by repeating the edge. The same frames and settings give the same bytes on every
    run and machine (`X264_OPTIONS`)."""
    frames = list(frames)
    if not frames:
        raise ValueError(f"{out}: no frames to write")
    h, w = frames[0].shape[:2]
    ph, pw = h + h % 2, w + w % 2
    with av.open(str(out) if isinstance(out, Path) else out, mode="w", format=container) as muxer:
        stream = muxer.add_stream("libx264", rate=fps, options={"crf": str(int(crf)), "preset": preset, **X264_OPTIONS})
        stream.width, stream.height, stream.pix_fmt = pw, ph, "yuv420p"
        for i, arr in enumerate(frames):
            if (ph, pw) != (h, w):
                arr = np.pad(arr, ((0, ph - h), (0, pw - w), (0, 0)), mode="edge")
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(arr), format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                muxer.mux(packet)
        for packet in stream.encode():
            muxer.mux(packet)


def write_video(path: str | Path, frames, fps: int = 25, crf: int = 23, preset: str = "fast") -> Path:
    """`encode_h264` into a file, written to a temp name and renamed, so a killed run leaves no half-written video
    behind (only a `.<name>.tmp<pid>` file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    frames = list(frames)
    if not frames:
        raise ValueError(f"{path}: no frames to write")
    try:
        encode_h264(frames, tmp, fps, crf, preset)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
