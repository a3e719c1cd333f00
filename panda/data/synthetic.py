"""The embedded default dataset: small generated videos with questions, in the real on-disk layout.

Two versions (``data.synthetic.version``):

**v2** (the default of ``train.py``, set in ``conf/data/synthetic.yaml``; the benchmark of
``experiments/ablations_v2``) — a coloured
circle or square moves in a straight line *inside* the frame, a small black dot sits in one
quadrant of it, and two corner lights flash one after the other.
Four question kinds, each with 4–6 answers, each needing a different part of STAB:

- ``colour`` (appearance, 6 answers): any one frame tells.
- ``direction`` (motion, 4 answers): only the change between frames tells. The object moves and
  the camera follows it, so the textured scene slides the other way. Every clip's object position
  at mid-clip is uniform in one box, whatever the direction, so the middle frame says nothing and
  the first and last frames little (``tests/test_synthetic_v2.py`` measures a single-frame probe).
- ``mark`` (detail, 4 answers): which quadrant of the object holds the dot — a few pixels inside
  one LSD window, which average pooling mixes with the rest of the object.
- ``order`` (temporal order, 4 answers): which corner lights first. One light flashes in the
  first half of the clip, the other in the second half, so the answer needs frames from both
  halves: at 8 sampled frames, from both STAB chunks.

**v3, the needle** (``data.synthetic.version=3``, or ``data=needle``: ``conf/data/needle.yaml``; the
benchmark of ``experiments/needle``) — a long clip (``num_frames``, e.g. 128) of a plain background
that drifts slowly in colour, where the frame flashes one colour once, for a few frames
(``needle_event``, 2–4), at a random time (``needle_scale`` < 1: a square of that colour at a random
place instead of the whole frame). Two question kinds:

- ``flash_colour`` (``needle_colours`` answers, 4): what colour the flash was.
- ``flash_half`` (2 answers): whether it came in the first or the second half of the clip (it lies
  wholly inside one half).

With the release's frame picks, 8 frames of a 128-frame clip catch the flash in 16% of clips, 32 frames
in 73%, 64 frames (every other frame) in all: accuracy follows how many frames (visual tokens) a run
affords.

**v1** (``data.synthetic.version=1``; the first study's benchmark, ``experiments/ablations_synthetic``):
a shape moving on a torus (wrapping around the edges); ``colour``, ``direction`` and (off by
default) ``shape``. ``SyntheticConfig``'s own defaults are v1's first-study settings (800 videos,
no question mix); ``train.py``'s default dataset is the yaml's (v2, docs/getting-started.md, "The synthetic default").

Files are written exactly as real data is laid out (docs/recipe-reference.md, "On-disk layout"; the held-out
split as in docs/recipe-reference.md, "Open-ended VideoQA")::

    ROOT/train/train_json/synthetic_train.json   Valley / Video-ChatGPT records (1 or several turns)
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
    "mark": ["Where is the black dot on the object?", "In which part of the shape is the dot?", "Where on the object is the small mark?"],
    "order": ["Which corner lights up first?", "Where does the first flash appear?", "In which corner is the first light?"],
    "flash_colour": ["What colour is the brief flash?", "Which colour does the brief flash have?",
                     "What colour was the short flash?"],
    "flash_half": ["In which half of the video is the flash?", "Is the flash in the first or the second half?",
                   "When does the brief flash happen?"],
}
QUESTION_TYPE = {"colour": "appearance", "shape": "appearance", "direction": "motion", "mark": "detail", "order": "order",
                 "flash_colour": "flash_colour", "flash_half": "flash_half"}
KINDS = {1: ("colour", "shape", "direction"), 2: ("colour", "direction", "mark", "order"), 3: ("flash_colour", "flash_half")}
QUADRANTS = {"top left": (-1, -1), "top right": (1, -1), "bottom left": (-1, 1), "bottom right": (1, 1)}
V2_SHAPES = ("circle", "square")  # the dot's quadrant centre lies inside both
LIGHT_RGB = (0, 230, 230)  # cyan: not an object colour
HALVES = ("first half", "second half")  # v3: where the flash is
# the answers each question kind can have (what _sample_clip returns for it; v3's colours are the first
# needle_colours of COLOURS)
ANSWERS = {"colour": list(COLOURS), "shape": list(SHAPES), "direction": list(DIRECTIONS),
           "mark": list(QUADRANTS), "order": list(QUADRANTS), "flash_colour": list(COLOURS), "flash_half": list(HALVES)}
NEEDLE_FIELDS = ("needle_side", "needle_event", "needle_colours", "needle_scale")  # v3's own settings (in the stamp of v3 roots only)


@dataclass
class SyntheticConfig:
    """What to generate (``data.synthetic`` in the config; ``data.root`` says where)."""

    train_videos: int = 800
    eval_videos: int = 120
    num_frames: int = 16  # frames written per video
    fps: int = 8
    seed: int = 0
    vocab_size: int = 400
    # 1: the first study's wrapping motion; 2: in-frame motion, dot, corner lights (the v2 study); 3: the needle
    # (one brief coloured flash in a long clip: conf/data/needle.yaml)
    version: int = 1
    # question kinds: v2 any of colour, direction, mark, order; v1 any of colour, direction, shape;
    # v3 any of flash_colour, flash_half
    kinds: list[str] = field(default_factory=lambda: ["colour", "direction"])
    multi_turn_fraction: float = 0.2  # videos whose questions form one multi-turn record
    phrasings: int = 3  # phrasings used per question kind (1..3)
    # v2 training clips only: each clip's travel is the benchmark's times a factor uniform in
    # [1, train_motion_scale] (held-out clips always use the benchmark's travel)
    train_motion_scale: float = 1.0
    camera_pan: float = 0.35  # v2: the camera follows the object ~this fraction of the shorter side over a clip
    # the question mix of the training records: the fraction of training videos asked each kind
    # (kinds not named: every video), e.g. {colour: 0.3}; held-out videos are asked every kind
    question_mix: dict[str, float] = field(default_factory=dict)
    needle_side: int = 112  # v3: the clips' side in pixels (square clips)
    needle_event: list[int] = field(default_factory=lambda: [2, 4])  # v3: the flash lasts [min, max] frames (uniform)
    needle_colours: int = 4  # v3: the flash's colour is one of the first N colours (red, green, blue, yellow, ...)
    # v3: the flash is a square whose side is a uniform fraction in [min, max] of the clip's side; [1, 1]: the
    # whole frame flashes (a square of 0.6-0.8 at 56 px was not learned in the needle study's pilot)
    needle_scale: list[float] = field(default_factory=lambda: [1.0, 1.0])

    def validate(self) -> None:
        if self.version not in KINDS:
            raise ValueError(f"data.synthetic.version={self.version}: use 1, 2 or 3")
        unknown = [k for k in self.kinds if k not in KINDS[self.version]]
        if unknown or not self.kinds:
            raise ValueError(f"data.synthetic.kinds={list(self.kinds)}: version {self.version} asks "
                             f"{', '.join(KINDS[self.version])}")
        for kind, fraction in self.question_mix.items():  # a kind the run does not ask is left unused
            if kind not in KINDS[self.version] or not 0 < fraction <= 1:
                raise ValueError(f"data.synthetic.question_mix.{kind}={fraction}: give a fraction in (0, 1] "
                                 f"for a question kind of version {self.version} ({', '.join(KINDS[self.version])})")
        if self.version == 3:
            event = list(self.needle_event)
            if len(event) != 2 or not 1 <= event[0] <= event[1] or 2 * event[1] > self.num_frames:
                raise ValueError(f"data.synthetic.needle_event={list(self.needle_event)}: give [min, max] frames, "
                                 f"1 <= min <= max <= half of data.synthetic.num_frames ({self.num_frames})")
            if not 2 <= self.needle_colours <= len(COLOURS):
                raise ValueError(f"data.synthetic.needle_colours={self.needle_colours}: give 2..{len(COLOURS)}")
            scale = list(self.needle_scale)
            if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
                raise ValueError(f"data.synthetic.needle_scale={scale}: give [min, max] fractions, 0 < min <= max <= 1")
            if self.needle_side < 16:
                raise ValueError(f"data.synthetic.needle_side={self.needle_side}: give at least 16 pixels")


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


def render_clip_v2(colour: str, shape: str, direction: str, mark: str, lights: tuple[str, str],
                   width: int, height: int, num_frames: int, rng, motion_scale: float = 1.0,
                   camera_pan: float = 0.0) -> np.ndarray:
    """(num_frames, height, width, 3) uint8 frames of the v2 clip (see the module docstring).

    - **Motion** stays inside the frame. The object's centre at mid-clip is uniform in one box,
      the same for all four directions, and it travels ``travel`` pixels over the clip (about a
      sixth of the frame's shorter side), so only the middle frame is fully silent about the
      direction and the end frames shift the box by ``travel / 2``.
    - **The camera follows** (``camera_pan``, a fraction of the shorter side over the clip): the frame
      is a moving window on a larger textured scene, which slides the other way through the frame.
      The texture is random, so no single frame says anything about the pan.
    - **The dot** (black, about a fifth of the object) sits at the centre of one quadrant.
    - **The lights** (cyan squares in two different corners): the first is on for the frames in
      ``[2, 7)`` of 16, the second in ``[9, 14)`` (scaled to ``num_frames``), so any sampling of ≥ 4
      frames sees each at least once, in order.
    """
    short = min(width, height)
    size = max(8, int(short * rng.uniform(0.24, 0.3)))
    travel = short * rng.uniform(0.15, 0.19) * motion_scale
    margin = 2 + size / 2 + travel / 2  # centre at mid-clip stays this far from every edge
    cx, cy = rng.uniform(margin, width - margin), rng.uniform(margin, height - margin)
    dx, dy = DIRECTIONS[direction]
    base = rng.integers(20, 90, size=3)
    pan = short * camera_pan * rng.uniform(0.85, 1.15)  # how far the camera follows the object, pixels over the clip
    margin_pan = int(np.ceil(pan)) + 2
    world_h, world_w = height + margin_pan, width + margin_pan
    blobs = rng.normal(0, 28, size=(world_h // 8 + 2, world_w // 8 + 2, 3))  # smooth texture the pan makes visible
    ys, xs = np.linspace(0, blobs.shape[0] - 1.001, world_h), np.linspace(0, blobs.shape[1] - 1.001, world_w)
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    smooth = ((1 - fy) * (1 - fx) * blobs[y0][:, x0] + (1 - fy) * fx * blobs[y0][:, x0 + 1]
              + fy * (1 - fx) * blobs[y0 + 1][:, x0] + fy * fx * blobs[y0 + 1][:, x0 + 1])
    world = np.clip(base + smooth + rng.normal(0, 12, size=(world_h, world_w, 3)), 0, 255)
    mask = _shape_mask(shape, size)
    rgb = np.array(COLOURS[colour], dtype=np.float64)
    dot = max(3, int(round(size / 5)))
    qx, qy = QUADRANTS[mark]
    dot_at = (int(round(size / 2 + qx * size / 4 - dot / 2)), int(round(size / 2 + qy * size / 4 - dot / 2)))
    light = max(6, int(round(short / 8)))
    inset = 3
    corners = {name: (inset if sx < 0 else width - inset - light, inset if sy < 0 else height - inset - light)
               for name, (sx, sy) in QUADRANTS.items()}
    scale = num_frames / 16
    on = [(int(2 * scale), int(7 * scale)), (int(9 * scale), int(14 * scale))]
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    middle = (num_frames - 1) / 2
    for t in range(num_frames):
        progress = (t - middle) / max(1, num_frames - 1)  # -1/2 .. 1/2
        x = int(round(cx + dx * travel * progress - size / 2))
        y = int(round(cy + dy * travel * progress - size / 2))
        # the camera moves with the object: the scene slides the other way through the frame
        wx, wy = int(round(margin_pan / 2 + dx * pan * progress)), int(round(margin_pan / 2 + dy * pan * progress))
        img = world[wy : wy + height, wx : wx + width].copy()
        region = img[y : y + size, x : x + size]
        region[mask] = rgb
        region[dot_at[1] : dot_at[1] + dot, dot_at[0] : dot_at[0] + dot] = 0
        for corner, (start, stop) in zip(lights, on):
            if start <= t < stop:
                lx, ly = corners[corner]
                img[ly : ly + light, lx : lx + light] = LIGHT_RGB
        frames[t] = img.astype(np.uint8)
    return frames


def render_needle(colour: str, start: int, length: int, side: int, num_frames: int, rng,
                  scale: tuple[float, float] = (1.0, 1.0)) -> np.ndarray:
    """(num_frames, side, side, 3) uint8 frames of a v3 clip: a dark background whose colour drifts
    slowly from one random shade to another over the clip (a fixed top-to-bottom shading on top),
    and one square of ``colour`` on it in frames ``[start, start + length)`` only, at one random
    place, its side a uniform fraction in ``scale`` of the clip's (1, the default: the whole frame
    flashes). The background stays below 100 in every channel and, in clips of 64 frames or more,
    changes by less than one level from one frame to the next, so the flash is the only event.
    Smooth frames encode small and decode fast."""
    first, last = rng.integers(25, 80, size=3), rng.integers(25, 80, size=3)
    shading = np.broadcast_to(np.linspace(0.85, 1.15, side)[:, None, None], (side, side, 1))
    size = min(side, max(4, int(round(side * rng.uniform(*scale)))))
    x, y = (int(v) for v in rng.integers(0, side - size + 1, size=2))
    rgb = np.array(COLOURS[colour], dtype=np.uint8)
    frames = np.empty((num_frames, side, side, 3), np.uint8)
    for t in range(num_frames):
        base = first + (last - first) * t / max(1, num_frames - 1)
        frames[t] = np.clip(base * shading, 0, 255).astype(np.uint8)
    frames[start : start + length, y : y + size, x : x + size] = rgb
    return frames


def _sample_needle(rng, cfg: SyntheticConfig) -> tuple[np.ndarray, dict[str, str]]:
    """One v3 clip: its frames and the answer to each question kind. The half is drawn first, then
    the flash's length and a start that keeps the whole flash inside that half."""
    colour = str(rng.choice(list(COLOURS)[: cfg.needle_colours]))
    half = int(rng.integers(2))
    low, high = cfg.needle_event
    length = int(rng.integers(low, high + 1))
    middle = cfg.num_frames // 2
    lo, hi = (0, middle - length) if half == 0 else (middle, cfg.num_frames - length)
    start = int(rng.integers(lo, hi + 1))
    frames = render_needle(colour, start, length, cfg.needle_side, cfg.num_frames, rng, tuple(cfg.needle_scale))
    return frames, {"flash_colour": colour, "flash_half": HALVES[half]}


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


