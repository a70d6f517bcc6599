"""`ltm predict <video or image> --run R`: P(fake) per frame and for the file, optionally with attention pictures.

Inputs go through the same steps as the training data: frames decoded by data_prep (evenly spaced, PyAV), the
largest face detected and cut as data_prep cuts it (box enlarged `scale` times, square, `size` px), stored as JPEG
at prep's quality and decoded and resized by the eval loader's own function. The crop geometry (size, enlargement)
is read from the manifest of the run's training shards when it is there, so a model sees faces framed as in
training. The detector is picked per file (`Detectors.choose`): `--detector` when given, `none` for a file whose
frames are squares of exactly the crop size (a crop as prep writes it), else a real face detector, the manifest's
or MTCNN where the manifest says `none` (a run trained on pre-cropped faces still gets faces, not whole frames).

Folders among the inputs are searched recursively for videos and images; the results go to a CSV (path, P(fake),
frames scored, detector, error), where a file that cannot be decoded or shows no face gets its error and the
others are kept.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ltm.config import Config
from ltm.deploy.journal import Journal, merge_parts, parse_part, part_name, parts_dir, plural, write_rows

log = logging.getLogger(__name__)


@dataclass
class CropSettings:
    """The data_prep settings that decide what a face crop looks like (data_prep.pipeline.Settings' names)."""

    size: int = 224
    scale: float = 1.3
    quality: int = 95
    detector: str = "mtcnn"
    detector_model: str | None = None
    detect_side: int = 480
    min_face: int = 24
    threshold: float = 0.9
    source: str = "defaults"

    @classmethod
    def from_metadata(cls, meta: dict, path: str | os.PathLike) -> CropSettings:
        """The crop recipe an exported model file carries (`ltm export` copies it from the run's manifest)."""
        return cls(**meta["crop"], source=f"{path} (exported from {meta.get('crop_from')})")


@dataclass
class ScoreSettings:
    """How frames become a file's score: the model's input size, and the evaluation's batch, video aggregation and
    decision threshold (so that predict and `ltm eval` agree)."""

    image_size: int
    batch_size: int = 64
    video_agg: str = "mean"
    threshold: float = 0.5

    @classmethod
    def from_config(cls, cfg: Config) -> ScoreSettings:
        return cls(cfg.data.image_size, cfg.eval.batch_size, cfg.eval.video_agg, cfg.eval.threshold)

    @classmethod
    def from_metadata(cls, meta: dict) -> ScoreSettings:
        return cls(int(meta["image_size"]), 64, meta.get("video_agg", "mean"), float(meta.get("threshold", 0.5)))


@dataclass
class Prediction:
    file: str
    p_fake: float  # the frames' P(fake), aggregated as the evaluation does (eval.video_agg: mean, max or confident)
    frames: list[dict] = field(default_factory=list)  # {frame, p_fake, box}
    no_face: list[int] = field(default_factory=list)  # frame indices where no face was found
    pictures: list[str] = field(default_factory=list)
    detector: str = ""  # the detector that cut this file's faces (`none`: the frames were taken as crops)

    def to_dict(self) -> dict:
        return {"file": self.file, "p_fake": self.p_fake, "n_frames": len(self.frames), "detector": self.detector,
                "frames": self.frames, "no_face": self.no_face, "pictures": self.pictures}


def crop_settings(cfg: Config) -> CropSettings:
    """The prep settings recorded in the manifest of the first training shard folder's split, else defaults."""
    for source in cfg.data.train:
        folder = Path(source.path)
        if not folder.is_absolute() and not folder.exists():
            folder = Path(cfg.data.root) / folder
        manifest = folder.parent / "manifest.json"
        if manifest.is_file():
            try:
                stored = json.loads(manifest.read_text()).get("settings") or {}
            except (OSError, json.JSONDecodeError) as exc:
                log.warning("%s: unreadable (%s); using default crop settings", manifest, exc)
                break
            known = {k: v for k, v in stored.items() if k in CropSettings.__dataclass_fields__ and k != "source"}
            return CropSettings(**known, source=str(manifest))
    return CropSettings()


class Detectors:
    """The face detectors of one predict job, each built on first use, and the rule that picks one for a file."""

    def __init__(self, crop: CropSettings, asked: str | None = None, device: str = "cpu",
                 model_path: str | None = None):
        self.crop, self.asked, self.device = crop, asked, device
        self.model_path = model_path or crop.detector_model
        self._built: dict = {}

    def choose(self, frames: list[tuple[int, np.ndarray]]) -> str:
        """`--detector` when asked; `none` when every frame is a square of exactly the crop size (a face crop as
        prep writes it); else the manifest's detector, MTCNN where that is `none`: the manifest's `none` says the
        training inputs were crops, not that these inputs are."""
        if self.asked:
            return self.asked
        if frames and all(f.shape[0] == f.shape[1] == self.crop.size for _, f in frames):
            return "none"
        return self.crop.detector if self.crop.detector != "none" else "mtcnn"

    def get(self, name: str):
        if name not in self._built:
            from data_prep.faces import build_detector

            c = self.crop
            self._built[name] = build_detector(name, self.device, self.model_path, c.detect_side, c.min_face,
                                               c.threshold)
        return self._built[name]


def media_files(inputs: list[str]) -> tuple[list[str], list[Path]]:
    """(files to score, folders given): a folder stands for its videos and images, recursively, in sorted order."""
    from data_prep.video import IMAGE_EXTS, VIDEO_EXTS

    files, folders = [], []
    for item in inputs:
        path = Path(item)
        if not path.is_dir():
            files.append(item)
            continue
        found = sorted(str(p) for p in path.rglob("*")
                       if p.suffix.lower() in IMAGE_EXTS | VIDEO_EXTS and p.is_file() and not p.name.startswith("."))
        if not found:
            raise ValueError(f"{path}: no video or image files in this folder (looked for "
                             f"{', '.join(sorted(IMAGE_EXTS | VIDEO_EXTS))})")
        files += found
        folders.append(path)
    return files, folders


def write_csv(path: Path, results: list[tuple[str, Prediction | None, str | None]]) -> None:
    """One row per input file: path, p_fake, frames (scored), no_face (frames without one), detector, error;
    written to a temp name and renamed: a reader never sees half a table."""
    write_rows(path, [row_of(file, pred, error) for file, pred, error in results])


def read_frames(path: Path, n_frames: int | None) -> list[tuple[int, np.ndarray]]:
    from data_prep.video import IMAGE_EXTS, read_image, sample_frames

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix.lower() in IMAGE_EXTS:
        return [(0, read_image(path))]
    return sample_frames(path, n_frames)


def face_batch(frames: list[tuple[int, np.ndarray]], detector, crop: CropSettings, image_size: int):
    """Face crops as the model's input (B,3,S,S) in [0, 1]: prep's crop + JPEG, then the loader's decode + resize."""
    from data_prep.jpeg import decode_jpeg, jpeg_bytes

    faces = detector.crop([f for _, f in frames], crop.size, crop.scale)
    kept, boxes, no_face, images = [], [], [], []
    for (index, _), face in zip(frames, faces):
        if face is None:
            no_face.append(index)
            continue
        pixels = decode_jpeg(jpeg_bytes(face.crop, crop.quality), image_size)
        images.append(torch.from_numpy(pixels).permute(2, 0, 1).float().div(255.0))
        kept.append(index)
        boxes.append({"box": face.crop_box, "face": face.box})  # the square cut, and the face as detected
    batch = torch.stack(images) if images else torch.empty(0, 3, image_size, image_size)
    return batch, kept, boxes, no_face


def model_device(model) -> torch.device:
    device = getattr(model, "device", None)  # an ExportedModel says where it runs
    return device if isinstance(device, torch.device) else next(model.parameters()).device


@dataclass
class Faces:
    """The face crops of one file, as the model takes them, and where they came from."""

    images: torch.Tensor  # (N, 3, S, S) RGB in [0, 1], one crop per frame with a face
    kept: list[int]  # the frame index of each crop
    boxes: list[dict]  # {box: the square cut, face: the face as detected}, per crop
    no_face: list[int]  # frame indices without a face
    n_frames: int  # frames sampled
    detector: str


def find_faces(frames: list[tuple[int, np.ndarray]], detectors: Detectors, crop: CropSettings,
               image_size: int) -> Faces:
    """The largest face of each frame, cut by the detector `detectors.choose` picks (`ltm predict` and `ltm serve`)."""
    name = detectors.choose(frames)
    images, kept, boxes, no_face = face_batch(frames, detectors.get(name), crop, image_size)
    return Faces(images, kept, boxes, no_face, len(frames), name)


def score_faces(model, images: torch.Tensor, batch_size: int) -> list[float]:
    """`model.predict` over the crops in batches of `batch_size`: P(fake) per crop."""
    device = model_device(model)
    if len(images) == 0:
        return []
    with torch.inference_mode():
        return torch.cat([model.predict(images[i:i + batch_size].to(device)).float().cpu()
                          for i in range(0, len(images), batch_size)]).tolist()


def prediction(path: str, faces: Faces, probs: list[float], video_agg: str) -> Prediction:
    """A file's result from its crops' P(fake): the frames' scores and their aggregate as the evaluation makes it."""
    from ltm.eval.metrics import VIDEO_REDUCE

    result = Prediction(path, float(VIDEO_REDUCE[video_agg](probs)), no_face=faces.no_face, detector=faces.detector)
    result.frames = [{"frame": i, "p_fake": p, **b} for i, p, b in zip(faces.kept, probs, faces.boxes)]
    return result


def predict_file(
    path: str | os.PathLike,
    model,
    settings: ScoreSettings,
    detectors: Detectors,
    crop: CropSettings,
    n_frames: int | None = 32,
    heatmap_dir: str | os.PathLike | None = None,
) -> Prediction:
    """Score one video or image file with `model.predict` (a trained model or an `ExportedModel`); a file where no
    frame shows a face is an error naming it."""
    path = Path(path)
    faces = find_faces(read_frames(path, n_frames), detectors, crop, settings.image_size)
    if not faces.kept:
        raise ValueError(f"{path}: no face found in any of its {faces.n_frames} sampled frames "
                         f"(detector {faces.detector})")
    probs = score_faces(model, faces.images, settings.batch_size)
    result = prediction(str(path), faces, probs, settings.video_agg)
    if heatmap_dir is not None:
        result.pictures = write_heatmaps(Path(heatmap_dir), path, model, faces.images, faces.kept, probs,
                                         settings.batch_size)
    return result


def write_heatmaps(folder: Path, path: Path, model: nn.Module, images: torch.Tensor, kept: list[int],
                   probs: list[float], batch_size: int) -> list[str]:
    if not hasattr(model, "explain"):
        log.info("model kind %s has no teacher attention: no heatmaps written", type(model).__name__)
        return []
    from ltm.eval.report.files import plot_attention
    from ltm.files import safe_filename

    device = model_device(model)
    # FF++ names a video `<target>_<source>` in every method folder: the path's digest keeps their pictures apart
    tag = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]
    written = []
    for start in range(0, len(images), batch_size):
        out = model.explain(images[start:start + batch_size].to(device))
        for j in range(out["attention"].shape[0]):
            i = start + j
            name = folder / f"{safe_filename(path.stem)}_{tag}_frame{kept[i]:06d}.png"
            plot_attention(name, images[i], out["attention"][j].float().cpu(), out["mask"][j].float().cpu(),
                           f"{path.name} frame {kept[i]}: P(fake) = {probs[i]:.3f}")
            written.append(str(name))
    return written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+",
                        help="video or image files, or folders (every video and image under them, recursively)")
    parser.add_argument("--run", help="run folder (holds config.yaml and checkpoints/)")
    parser.add_argument("--model", help="an exported head (`ltm export`: .onnx or TorchScript .pt) instead of --run: "
                        "needs only `pip install 'ltm[predict]'`")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: checkpoints/latest)")
    parser.add_argument("--weights", default=None, help="a consolidated fp32 state-dict file instead of a tag")
    parser.add_argument("--frames", type=int, default=32, help="frames per video, evenly spaced (32; 0 = all)")
    parser.add_argument("--heatmap", metavar="DIR", default=None, help="write attention pictures into DIR")
    parser.add_argument("--detector", choices=["mtcnn", "yunet", "none"], default=None,
                        help="face detector for every input (default: `none` for a file whose frames are squares "
                             "of exactly the crop size, else the manifest's detector, mtcnn where that is `none`); "
                             "`none` when the inputs already are face crops")
    parser.add_argument("--detector-model", default=None, help="YuNet ONNX file for --detector yunet")
    parser.add_argument("--device", default="auto",
                        help="auto | cpu | cuda[:N] (under `accelerate launch` each rank uses its own GPU)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per file instead of text")
    parser.add_argument("--csv", metavar="FILE", default=None,
                        help="write one row per file (path, p_fake, frames, no_face, detector, error) to FILE "
                             "(default with a folder among the inputs: <run>/predict/<first folder's name>.csv)")
    parser.add_argument("--part", metavar="I/N", help="score only the I-th of N slices of the files (0-based; "
                        "files I, I+N, ...), resumably: one SLURM array task (`ltm submit predict`); needs a table")
    parser.add_argument("--merge", type=int, metavar="N", help="merge the N parts' tables into the --csv table "
                        "(input order, every file exactly once) and score nothing")
    parser.add_argument("overrides", nargs="*", default=[], help="config key=value overrides")


