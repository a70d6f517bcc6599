"""DALI pipelines over the shards: rank-sharded, weighted across sources, resumable, with eval metadata.

Each loader runs two DALI pipelines:

  read    `fn.readers.webdataset` per shard folder (with its `.idx`, `shard_id` = rank, `num_shards` = world size,
          shuffled in a buffer of `data.shuffle_buffer` samples), and for training a per-sample weighted choice
          between the sources (`fn.random.choice` + conditional selection). Outputs the encoded JPEG and the `cls`
          (and `json`) bytes; its `source_info()` names shard and key of every sample. Checkpointed
          (`enable_checkpointing`): its `checkpoint()` is the whole data order state.
  decode  external source -> `fn.decoders.image` ("mixed", i.e. nvJPEG, where CUDA exists; CPU otherwise) ->
          `fn.resize` only for samples whose stored size differs from `data.image_size` -> float CHW in [0, 1].
          Stateless, so it never needs restoring. For evaluation, `eval.perturb`'s per-crop perturbation runs
          between the decoder and the resize (`ltm.data.dali_perturb`); with an eval plan (`ltm.data.plan`:
          frames per video, video compression) the read side is the host reading the plan by index offsets.

Splitting them costs one copy of the encoded bytes (about 20 KB a sample) and buys two things: the loader state is
the read pipeline's checkpoint taken right after the batch it belongs to (the decode pipeline's prefetch cannot
run it ahead of what was handed out), and when a JPEG fails to decode the encoded batch is still in hand, so the
error names the shard and key (or, with `data.on_bad_sample: skip`, the batch is completed without it and the
decode pipeline rebuilt; nothing hangs).

Weighted sources: every source's reader advances one batch per step and each sample of the step takes source i
with probability w_i / sum(w) (`fn.random.choice`), selected before decoding, so only chosen samples are decoded.
Unchosen reads are dropped: a source with a small weight passes through its data faster than it is used, which
keeps the draw unbiased (each of its samples is equally likely to be used).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.pipeline import Pipeline
from nvidia.dali.plugin.pytorch import feed_ndarray
from nvidia.dali.tensors import TensorGPU

from data_prep import jpeg
from ltm.data import dali_perturb
from ltm.data.perturb import Perturbation
from ltm.data.plan import Item, MemberReader, ShareEvalLoader, compressed_frames, decode_jpeg, eval_share, parse_label
from ltm.data.reference import eval_pixels
from ltm.data.shards import ShardError, Source, rank_range, sample_ids
from ltm.data.state import check_state, loader_identity

log = logging.getLogger(__name__)

SEED_STRIDE = 7919  # distinct, reproducible reader seeds per (rank, source)


def decode_device(cfg, device: torch.device) -> str:
    """DALI decoder placement: "mixed" (nvJPEG) when CUDA exists and data.device allows, else "cpu"."""
    cuda = torch.cuda.is_available()
    if cfg.data.device == "gpu" and not cuda:
        raise ValueError("data.device=gpu but CUDA is not available here (use auto or cpu)")
    if cuda and device.type == "cuda":
        from ltm.env import EnvironmentMismatch, check_dali_serves_driver, driver_cuda

        try:  # one line before a GPU pipeline is built, not a CUDA error from inside DALI
            check_dali_serves_driver(driver=driver_cuda())
        except EnvironmentMismatch as exc:
            raise ValueError(str(exc)) from None
    return "mixed" if cuda and cfg.data.device in ("auto", "gpu") and device.type == "cuda" else "cpu"


def cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _paths(sources: list[Source]) -> tuple[list[str], list[str]]:
    tars = [str(s.tar) for src in sources for s in src.shards]
    idxs = [str(s.idx) for src in sources for s in src.shards]
    return tars, idxs


@pipeline_def(enable_conditionals=True)
def _read_train(sources: list[Source], rank: int, world: int, buffer: int, base_seed: int, skip: bool):
    reads = []
    for i, src in enumerate(sources):
        tars, idxs = _paths([src])
        reads.append(
            fn.readers.webdataset(
                paths=tars,
                index_paths=idxs,
                ext=["jpg", "cls"],
                missing_component_behavior="skip" if skip else "error",
                shard_id=rank,
                num_shards=world,
                random_shuffle=True,
                initial_fill=buffer,
                seed=base_seed + SEED_STRIDE * (rank * len(sources) + i) + 1,
                name=f"source{i}",
            )
        )
    jpg, cls = reads[0]
    if len(sources) > 1:
        w = np.asarray([s.weight for s in sources], dtype=np.float64)
        choice = fn.random.choice(
            len(sources), p=(w / w.sum()).tolist(), seed=base_seed + SEED_STRIDE * rank, name="pick"
        )
        for i in range(1, len(sources)):
            if choice == i:
                jpg, cls = reads[i]
    return jpg, cls


@pipeline_def
def _read_eval(sources: list[Source], rank: int, world: int, skip: bool):
    tars, idxs = _paths(sources)
    jpg, cls, meta = fn.readers.webdataset(
        paths=tars,
        index_paths=idxs,
        ext=["jpg", "cls", "json"],
        missing_component_behavior="skip" if skip else "error",
        shard_id=rank,
        num_shards=world,
        random_shuffle=False,
        pad_last_batch=True,  # the padding (repeats of the rank's last sample) is dropped by count
        name="eval",
    )
    return jpg, cls, meta


def decode_jpeg_node(jpg: Any, device: str) -> Any:
    """The decoder node of both decode pipelines: encoded JPEG -> uint8 HWC RGB, on `device` ("mixed" or "cpu").

    `jpeg_fancy_upsampling`: JPEGs with subsampled chroma (4:2:0, 4:2:2: what cameras, ffmpeg, OpenCV and PIL write
    by default; prep's shards are 4:4:4, so it changes nothing for them) need their chroma planes upsampled. The CPU
    decoder (libjpeg-turbo) always uses libjpeg's "fancy" (triangular) upsampling, and so does PIL in the reference
    loader (libjpeg's default); nvJPEG's default is a plainer upsampling (replicated chroma samples), which moves
    colours at every chroma edge. On, the mixed decoder upsamples as the other two do (DALI passes the flag to
    nvJPEG's CUDA and hardware decoders only; the CPU decoder ignores it), so a model scores the same pixels on a GPU
    and on a CPU.
    bench/gpu.py's agreement leg measures what remains (docs/gpu-check.md)."""
    return fn.decoders.image(jpg, device=device, output_type=types.RGB, jpeg_fancy_upsampling=True)


@pipeline_def(enable_conditionals=True)
def _decode(size: int, device: str):
    # no_copy: the fed arrays stay referenced by the pending _Batch until their iteration's outputs are taken
    jpg = fn.external_source(name="jpg", dtype=types.UINT8, ndim=1, no_copy=True)
    shape = fn.peek_image_shape(jpg)
    image = decode_jpeg_node(jpg, device)
    if (shape[0] != size) | (shape[1] != size):  # resize only samples not already stored at the training size
        image = fn.resize(image, size=[size, size], antialias=True)
    return fn.crop_mirror_normalize(image, dtype=types.FLOAT, output_layout="CHW", mean=[0.0], std=[255.0])


def _key(info: str) -> tuple[str, str]:
    """DALI's webdataset source info `<tar>:<offset>:<member>` -> (tar, key)."""
    tar, _, member = info.rsplit(":", 2)
    name = member.rsplit("/", 1)[-1]
    return tar, member[: len(member) - len(name)] + name.split(".", 1)[0]


def _to_torch(tensor_list: Any, device: torch.device) -> torch.Tensor:
    t = tensor_list.as_tensor()
    if isinstance(t, TensorGPU):
        out = torch.empty(t.shape(), dtype=torch.float32, device=device)
        feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(device))
        return out
    out = torch.from_numpy(np.array(t))  # a copy: DALI reuses its output buffers
    return out if device.type == "cpu" else out.pin_memory().to(device, non_blocking=True)


class _Batch:
    """One batch as read: encoded JPEGs, labels, per sample (tar, key) and json bytes, and the reader state after it."""

    def __init__(self, jpgs: list[np.ndarray], labels: list[float], where: list[tuple[str, str]], meta: list, state):
        self.jpgs, self.labels, self.where, self.meta, self.state = jpgs, labels, where, meta, state
        self.bad: list[str] = []  # errors of the samples dropped from it (on_bad_sample: skip)

    def drop(self, bad: set[int]) -> None:
        keep = [i for i in range(len(self.jpgs)) if i not in bad]
        self.jpgs, self.labels = [self.jpgs[i] for i in keep], [self.labels[i] for i in keep]
        self.where, self.meta = [self.where[i] for i in keep], [self.meta[i] for i in keep]


class _Decoder:
    """The decode pipeline, fed from `read()` (a _Batch, or None when the data ends) with `depth` batches in flight.

    Uses DALI's split `schedule_run()` / `outputs()` calls so that the last batches of a finite stream can be
    collected without scheduling more. When a JPEG fails to decode, the batches in flight are checked with PIL to
    name the bad samples; with on_bad == "skip" the failing batch is completed on the host without them and the
    pipeline is rebuilt around the batches it held.
    """

    def __init__(self, read, size: int, device: str, device_id: int | None, threads: int, depth: int, on_bad: str):
        self.read, self.size, self.device, self.device_id = read, size, device, device_id
        self.threads, self.depth, self.on_bad = threads, max(1, depth), on_bad
        self.pipe: Pipeline | None = None
        self.pending: deque[_Batch] = deque()
        self.max_batch = 0
        self.skipped = 0

    def _start(self, carry: list[_Batch]) -> bool:
        batches = list(carry)
        while len(batches) < self.depth and (b := self.read()) is not None:
            batches.append(b)
        if not batches:
            return False
        self.max_batch = max(self.max_batch, *(len(b.jpgs) for b in batches))
        self.pipe = self._pipeline(len(batches))
        self.pipe.build()
        for b in batches:
            self._feed(b)
            self.pending.append(b)
        self.pipe.schedule_run()
        return True

    def _pipeline(self, depth: int) -> Pipeline:
        """The decode pipeline for batches of up to `max_batch`, `depth` of them in flight."""
        return _decode(
            self.size,
            self.device,
            batch_size=self.max_batch,
            num_threads=self.threads,
            device_id=self.device_id,
            prefetch_queue_depth=depth,  # the first schedule_run() runs this many iterations
            exec_dynamic=False,  # the pipelined executor: ~15% less CPU per image than the dynamic one here
        )

    def _feed(self, b: _Batch) -> None:
        self.pipe.feed_input("jpg", b.jpgs)

    def _host_image(self, b: _Batch, i: int) -> torch.Tensor:
        """Sample i of a batch made on the host, as the pipeline would (uint8 CHW), for a batch it failed on."""
        return torch.from_numpy(decode_jpeg(b.jpgs[i].tobytes(), self.size, "")).permute(2, 0, 1)

    def next(self, out_device: torch.device) -> tuple[torch.Tensor, _Batch] | None:
        """Images of the next batch and the batch (its samples as decoded); None when the stream has ended."""
        if self.pipe is None and not self._start([]):
            return None
        try:
            (images,) = self.pipe.outputs()
            out = _to_torch(images, out_device)
        except RuntimeError as exc:
            return self._repair(exc, out_device)
        b = self._hand_out(self.pending.popleft())
        nb = self.read()
        if nb is not None:
            if len(nb.jpgs) > self.max_batch:
                raise ValueError(f"batch of {len(nb.jpgs)} exceeds the decode pipeline's {self.max_batch}")
            self._feed(nb)
            self.pending.append(nb)
            self.pipe.schedule_run()
        elif not self.pending:
            self.pipe = None
        return out, b

    def _hand_out(self, b: _Batch) -> _Batch:
        # skips are counted when the batch that lost them is handed out, so the count matches what was consumed
        for err in b.bad:
            self.skipped += 1
            log.warning("skipped bad sample (%d so far): %s", self.skipped, err)
        return b

    def _repair(self, exc: RuntimeError, out_device: torch.device) -> tuple[torch.Tensor, _Batch]:
        # An operator error leaves the pipeline unusable: rebuild it, after naming the bad samples with PIL.
        pending, self.pending, self.pipe = list(self.pending), deque(), None
        bad: dict[int, dict[int, str]] = {}  # pending batch -> sample index -> error
        for n, b in enumerate(pending):
            for i, (tar, key) in enumerate(b.where):
                try:
                    decode_jpeg(b.jpgs[i].tobytes(), self.size, f"shard {tar} key {key!r}")
                except ShardError as err:
                    bad.setdefault(n, {})[i] = str(err)
        errors = [e for per in bad.values() for e in per.values()]
        if not errors:
            raise RuntimeError(f"DALI decode pipeline failed and no sample in flight fails to decode alone: {exc}")
        if self.on_bad != "skip":
            raise ShardError("; ".join(dict.fromkeys(errors))) from exc
        for n, per in bad.items():
            pending[n].bad += list(per.values())
            pending[n].drop(set(per))
        first = self._hand_out(pending[0])
        images = [self._host_image(first, i) for i in range(len(first.jpgs))]
        out = torch.stack(images).float().div_(255.0) if images else torch.empty(0, 3, self.size, self.size)
        self._start([b for b in pending[1:] if b.jpgs])
        return out.to(out_device), first


def _labels(cls_list: Any, where: list[tuple[str, str]]) -> list[float]:
    labels = []
    for t, (tar, key) in zip(cls_list, where):
        raw = np.array(t).tobytes().strip()
        if raw not in (b"0", b"1"):
            raise ShardError(f"shard {tar} key {key!r}: cls must be ASCII 0 or 1, got {raw[:16]!r}")
        labels.append(float(raw == b"1"))
    return labels


class DaliTrainLoader:
    """Endless iterator of (images float32 (b,3,S,S) in [0,1], labels float32 (b,)) on `device`."""

    kind = "dali"

    def __init__(self, sources: list[Source], cfg, rank: int, world_size: int, device: torch.device, batch: int):
        self.sources, self.rank, self.world_size, self.device, self.batch = sources, rank, world_size, device, batch
        self.cfg = cfg
        for src in sources:
            lo, hi = rank_range(len(src), rank, world_size)
            if hi <= lo:
                raise ShardError(f"shard folder {src.folder}: {len(src)} samples cannot feed {world_size} ranks")
        self.decode = decode_device(cfg, device)
        self.batches = 0
        self.skipped = 0
        self._build(checkpoint=None)

    def _build(self, checkpoint: bytes | None) -> None:
        d = self.cfg.data
        device_id = cuda_index(self.device) if self.decode == "mixed" else None
        self.reader = _read_train(
            self.sources,
            self.rank,
            self.world_size,
            d.shuffle_buffer,
            d.seed,
            d.on_bad_sample == "skip",
            batch_size=self.batch,
            num_threads=1,
            device_id=None,
            prefetch_queue_depth=max(1, d.prefetch),
            enable_checkpointing=True,
            checkpoint=checkpoint,
            seed=d.seed + SEED_STRIDE * self.rank,
            exec_dynamic=False,
        )
        self.reader.build()
        self.decoder = _Decoder(
            self._read, d.image_size, self.decode, device_id, d.num_threads, d.prefetch, d.on_bad_sample
        )
        self.decoder.skipped = self.skipped
        self._state = checkpoint if checkpoint is not None else self.reader.checkpoint()

    def _read(self) -> _Batch:
        jpg, cls = self.reader.run()
        where = [_key(t.source_info()) for t in cls]
        b = _Batch([np.array(t) for t in jpg], _labels(cls, where), where, [None] * len(where), None)
        b.state = self.reader.checkpoint()  # the data order state once this batch has been handed out
        return b

    def __iter__(self) -> DaliTrainLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        images, b = self.decoder.next(self.device)
        self.skipped = self.decoder.skipped
        self._state = b.state
        self.batches += 1
        return images, torch.tensor(b.labels, dtype=torch.float32).to(self.device)

    def state_dict(self) -> dict:
        return {
            **loader_identity(self),
            "checkpoint": self._state,
            "batches": self.batches,
            "skipped": self.skipped,
        }

    def load_state_dict(self, state: dict) -> None:
        check_state(self, state)
        self.close()
        self.batches, self.skipped = state["batches"], state["skipped"]
        self._build(checkpoint=state["checkpoint"])

    def close(self) -> None:
        self.reader = None
        self.decoder = None


@pipeline_def(enable_conditionals=True)
def _decode_eval(size: int, device: str, perturb: Perturbation | None, raw: bool):
    """The eval decode pipeline: `_decode` with the per-crop perturbation between the decoder and the resize (the
    crop perturbed at its stored size); `raw`: the external source gives decoded uint8 HWC frames (the clips of
    video compression, made on the host) instead of JPEG bytes."""
    if raw:
        image = fn.external_source(name="jpg", dtype=types.UINT8, ndim=3, layout="HWC", no_copy=True)
        shape = image.shape()
        if device == "mixed":
            image = image.gpu()
    else:
        jpg = fn.external_source(name="jpg", dtype=types.UINT8, ndim=1, no_copy=True)
        shape = fn.peek_image_shape(jpg)
        image = decode_jpeg_node(jpg, device)
    if perturb is not None:
        image = dali_perturb.apply(perturb, image, shape, device == "mixed")
    if (shape[0] != size) | (shape[1] != size):
        image = fn.resize(image, size=[size, size], antialias=True)
    return fn.crop_mirror_normalize(image, dtype=types.FLOAT, output_layout="CHW", mean=[0.0], std=[255.0])


class _EvalDecoder(_Decoder):
    """The decode pipeline of evaluation: with a per-crop perturbation (fed its key-drawn inputs per batch), or
    over frames decoded on the host (`raw`)."""

    def __init__(self, read, cfg, device: str, device_id: int | None, perturb: Perturbation | None, raw: bool):
        d = cfg.data
        super().__init__(read, d.image_size, device, device_id, d.num_threads, d.prefetch, d.on_bad_sample)
        self.perturb, self.raw = perturb, raw

    def _pipeline(self, depth: int) -> Pipeline:
        return _decode_eval(self.size, self.device, self.perturb, self.raw, batch_size=self.max_batch,
                            num_threads=self.threads, device_id=self.device_id, prefetch_queue_depth=depth,
                            exec_dynamic=False)

    def _feed(self, b: _Batch) -> None:
        self.pipe.feed_input("jpg", b.jpgs)
        if self.perturb is None or self.perturb.kind not in dali_perturb.INPUTS:
            return
        sizes = []
        for j, (tar, key) in zip(b.jpgs, b.where):
            try:
                sizes.append(dali_perturb.stored_size(j, f"shard {tar} key {key!r}"))
            except ShardError:  # the decoder fails on it too, and the batch is repaired or the error named
                sizes.append((0, 0))
        where = [f"shard {tar} key {key!r}" for tar, key in b.where]
        for name, data in dali_perturb.feed(self.perturb, [key for _, key in b.where], sizes, where).items():
            self.pipe.feed_input(name, data)

    def _host_image(self, b: _Batch, i: int) -> torch.Tensor:
        if self.raw:
            return torch.from_numpy(jpeg.resize(b.jpgs[i], self.size)).permute(2, 0, 1)
        tar, key = b.where[i]
        return eval_pixels(b.jpgs[i].tobytes(), key, f"shard {tar} key {key!r}", self.size, self.perturb)

    def _repair(self, exc: RuntimeError, out_device: torch.device) -> tuple[torch.Tensor, _Batch]:
        if self.raw:  # the frames were decoded on the host: nothing a JPEG check could name
            raise RuntimeError(f"DALI eval pipeline failed on host-decoded frames: {exc}") from exc
        return super()._repair(exc, out_device)


class DaliEvalLoader(ShareEvalLoader):
    """Iterable of dicts `images, labels, keys, videos, methods`; each pass reads the rank's samples once.

    Without a plan (`ltm.data.plan`: no frame selection, no clip perturbation) DALI's webdataset reader reads the
    rank's contiguous range in stored order; with one, the rank's share of the plan is read on the host by the index
    offsets and fed to the decode pipeline (video compression: as frames decoded and compressed on the host).
    Per-crop perturbations run inside the decode pipeline (`ltm.data.dali_perturb`).
    """

    kind = "dali"

    def __init__(self, sources: list[Source], cfg, rank: int, world_size: int, device: torch.device, batch: int):
        self.sources, self.cfg, self.rank, self.world_size, self.device = sources, cfg, rank, world_size, device
        self.batch = batch
        self.share = eval_share(sources, cfg.eval, rank, world_size)
        self.decode = decode_device(cfg, device)
        self.skipped = 0
        # shard folder of each sample's tar, for samples whose json does not name dataset or method
        self._folder = {str(sh.tar): src.folder for src in sources for sh in src.shards}

    def _reader(self) -> Any:
        """read() -> the next _Batch of the rank's range in stored order (DALI's webdataset reader), or None."""
        d = self.cfg.data
        reader = _read_eval(
            self.sources,
            self.rank,
            self.world_size,
            d.on_bad_sample == "skip",
            batch_size=self.batch,
            num_threads=1,
            device_id=None,
            prefetch_queue_depth=max(1, d.prefetch),
            exec_dynamic=False,
        )
        reader.build()
        left = self.num_samples

        def read() -> _Batch | None:
            nonlocal left
            if left == 0:
                return None
            jpg, cls, meta = reader.run()
            n = min(self.batch, left)  # the rest of the rank's last batch is padding
            left -= n
            where = [_key(cls[i].source_info()) for i in range(n)]
            return _Batch(
                [np.array(jpg[i]) for i in range(n)],
                _labels([cls[i] for i in range(n)], where),
                where,
                [np.array(meta[i]).tobytes() for i in range(n)],
                None,
            )

        return read

    def _plan_batches(self, members: MemberReader) -> Iterator[_Batch]:
        """The rank's share of the plan in batches: JPEG bytes, or (video compression) decoded frames."""
        share = self.share.items()

        def batch_of(items: list[Item], data: list[np.ndarray]) -> _Batch:
            return _Batch(data, [parse_label(members.read(it.shard, it.index, "cls"), it.where) for it in items],
                          [(str(it.shard.tar), it.key) for it in items],
                          [members.read(it.shard, it.index, "json") if "json" in it.shard.members[it.index]
                           else None for it in items], None)

        if not self.share.clips:
            for i in range(0, len(share), self.batch):
                items = share[i:i + self.batch]
                yield batch_of(items, [np.frombuffer(members.read(it.shard, it.index, "jpg"), dtype=np.uint8)
                                       for it in items])
            return
        items, frames = [], []
        for it, frame, error in compressed_frames(share, self.share.plan, members, self.share.perturb,
                                                  self.cfg.data.on_bad_sample):
            if error is not None:
                self.host_skipped += 1
                log.warning("skipped bad sample (%d so far): %s", self.skipped + self.host_skipped, error)
                continue
            items.append(it)
            frames.append(np.ascontiguousarray(frame))
            if len(items) == self.batch:
                yield batch_of(items, frames)
                items, frames = [], []
        if items:
            yield batch_of(items, frames)

    def __iter__(self) -> Iterator[dict]:
        if self.num_samples == 0:
            return
        members = MemberReader()
        self.host_skipped = 0  # frames of compressed clips that failed to decode on the host (on_bad_sample: skip)
        if self.share.plan is None:
            read = self._reader()
        else:
            batches = self._plan_batches(members)

            def read() -> _Batch | None:
                return next(batches, None)

        device_id = cuda_index(self.device) if self.decode == "mixed" else None
        # a clip perturbation was applied on the host: the pipeline gets decoded frames and perturbs nothing
        clips = self.share.clips
        decoder = _EvalDecoder(read, self.cfg, self.decode, device_id, None if clips else self.share.perturb, raw=clips)
        decoder.skipped = self.skipped
        try:
            while (got := decoder.next(self.device)) is not None:
                images, b = got
                self.skipped = decoder.skipped + self.host_skipped
                if not b.jpgs:
                    continue
                ids = [sample_ids(meta, key, self._folder.get(tar, Path(tar).parent))
                       for (tar, key), meta in zip(b.where, b.meta)]
                yield {
                    "images": images,
                    "labels": torch.tensor(b.labels, dtype=torch.float32).to(self.device),
                    "keys": [i[0] for i in ids],
                    "videos": [i[1] for i in ids],
                    "methods": [i[2] for i in ids],
                }
            self.skipped = decoder.skipped + self.host_skipped
        finally:
            members.close()