def _sample_clip(rng, version: int, num_frames: int, motion_scale: float = 1.0, camera_pan: float = 0.0) -> tuple[np.ndarray, dict[str, str]]:
    """One clip of the given version: its frames and the answer to each question kind."""
    colour = str(rng.choice(list(COLOURS)))
    if version == 1:
        shape, direction, (w, h) = str(rng.choice(SHAPES)), str(rng.choice(list(DIRECTIONS))), SIZES[int(rng.integers(len(SIZES)))]
        frames = render_clip(colour, shape, direction, w, h, num_frames, rng)
        return frames, {"colour": colour, "shape": shape, "direction": direction}
    shape, direction = str(rng.choice(V2_SHAPES)), str(rng.choice(list(DIRECTIONS)))
    mark = str(rng.choice(list(QUADRANTS)))
    first, second = (str(c) for c in rng.choice(list(QUADRANTS), size=2, replace=False))
    w, h = SIZES[int(rng.integers(len(SIZES)))]
    frames = render_clip_v2(colour, shape, direction, mark, (first, second), w, h, num_frames, rng, motion_scale, camera_pan)
    return frames, {"colour": colour, "shape": shape, "direction": direction, "mark": mark, "order": first}


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
    cfg.validate()
    thinning = _thinning(cfg)
    stamp = _stamp(cfg, thinning)
    if _is_done(root, stamp):
        return root
    if os.path.exists(root):
        log.warning("%s holds a synthetic dataset made with other settings; regenerating", root)
    tmp = f"{root}.tmp{os.getpid()}"  # concurrent runs (a --multirun sweep) each write their own
    shutil.rmtree(tmp, ignore_errors=True)
    rng = np.random.default_rng(cfg.seed)  # one stream, drawn in this order: training clips, then held-out clips
    records = _write_train_split(cfg, rng, thinning, tmp)
    questions = _write_eval_split(cfg, rng, tmp)
    _write_tokenizer(cfg, tmp)
    with open(os.path.join(tmp, "DONE"), "w") as f:
        json.dump(stamp, f)
    if not _move_into_place(tmp, root, stamp):
        return root
    log.info("synthetic dataset: %d train records, %d eval questions under %s", len(records), len(questions), root)
    return root


