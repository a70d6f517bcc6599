"""Untrusted uploads for `ltm serve`: what kind of media a body holds, and whether it may be decoded.

Every refusal is an `UploadError` with the HTTP status and a message that names the field or the limit:
    413  the body is over `max_bytes`; a picture or video frame over `max_pixels` (decompression bombs); a video over
         `max_video_frames`
    415  a declared type that is neither an image nor a video, or content whose first bytes are no known format
    400  empty, corrupt or truncated media, a multipart form without its `file` field

The type comes from the content's first bytes (the declared type can refuse, never admit): a client's file name or
Content-Type cannot route bytes to a decoder that was not made for them. The pixel and frame limits are checked on
the header alone (PIL's lazy open, the container's stream header) before any pixel is decoded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


class UploadError(ValueError):
    """A request refused because of its upload: `status` is the HTTP status, the message says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server (the `ltm serve` flags of the same names)."""

    max_bytes: int = 50_000_000
    max_pixels: int = 40_000_000  # per picture or video frame: 8K UHD is 33 MP
    max_video_frames: int = 18_000  # 10 minutes at 30 fps, as the video's header says
    frames: int = 32  # frames sampled per video (`ltm predict --frames`)


@dataclass(frozen=True)
class Media:
    kind: str  # image | video
    suffix: str  # how `ltm predict` would name such a file (its reader picks the decoder by suffix)
    format: str


# ISO base media brands that hold a still picture, not a video (HEIF/AVIF): refused rather than decoded as video
STILL_BRANDS = {b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1", b"avif", b"avis"}


def sniff(head: bytes) -> Media | None:
    """The media format of a body from its first bytes; None when it is none of the images and videos served."""
    if head.startswith(b"\xff\xd8\xff"):
        return Media("image", ".jpg", "JPEG")
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return Media("image", ".png", "PNG")
    if head.startswith(b"BM") and len(head) >= 26:
        return Media("image", ".bmp", "BMP")
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return Media("image", ".webp", "WebP")
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return Media("image", ".tif", "TIFF")
    if head[4:8] == b"ftyp":
        if head[8:12] in STILL_BRANDS:
            return None
        return Media("video", ".mp4", "MP4/QuickTime")
    if head[4:8] in (b"moov", b"mdat", b"wide", b"free", b"skip"):
        return Media("video", ".mov", "QuickTime")
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return Media("video", ".mkv", "Matroska/WebM")
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return Media("video", ".avi", "AVI")
    if head.startswith(b"FLV\x01"):
        return Media("video", ".flv", "FLV")
    if head.startswith(b"\x00\x00\x01\xba"):
        return Media("video", ".mpg", "MPEG-PS")
    if head.startswith(b"\x30\x26\xb2\x75\x8e\x66\xcf\x11"):
        return Media("video", ".wmv", "ASF/WMV")
    return None


SERVED = "JPEG, PNG, BMP, WebP, TIFF pictures; MP4/MOV, MKV/WebM, AVI, FLV, MPEG-PS, WMV videos"


def media_of(body: bytes, declared: str | None, field: str) -> Media:
    """What the body holds, or the 400/415 that refuses it. `declared`: the part's or the request's Content-Type."""
    if not body:
        raise UploadError(400, f"{field}: empty upload (send the picture or video as the request body or as the "
                               "multipart field `file`)")
    declared = (declared or "").split(";")[0].strip().lower()
    if declared and not declared.startswith(("image/", "video/")) and declared != "application/octet-stream":
        raise UploadError(415, f"{field}: declared type {declared!r} is not an image or a video (served: {SERVED})")
    media = sniff(body[:32])
    if media is None:
        raise UploadError(415, f"{field}: the content is no image or video format served (it starts with "
                               f"{body[:8]!r}; served: {SERVED})")
    return media


def check_image(path: Path, name: str, limits: Limits) -> None:
    """The picture's size from its header, against `max_pixels`, before a pixel is decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            width, height = im.size
    except Image.DecompressionBombError as exc:  # over PIL's own limit, which `ltm serve` keeps above ours
        raise UploadError(413, f"{name}: {without_path(str(exc), path)} (--max-pixels {limits.max_pixels})") from None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise UploadError(400, f"{name}: unreadable image ({without_path(str(exc), path)})") from None
    if width * height > limits.max_pixels:
        raise UploadError(413, f"{name}: picture of {width}x{height} = {width * height} pixels is over the limit "
                               f"of {limits.max_pixels} (--max-pixels)")


def check_video(path: Path, name: str, limits: Limits) -> tuple[int, float]:
    """The video's frame size and length from its header, against `max_pixels` and `max_video_frames`.
    Returns (frames, fps)."""
    from data_prep.video import VideoError, probe

    try:
        info = probe(path)
    except VideoError as exc:
        raise UploadError(400, f"{name}: {without_path(str(exc), path)}") from None
    if info.width * info.height > limits.max_pixels:
        raise UploadError(413, f"{name}: video frames of {info.width}x{info.height} = {info.width * info.height} "
                               f"pixels are over the limit of {limits.max_pixels} (--max-pixels)")
    if info.frames <= 0:
        raise UploadError(400, f"{name}: the video's header gives neither a frame count nor a duration")
    if info.frames > limits.max_video_frames:
        raise UploadError(413, f"{name}: video of {info.frames} frames is over the limit of "
                               f"{limits.max_video_frames} (--max-video-frames)")
    return info.frames, info.fps


def without_path(message: str, path: os.PathLike | str) -> str:
    """A decoder's message without the server-side temporary path it names."""
    text = message.replace(f"'{path}'", "the file").replace(str(path), "").lstrip(": ").strip()
    return text or message