def run(args: argparse.Namespace) -> int:
    """Score the inputs with a run's checkpoint (`--run`) or an exported head (`--model`).

    With `--run` under `accelerate launch` (or any launcher's ranks) each process takes a share of the files and the
    main process prints every result in input order. With a table (a folder among the inputs, or --csv) a file that
    fails gets its error in the table and the others go on; the exit status is then 1. Without one, the first
    failing file (in input order) is the error."""
    from data_prep.video import VideoError

    if (args.run is None) == (args.model is None):
        raise ValueError("give --run RUN_FOLDER (a training run) or --model FILE (an `ltm export` file), one of them")
    files, folders = media_files(args.inputs)
    table = table_path(args, folders)
    if args.merge is not None:
        if table is None:
            raise ValueError("--merge needs the table: a folder among the inputs or --csv FILE")
        rows = merge_parts(table, files, args.merge)
        print(f"{table}: {plural(len(rows), 'file')} from {plural(args.merge, 'part')}, "
              f"{sum(1 for r in rows if r['error'])} failed")
        return 0
    if table is not None:
        _check_writable(table)  # before an hour of scoring, not after
    if args.part:
        if table is None:
            raise ValueError("--part needs a table: a folder among the inputs or --csv FILE")
        return score_part(args, files, table)
    # a table keeps going past any failing file (decoder errors included); one file at a time stops at it
    caught = Exception if table is not None else (ValueError, FileNotFoundError, VideoError)
    scored = _score_exported(args, files, caught) if args.model else _score_run(args, files, caught)
    if scored is None:  # a rank other than the main process
        return 0
    results, settings = scored
    failed = 0
    for _, pred, error in results:
        if error is not None:
            if table is None:
                raise ValueError(error)
            log.error("%s", error)
            failed += 1
            continue
        if args.json:
            print(json.dumps(pred.to_dict()))
            continue
        name = Path(pred.file).name
        if table is None:
            for f in pred.frames:
                print(f"{name}  frame {f['frame']:6d}  P(fake) {f['p_fake']:.4f}")
        if pred.no_face:
            print(f"{name}  no face in frames {pred.no_face}")
        verdict = "fake" if pred.p_fake >= settings.threshold else "real"
        print(f"{pred.file}: P(fake) = {pred.p_fake:.4f} ({settings.video_agg} of {plural(len(pred.frames), 'frame')}, "
              f"detector {pred.detector}) -> {verdict}")
        for p in pred.pictures:
            print(f"heatmap: {p}")
    if table is not None:
        write_csv(table, [(files[i], pred, error) for i, pred, error in results])
        print(f"{table}: {plural(len(results), 'file')}, {failed} failed")
    return 1 if failed else 0