def _thinning(cfg: SyntheticConfig) -> dict[str, float]:
    """The entries of ``question_mix`` that thin a kind the run asks (a fraction below 1): the rest
    change no record."""
    return {k: f for k, f in cfg.question_mix.items() if k in cfg.kinds and f < 1}


def _stamp(cfg: SyntheticConfig, thinning: dict[str, float]) -> dict:
    """What ``ROOT/DONE`` records: the settings and the generator's version (a data root made by an
    older generator, a tokenizer with an <image> entry and no newline, is made again). The mix is
    recorded as its ``thinning`` entries, so the same data has one stamp however the mix is spelled
    ({} in Python, colour=1.0 from Hydra, a kind the run does not ask). v3's own settings are left
    out of v1 and v2 stamps: they change nothing there, and roots made before v3 stay made."""
    settings = json.loads(json.dumps(asdict(cfg)))
    if cfg.version != 3:
        settings = {k: v for k, v in settings.items() if k not in NEEDLE_FIELDS}
    return {**settings, "question_mix": thinning, "generator": GENERATOR_VERSION}


def _write_train_split(cfg: SyntheticConfig, rng, thinning: dict[str, float], tmp: str) -> list[dict]:
    """The training clips (``train/synthetic/NNNNN.mp4``) and their records
    (``train/train_json/synthetic_train.json``) under ``tmp``; returns the records."""
    records = []
    for i in tqdm(range(cfg.train_videos), desc="synthetic train videos", leave=False):
        if cfg.version == 3:
            frames, answers = _sample_needle(rng, cfg)
        else:
            scale = rng.uniform(1.0, cfg.train_motion_scale) if cfg.version == 2 else 1.0  # v1: its original random stream
            frames, answers = _sample_clip(rng, cfg.version, cfg.num_frames, scale, cfg.camera_pan)
        rel = f"synthetic/{i:05d}.mp4"
        write_video(os.path.join(tmp, "train", rel), frames, cfg.fps)
        for g, group in enumerate(_question_groups(cfg, rng, thinning)):
            records.append({"id": f"synthetic_{i:05d}_{g}", "video": rel,
                            "conversations": _conversation(group, answers, cfg, rng)})
    os.makedirs(os.path.join(tmp, "train", "train_json"), exist_ok=True)
    with open(os.path.join(tmp, "train", "train_json", "synthetic_train.json"), "w") as f:
        json.dump(records, f, indent=1)
    return records


