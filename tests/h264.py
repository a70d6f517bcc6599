"""H.264 at a CRF and back, written out with PyAV: the definition the `video` perturbation type is tested against
(libx264 without SIMD, one thread, preset medium, yuv420p)."""

from __future__ import annotations

import io

import numpy as np


def h264_roundtrip(frames: list[np.ndarray], crf: int) -> list[np.ndarray]:
    import av

    h, w = frames[0].shape[:2]
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="h264") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": str(crf), "preset": "medium", "threads": "1", "x264-params": "asm=0"}
        for i, frame in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(frame, format="rgb24")
            vf.pts = i
            for packet in stream.encode(vf):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    with av.open(io.BytesIO(buf.getvalue()), format="h264") as src:
        return [np.array(f.to_ndarray(format="rgb24")) for f in src.decode(video=0)]