Result = tuple[int, "Prediction | None", "str | None"]


def _score_one(i: int, path: str, model, settings: ScoreSettings, detectors: Detectors, crop: CropSettings,
               args: argparse.Namespace, caught) -> Result:
    try:
        return i, predict_file(path, model, settings, detectors, crop, args.frames or None, args.heatmap), None
    except caught as exc:  # reported in input order, after the files before it
        return i, None, str(exc) if str(exc).startswith(str(path)) else f"{path}: {type(exc).__name__}: {exc}"


def _log_setup(source: str, crop: CropSettings, args: argparse.Namespace) -> None:
    log.info("weights %s; crops %d px x%.2f (settings from %s), detector %s", source, crop.size, crop.scale,
             crop.source, args.detector or f"per file (none for {crop.size}x{crop.size} crops, else "
             f"{crop.detector if crop.detector != 'none' else 'mtcnn'})")


def _score_exported(args: argparse.Namespace, files: list[str], caught, on_result=None
                    ) -> tuple[list[Result], ScoreSettings]:
    """One process, onnxruntime or TorchScript: nothing of the training stack is imported. `on_result(file, pred,
    error)` is called as each file ends (the array mode's journal)."""
    from tqdm import tqdm

    from ltm.deploy.exported import ExportedModel

    if args.overrides or args.tag or args.weights:
        raise ValueError("--tag, --weights and config overrides go with --run; an exported model carries its weights "
                         "and settings")
    model = ExportedModel(args.model, args.device)
    crop = CropSettings.from_metadata(model.meta, args.model)
    settings = ScoreSettings.from_metadata(model.meta)
    detectors = Detectors(crop, args.detector, str(model.device), args.detector_model)
    _log_setup(f"{args.model} ({model.meta['head']} head, {model.format})", crop, args)
    bar = tqdm(list(enumerate(files)), desc="predict", unit="file", disable=len(files) < 2)
    results = []
    for i, path in bar:
        results.append(_score_one(i, path, model, settings, detectors, crop, args, caught))
        if on_result is not None:
            on_result(path, *results[-1][1:])
    return results, settings