def _question_groups(cfg: SyntheticConfig, rng, thinning: dict[str, float]) -> list[list[str]]:
    """The question kinds one training video is asked, in a random order, grouped into records:
    Valley-style one-turn records (one per kind), or one Video-ChatGPT-style multi-turn record."""
    kinds = list(cfg.kinds)
    rng.shuffle(kinds)
    if thinning:  # drawn only when a mix thins an asked kind, so the random stream without one is as it was
        asked = [k for k in kinds if rng.random() < thinning.get(k, 1.0)]
        kinds = asked or [max(kinds, key=lambda k: thinning.get(k, 1.0))]  # every video is asked something
    return [kinds] if rng.random() < cfg.multi_turn_fraction else [[k] for k in kinds]


def _conversation(group: list[str], answers: dict[str, str], cfg: SyntheticConfig, rng) -> list[dict]:
    """One record's turns: a question of each kind in ``group`` and its answer; ``<video>`` goes
    before or after the first question."""
    conv = []
    for j, kind in enumerate(group):
        q = _question(kind, rng, cfg.phrasings)
        if j == 0:
            q = f"{q}\n<video>" if rng.random() < 0.3 else f"<video>\n{q}"  # <video> first or last
        conv += [{"from": "human", "value": q}, {"from": "gpt", "value": answers[kind]}]
    return conv


