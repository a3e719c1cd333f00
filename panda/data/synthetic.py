"""The embedded default dataset: small generated videos of a moving shape, with questions.

Every video shows one coloured shape moving in a straight line over a textured background.
Two question kinds, each with >= 4 answers (chance <= 25%):

- appearance: the object's colour (6 choices) — answerable from any one frame;
- motion: its direction (left/right/up/down) — no single frame tells (see :func:`render_clip`).

The shape (4 kinds) varies as a nuisance factor. Shape *questions* exist (``QUESTIONS["shape"]``)
but are off by default (``SyntheticConfig.kinds``): at the default tiny sizes and CPU budget the
model stayed near chance on them (0.3–0.4 after 600 single-task steps), and they slowed the
learning of the other two.

Files are written exactly as real data is laid out (training.md §1 and §4)::

    ROOT/train/train_json/synthetic_train.json   Valley / Video-ChatGPT records (1 or 3 turns)
    ROOT/train/synthetic/NNNNN.mp4               H.264 mp4 files (several aspect ratios)
    ROOT/eval/Synthetic_Zero_Shot_QA/{test_q.json,test_a.json,videos/}
    ROOT/tokenizer/                              a BPE tokenizer trained on the dataset's text

Generation is seeded and cached: a finished dataset has ``ROOT/DONE`` and is reused.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field

import numpy as np
from tqdm import tqdm

log = logging.getLogger(__name__)

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 220, 40),
    "purple": (150, 60, 200),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle", "cross")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
SIZES = ((112, 112), (128, 96), (128, 72), (96, 128))  # (width, height): square, 4:3, 16:9, portrait

QUESTIONS = {
    "colour": ["What colour is the moving object?", "Which colour does the shape have?", "What is the colour of the object?"],
    "shape": ["What shape is the moving object?", "Which shape is shown in the video?", "What kind of shape moves here?"],
    "direction": ["In which direction does the object move?", "Where is the shape moving to?", "Which way does the object go?"],
}
QUESTION_TYPE = {"colour": "appearance", "shape": "appearance", "direction": "motion"}


@dataclass
class SyntheticConfig:
    """What to generate (``data.synthetic`` in the config; ``data.root`` says where)."""

    train_videos: int = 800
    eval_videos: int = 120
    num_frames: int = 16  # frames written per video
    fps: int = 8
    seed: int = 0
    vocab_size: int = 400
    kinds: list[str] = field(default_factory=lambda: ["colour", "direction"])  # question kinds; add "shape" for a harder task
    multi_turn_fraction: float = 0.2  # videos whose questions form one multi-turn record
    phrasings: int = 3  # phrasings used per question kind (1..3)


def _shape_mask(shape: str, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    c = size / 2
    if shape == "circle":
        return (yy - c) ** 2 + (xx - c) ** 2 <= (size / 2) ** 2
    if shape == "square":
        return np.ones((size, size), bool)
    if shape == "triangle":  # apex up
        return (yy >= size * 0.1) & (np.abs(xx - c) <= (yy / size) * c)
    if shape == "cross":
        bar = size / 6
        return (np.abs(yy - c) <= bar) | (np.abs(xx - c) <= bar)
    raise ValueError(shape)


def _paste(img: np.ndarray, mask: np.ndarray, rgb: np.ndarray, x: int, y: int) -> None:
    """Paste ``mask`` at (x, y) on a torus: what leaves one edge re-enters at the opposite one."""
    height, width = img.shape[:2]
    size = mask.shape[0]
    for oy in (-height, 0, height):
        for ox in (-width, 0, width):
            x0, y0 = x + ox, y + oy
            xa, ya, xb, yb = max(0, x0), max(0, y0), min(width, x0 + size), min(height, y0 + size)
            if xa < xb and ya < yb:
                region = img[ya:yb, xa:xb]
                region[mask[ya - y0 : yb - y0, xa - x0 : xb - x0]] = rgb


def render_clip(colour: str, shape: str, direction: str, width: int, height: int, num_frames: int, rng) -> np.ndarray:
    """(num_frames, height, width, 3) uint8 frames of one shape moving in a straight line.

    The motion wraps around the frame edges and starts at a uniformly random position, so no
    single frame says anything about the direction: only the change between frames does.
    """
    size = max(8, int(min(width, height) * rng.uniform(0.38, 0.48)))
    dx, dy = DIRECTIONS[direction]
    extent = width if dx else height
    speed = extent * rng.uniform(1 / 22, 1 / 16)  # pixels per frame; < extent/2 between sampled frames
    x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
    base = rng.integers(20, 90, size=3)
    background = np.clip(base + rng.normal(0, 12, size=(height, width, 3)), 0, 255)
    mask = _shape_mask(shape, size)
    rgb = np.array(COLOURS[colour], dtype=np.float64)
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    for t in range(num_frames):
        x = int(round(x0 + dx * speed * t)) % width
        y = int(round(y0 + dy * speed * t)) % height
        img = background.copy()
        _paste(img, mask, rgb, x, y)
        frames[t] = img.astype(np.uint8)
    return frames


def write_video(path: str, frames: np.ndarray, fps: int = 8, codec: str = "libx264", options: dict | None = None) -> None:
    """Write (T, H, W, 3) uint8 RGB frames to a video file with PyAV."""
    import av

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with av.open(path, "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = frames.shape[1], frames.shape[2]
        stream.pix_fmt = "yuv420p" if codec != "gif" else "rgb8"
        stream.options = options if options is not None else ({"crf": "12", "preset": "ultrafast"} if codec == "libx264" else {})
        for arr in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(arr), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _sample_clip(rng):
    return (
        str(rng.choice(list(COLOURS))),
        str(rng.choice(SHAPES)),
        str(rng.choice(list(DIRECTIONS))),
        SIZES[int(rng.integers(len(SIZES)))],
    )


def _question(kind: str, rng, phrasings: int = 3) -> str:
    return str(rng.choice(QUESTIONS[kind][:phrasings]))


GENERATOR_VERSION = 2


def _is_done(root: str, stamp: dict) -> bool:
    try:
        with open(os.path.join(root, "DONE")) as f:
            return json.load(f) == stamp
    except (OSError, ValueError):
        return False


def generate(cfg: SyntheticConfig, root: str) -> str:
    """Generate the dataset under ``root`` unless it is already there. Returns the absolute root."""
    root = os.path.abspath(root)
    # the generator's version: a data root made by an older generator (a tokenizer with an <image>
    # entry and no newline) is made again
    stamp = {**json.loads(json.dumps(asdict(cfg))), "generator": GENERATOR_VERSION}
    if _is_done(root, stamp):
        return root
    if os.path.exists(root):
        log.warning("%s holds a synthetic dataset made with other settings; regenerating", root)
    tmp = f"{root}.tmp{os.getpid()}"  # concurrent runs (a --multirun sweep) each write their own
    shutil.rmtree(tmp, ignore_errors=True)
    rng = np.random.default_rng(cfg.seed)
    records = []
    for i in tqdm(range(cfg.train_videos), desc="synthetic train videos", leave=False):
        colour, shape, direction, (w, h) = _sample_clip(rng)
        rel = f"synthetic/{i:05d}.mp4"
        write_video(os.path.join(tmp, "train", rel), render_clip(colour, shape, direction, w, h, cfg.num_frames, rng), cfg.fps)
        answers = {"colour": colour, "shape": shape, "direction": direction}
        kinds = list(cfg.kinds)
        rng.shuffle(kinds)
        # Valley-style one-turn records (one per question kind), or one Video-ChatGPT-style multi-turn record
        groups = [kinds] if rng.random() < cfg.multi_turn_fraction else [[k] for k in kinds]
        for g, group in enumerate(groups):
            conv = []
            for j, kind in enumerate(group):
                q = _question(kind, rng, cfg.phrasings)
                if j == 0:
                    q = f"{q}\n<video>" if rng.random() < 0.3 else f"<video>\n{q}"  # <video> first or last
                conv += [{"from": "human", "value": q}, {"from": "gpt", "value": answers[kind]}]
            records.append({"id": f"synthetic_{i:05d}_{g}", "video": rel, "conversations": conv})
    os.makedirs(os.path.join(tmp, "train", "train_json"), exist_ok=True)
    with open(os.path.join(tmp, "train", "train_json", "synthetic_train.json"), "w") as f:
        json.dump(records, f, indent=1)

    qa_dir = os.path.join(tmp, "eval", "Synthetic_Zero_Shot_QA")
    questions, answers_out = [], []
    for i in tqdm(range(cfg.eval_videos), desc="synthetic eval videos", leave=False):
        colour, shape, direction, (w, h) = _sample_clip(rng)
        name = f"eval_{i:05d}"
        write_video(os.path.join(qa_dir, "videos", name + ".mp4"), render_clip(colour, shape, direction, w, h, cfg.num_frames, rng), cfg.fps)
        answers = {"colour": colour, "shape": shape, "direction": direction}
        for kind in cfg.kinds:
            answer = answers[kind]
            qid = f"{name}_{kind}"
            questions.append({"video_name": name, "question": _question(kind, rng, cfg.phrasings), "question_id": qid})
            answers_out.append({"answer": answer, "type": QUESTION_TYPE[kind], "question_id": qid})
    with open(os.path.join(qa_dir, "test_q.json"), "w") as f:
        json.dump(questions, f, indent=1)
    with open(os.path.join(qa_dir, "test_a.json"), "w") as f:
        json.dump(answers_out, f, indent=1)

    from panda.data.conversation import TEMPLATES
    from panda.data.tokenizer import train_tokenizer

    texts = [t.system for t in TEMPLATES.values()] + ["USER: ASSISTANT:"]
    texts += [v for kind in QUESTIONS.values() for v in kind]
    texts += list(COLOURS) + list(SHAPES) + list(DIRECTIONS)
    train_tokenizer(texts * 4, os.path.join(tmp, "tokenizer"), cfg.vocab_size)
    with open(os.path.join(tmp, "DONE"), "w") as f:
        json.dump(stamp, f)
    if _is_done(root, stamp):  # another process finished first: same seed, same data
        shutil.rmtree(tmp, ignore_errors=True)
        return root
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp, root)
    log.info("synthetic dataset: %d train records, %d eval questions under %s", len(records), len(questions), root)
    return root