def _score_run(args: argparse.Namespace, files: list[str], caught, on_result=None
               ) -> tuple[list[Result], ScoreSettings] | None:
    from accelerate.utils import gather_object
    from tqdm import tqdm

    from ltm.checkpoint.reader import load_model
    from ltm.eval.evaluate import scoring_accelerator

    model, cfg, source = load_model(args.run, args.tag, args.weights, args.overrides, "cpu")
    settings = ScoreSettings.from_config(cfg)
    with scoring_accelerator(cfg.train.precision, args.device, cfg.eval.timeout_min) as accelerator:
        model = accelerator.prepare_model(model, evaluation_mode=True)  # this rank's device, no DDP wrapper
        crop = crop_settings(cfg)
        detectors = Detectors(crop, args.detector, str(accelerator.device), args.detector_model)
        _log_setup(source, crop, args)
        with accelerator.split_between_processes(list(enumerate(files))) as share, accelerator.autocast():
            bar = tqdm(share, desc="predict", unit="file", disable=not accelerator.is_main_process or len(files) < 2)
            mine = []
            for i, path in bar:
                mine.append(_score_one(i, path, model, settings, detectors, crop, args, caught))
                if on_result is not None:  # array mode: one process per task, so this is the only rank
                    on_result(path, *mine[-1][1:])
        results = sorted(gather_object(mine), key=lambda r: r[0])
        if not accelerator.is_main_process:
            return None
    return results, settings