def _write_eval_split(cfg: SyntheticConfig, rng, tmp: str) -> list[dict]:
    """The held-out benchmark under ``tmp/eval/Synthetic_Zero_Shot_QA``: ``videos/eval_NNNNN.mp4``
    (the benchmark's travel: no motion scale), ``test_q.json`` and ``test_a.json`` with one question
    of every asked kind per video; returns the questions."""
    qa_dir = os.path.join(tmp, "eval", "Synthetic_Zero_Shot_QA")
    questions, answers_out = [], []
    for i in tqdm(range(cfg.eval_videos), desc="synthetic eval videos", leave=False):
        if cfg.version == 3:
            frames, answers = _sample_needle(rng, cfg)
        else:
            frames, answers = _sample_clip(rng, cfg.version, cfg.num_frames, 1.0, cfg.camera_pan)
        name = f"eval_{i:05d}"
        write_video(os.path.join(qa_dir, "videos", name + ".mp4"), frames, cfg.fps)
        for kind in cfg.kinds:
            answer = answers[kind]
            qid = f"{name}_{kind}"
            questions.append({"video_name": name, "question": _question(kind, rng, cfg.phrasings), "question_id": qid})
            answers_out.append({"answer": answer, "type": QUESTION_TYPE[kind], "question_id": qid})
    with open(os.path.join(qa_dir, "test_q.json"), "w") as f:
        json.dump(questions, f, indent=1)
    with open(os.path.join(qa_dir, "test_a.json"), "w") as f:
        json.dump(answers_out, f, indent=1)
    return questions


def _write_tokenizer(cfg: SyntheticConfig, tmp: str) -> None:
    """A BPE tokenizer (``tmp/tokenizer``) trained on the templates' system prompts, every question
    phrasing of the version's kinds and every answer."""
    from panda.data.conversation import TEMPLATES
    from panda.data.tokenizer import train_tokenizer

    texts = [t.system for t in TEMPLATES.values()] + ["USER: ASSISTANT:"]
    texts += [v for kind in KINDS[cfg.version] for v in QUESTIONS[kind]]  # v1: the tokenizer of its study
    texts += list(COLOURS) + list(SHAPES) + list(DIRECTIONS) + (list(QUADRANTS) if cfg.version == 2 else [])
    texts += list(HALVES) if cfg.version == 3 else []
    train_tokenizer(texts * 4, os.path.join(tmp, "tokenizer"), cfg.vocab_size)


def _move_into_place(tmp: str, root: str, stamp: dict) -> bool:
    """Move the finished dataset ``tmp`` to ``root``. False when another process finished the same
    dataset first (same settings, same seed: same data): its copy stays and ``tmp`` goes."""
    if _is_done(root, stamp):  # another process finished first: same seed, same data
        shutil.rmtree(tmp, ignore_errors=True)
        return False
    shutil.rmtree(root, ignore_errors=True)
    try:
        os.replace(tmp, root)
    except OSError:  # another process moved its copy in between: same settings, same data
        if not _is_done(root, stamp):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        return False
    return True