def table_path(args: argparse.Namespace, folders: list[Path]) -> Path | None:
    """`--csv`, else with a folder among the inputs `<run or model's folder>/predict/<folder name>.csv`: beside
    `ltm eval`'s reports, not in the data folder (often read-only or shared)."""
    if args.csv:
        return Path(args.csv)
    if not folders:
        return None
    base = Path(args.run) if args.run else Path(args.model).parent
    return base / "predict" / f"{folders[0].resolve().name or 'root'}.csv"


def row_of(file: str, pred: Prediction | None, error: str | None) -> dict:
    if pred is None:
        return {"path": file, "p_fake": "", "frames": 0, "no_face": "", "detector": "", "error": error}
    return {"path": file, "p_fake": f"{pred.p_fake:.6f}", "frames": len(pred.frames), "no_face": len(pred.no_face),
            "detector": pred.detector, "error": ""}


def score_part(args: argparse.Namespace, files: list[str], table: Path) -> int:
    """Score slice I of N (files I, I+N, ...) with its journal (`ltm.deploy.journal`); exit 0 once the slice is
    done, failed files being rows with their error (a task that failed would keep the merge job from running)."""
    i, n = parse_part(args.part)
    mine = files[i::n]
    folder = parts_dir(table)
    folder.mkdir(parents=True, exist_ok=True)
    journal = Journal(folder / f"{part_name(i, n)}.jsonl")
    todo = [f for f in mine if f not in journal.done]
    log.info("part %d of %d: %d files, %d already scored (%s), %d to score", i, n, len(mine), len(mine) - len(todo),
             journal.path, len(todo))
    if todo:
        args = argparse.Namespace(**{**vars(args), "heatmap": None})
        with journal:
            def record(file: str, pred: Prediction | None, error: str | None) -> None:
                row = row_of(file, pred, error)
                journal.record(row)
                log.info("%s: %s", file, row["error"] or f"P(fake) {row['p_fake']}")

            if args.model:
                _score_exported(args, todo, Exception, on_result=record)
            else:
                _score_run(args, todo, Exception, on_result=record)
    rows = [journal.done[f] for f in mine]
    table_of_part = folder / f"{part_name(i, n)}.csv"
    write_rows(table_of_part, rows)
    failed = sum(1 for r in rows if r["error"])
    print(f"{table_of_part}: part {i} of {n}, {plural(len(rows), 'file')}, {failed} failed")
    return 0


def _check_writable(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as exc:
        raise ValueError(f"{path}: cannot write the predictions table there ({exc}; pass --csv FILE)") from exc
