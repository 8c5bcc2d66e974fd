"""Synthetic long-video QA: seeded clips with short coloured "needle" events among grey distractors.

Why one file of ~900 lines: the scene, the video writer and the question planner share one seed
discipline and one vocabulary (`VOCAB_TEXTS`), and the tests check them together; apart they would
each import the other two.

Used to train the bundled tiny Qwen2.5-VL demo model and by the offline benchmark, so everything runs
on CPU with no downloads. A scene is a drifting grey texture with a slow light gradient and film grain,
grey shapes that wander across the picture, and grey shapes that flash for a few frames (distractor
events: "something appeared" is never evidence by itself, only colour is). Needles are short events
(default 4-8 frames) of a saturated shape: 4 colours x 4 shapes, at a seeded place and time.

Questions come from fixed templates with a small vocabulary (`VOCAB_TEXTS` covers them all, for the
tiny tokenizer): what appeared (colour, shape, or "colour shape"), which of two needles came first,
and how many times a colour appeared (1-4). The benchmark's task families (`TASKS`, `plan_task`,
`TASK_DEFAULTS`: colour, shape, count, order, large) build on these; see their section. Each has a multiple-choice form (4 options, letters A-D,
the correct letter's position drawn from the seed) and an open form (the answer word(s)).

Determinism: everything depends only on the arguments and the seed. The background and distractors of
a scene depend on (seed, size, num_frames) only, never on the needles, so the same seed with and without
a needle gives the same clip apart from the needle (handy for contrastive training). Frames are a pure
function of the frame index, so chunked generation gives the same bytes for any chunk size.

Units: frames are RGB uint8 [T, H, W, 3]; needle x, y are the centre column and row in pixels, `size`
the side of its bounding box; `frame_end` is exclusive (the needle is drawn on range(start, end)).
With Qwen2.5-VL's 28x28-pixel tokens, the default 112x112 frame is 4x4 = 16 tokens per 2-frame slice,
and a default needle (32-48 px) covers parts of 2x2 to 3x3 tokens.
"""
from __future__ import annotations

import io
import os
from dataclasses import asdict, dataclass
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

# --- vocabulary -------------------------------------------------------------------------------------

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 50),
    "blue": (35, 70, 230),
    "yellow": (235, 210, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
LETTERS: tuple[str, ...] = ("A", "B", "C", "D")
KINDS: tuple[str, ...] = ("what", "order", "count")
FORMS: tuple[str, ...] = ("mc", "open")
ATTRIBUTES: tuple[str, ...] = ("colour", "shape", "both")  # what a "what" question asks for
COUNTS: tuple[str, ...] = ("1", "2", "3", "4")

# Same layout as adapttoken.question.Question.prompt_text (lmms-eval's VideoMME layout).
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."

TEMPLATES: dict[str, str] = {
    "what/colour": "What colour was the object that appeared in the video?",
    "what/shape": "What shape was the coloured object that appeared in the video?",
    "what/both": "What coloured object appeared in the video?",
    "order": "Which appeared first in the video, the {a} object or the {b} object?",
    "count": "How many times did a {colour} object appear in the video?",
}

# --- defaults ---------------------------------------------------------------------------------------

DEFAULT_SIZE = (112, 112)        # (H, W): 4x4 Qwen tokens of 28x28 px per 2-frame slice
DEFAULT_FPS = 8.0                # 10,000 frames = 20.8 minutes: a "long video" with 0.5-1 s needles
DEFAULT_NEEDLE_LEN = (4, 8)      # frames per needle event, inclusive range
DEFAULT_NEEDLE_SIZE = (32, 48)   # px, inclusive range: larger than one 28 px token
DEFAULT_CODEC = "libx264"        # fast to write and to decode; "mpeg4" is the fallback
DEFAULT_CRF = 12                 # near-lossless at this size: colours come back within a few levels
DEFAULT_GOP = 64                 # keyframe every 8 s at 8 fps: cheap seeks for sparse sampling
DEFAULT_FLASH_RATE = 1 / 48      # grey distractor events per frame
MIN_GAP = 2                      # frames between two needle events


@dataclass(frozen=True)
class Needle:
    """One evidence event: a `colour` `shape` centred at (x, y), `size` px, on frames [start, end)."""
    frame_start: int
    frame_end: int
    colour: str
    shape: str
    x: int
    y: int
    size: int

    @property
    def rgb(self) -> tuple[int, int, int]:
        return COLOURS[self.colour]

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(y0, y1, x0, x1) of the bounding box, end-exclusive."""
        y0, x0 = self.y - self.size // 2, self.x - self.size // 2
        return y0, y0 + self.size, x0, x0 + self.size

    def mask(self) -> np.ndarray:
        """Bool [size, size] mask of the shape inside its box."""
        return shape_mask(self.shape, self.size)

    def tokens(self, token_px: int = 28) -> list[tuple[int, int]]:
        """(row, col) of the token cells the shape touches, for a frame cut into token_px squares."""
        y0, _, x0, _ = self.box
        ys, xs = np.nonzero(self.mask())
        cells = {((y0 + y) // token_px, (x0 + x) // token_px) for y, x in zip(ys.tolist(), xs.tolist())}
        return sorted(cells)


@dataclass(frozen=True)
class Question:
    """kind: what/order/count; options: 4 for multiple choice, () for open; answer: the letter (MC) or
    the word(s) (open); answer_text: the answer as words in both forms. `attribute` only for "what"."""
    kind: str
    text: str
    options: tuple[str, ...]
    answer: str
    answer_text: str
    attribute: str | None = None

    @property
    def form(self) -> str:
        return "mc" if self.options else "open"

    def prompt_text(self) -> str:
        """The user text after the video, laid out as the model adapters lay out their Question."""
        if not self.options:
            return self.text
        opts = "\n".join(f"{L}. {o}" for L, o in zip(LETTERS, self.options))
        return f"{self.text}\n{opts}\n{MC_INSTRUCTION}"


@dataclass
class Sample:
    """A written synthetic video with its needles and questions."""
    video_path: str
    num_frames: int
    fps: float
    needles: list[Needle]
    questions: list[Question]
    seed: int = 0
    size: tuple[int, int] = DEFAULT_SIZE

    def to_dict(self) -> dict:
        d = asdict(self)
        d["size"] = list(self.size)
        for q in d["questions"]:
            q["options"] = list(q["options"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Sample":
        return cls(video_path=d["video_path"], num_frames=int(d["num_frames"]), fps=float(d["fps"]),
                   needles=[Needle(**n) for n in d["needles"]],
                   questions=[Question(**{**q, "options": tuple(q["options"])}) for q in d["questions"]],
                   seed=int(d.get("seed", 0)), size=tuple(d.get("size", DEFAULT_SIZE)))


# --- shapes -----------------------------------------------------------------------------------------

@lru_cache(maxsize=512)
def _shape_mask(shape: str, size: int) -> np.ndarray:
    c = (size - 1) / 2
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    if shape == "circle":
        m = (yy - c) ** 2 + (xx - c) ** 2 <= (size / 2) ** 2
    elif shape == "square":
        m = np.ones((size, size), bool)
    elif shape == "triangle":  # apex up, base at the bottom row
        half = (yy + 0.5) / size * (size / 2)
        m = np.abs(xx - c) <= half
    elif shape == "cross":  # plus sign, arms a third of the side thick
        t = max(1.0, size / 3) / 2
        m = (np.abs(yy - c) <= t) | (np.abs(xx - c) <= t)
    else:
        raise ValueError(f"shape {shape!r}: use one of {', '.join(SHAPES)}")
    m.flags.writeable = False
    return m


def shape_mask(shape: str, size: int) -> np.ndarray:
    """Bool [size, size] mask of `shape` (one of SHAPES) filling a size x size box."""
    return _shape_mask(shape, int(size))


# --- scenes -----------------------------------------------------------------------------------------

def _check_seed(seed: int) -> int:
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed {seed!r}: use an integer >= 0")
    return int(seed)


def _smooth_noise(rng: np.random.Generator, h: int, w: int, scale: float) -> np.ndarray:
    """Periodic smooth noise (unit std) with features about `scale` px wide: low-passed white noise."""
    f = np.fft.fft2(rng.standard_normal((h, w)))
    fy, fx = np.fft.fftfreq(h)[:, None], np.fft.fftfreq(w)[None, :]
    f *= np.exp(-((fy ** 2 + fx ** 2) * (np.pi * scale) ** 2) / 2)
    n = np.fft.ifft2(f).real
    return (n - n.mean()) / (n.std() + 1e-9)


def _bounce(p0: np.ndarray, v: np.ndarray, ts: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Positions in [0, hi] of points moving at v and bouncing off both walls: [n_points, n_times]."""
    span = np.maximum(hi, 1)[:, None]
    u = np.mod(p0[:, None] + v[:, None] * ts[None, :], 2 * span)
    return np.rint(np.where(u <= span, u, 2 * span - u)).astype(np.int64)


class Scene:
    """The frames of one synthetic video as a pure function of the frame index.

    Background and distractors come from (seed, size, num_frames); `needles` are drawn on top.
    distractors=False leaves only the background (and the needles). grain > 0 adds per-frame noise of
    that amplitude (off by default: it triples the file size and doubles decode time); the texture's
    own fine noise drifts with it.
    """

    def __init__(self, num_frames: int, seed: int, size: tuple[int, int] = DEFAULT_SIZE,
                 needles: Sequence[Needle] = (), *, distractors: bool = True,
                 flash_rate: float = DEFAULT_FLASH_RATE, drift: tuple[float, float] = (0.15, 0.5),
                 grain: int = 0):
        self.num_frames = int(num_frames)
        if self.num_frames < 1:
            raise ValueError(f"num_frames {num_frames}: use at least 1")
        self.seed = _check_seed(seed)
        H, W = self.size = (int(size[0]), int(size[1]))
        if H < 56 or W < 56:
            raise ValueError(f"size {size}: use at least 56x56 so a needle fits")
        self.needles = sorted(needles, key=lambda n: (n.frame_start, n.frame_end))
        for n in self.needles:
            y0, y1, x0, x1 = n.box
            if n.colour not in COLOURS or n.shape not in SHAPES:
                raise ValueError(f"needle {n}: colour must be one of {list(COLOURS)}, shape one of {SHAPES}")
            if y0 < 0 or x0 < 0 or y1 > H or x1 > W:
                raise ValueError(f"needle {n} does not fit in a {H}x{W} frame")
            if not 0 <= n.frame_start < n.frame_end <= self.num_frames:
                raise ValueError(f"needle {n}: frames must lie within 0..{self.num_frames}")
        rng = np.random.default_rng([self.seed, 0x5CE4E])

        # Background: drifting periodic texture, slow rotating light gradient, low tint, grain pool.
        self._th, self._tw = 2 * H, 2 * W
        tex = _smooth_noise(rng, self._th, self._tw, 10.0) + 0.35 * _smooth_noise(rng, self._th, self._tw, 2.0)
        mean = rng.uniform(95, 145)
        tex = mean + 24 * tex + rng.uniform(-6, 6, tex.shape)  # fine noise moves with the texture
        tex = np.clip(tex, 15, 240).astype(np.int16)
        self._tex = np.tile(tex, (2, 2))
        speed = rng.uniform(*drift)
        ang = rng.uniform(0, 2 * np.pi)
        self._vel = (speed * np.sin(ang), speed * np.cos(ang))
        self._tint = rng.integers(-8, 9, size=3).astype(np.int16)
        self._grad_amp = rng.uniform(10, 25)
        self._grad_phase = rng.uniform(0, 2 * np.pi)
        self._grad_omega = 2 * np.pi / rng.uniform(300, 900)
        self._bright_amp = rng.uniform(0, 10)
        self._bright_omega = 2 * np.pi / rng.uniform(200, 600)
        ys, xs = np.linspace(-1, 1, H, dtype=np.float32), np.linspace(-1, 1, W, dtype=np.float32)
        self._gy, self._gx = ys[:, None], xs[None, :]
        self._grain = rng.integers(-grain, grain + 1, size=(7, H, W)).astype(np.int16) if grain > 0 else None

        # Distractors: wandering grey blobs, and grey shapes that flash for a few frames.
        nb = int(rng.integers(2, 5)) if distractors else 0
        self._blob_shape = [SHAPES[i] for i in rng.integers(0, len(SHAPES), nb)]
        self._blob_size = rng.integers(10, 23, nb)
        self._blob_grey = rng.integers(35, 215, nb)
        self._blob_p0 = np.stack([rng.uniform(0, H - self._blob_size), rng.uniform(0, W - self._blob_size)]) if nb \
            else np.zeros((2, 0))
        sp, an = rng.uniform(0.3, 1.5, nb), rng.uniform(0, 2 * np.pi, nb)
        self._blob_v = np.stack([sp * np.sin(an), sp * np.cos(an)]) if nb else np.zeros((2, 0))
        nf = int(rng.poisson(flash_rate * self.num_frames)) if distractors and flash_rate > 0 else 0
        lens = rng.integers(DEFAULT_NEEDLE_LEN[0], DEFAULT_NEEDLE_LEN[1] + 1, nf)
        starts = rng.integers(0, np.maximum(self.num_frames - lens, 0) + 1)
        sizes = rng.integers(DEFAULT_NEEDLE_SIZE[0], DEFAULT_NEEDLE_SIZE[1] + 1, nf)
        sizes = np.minimum(sizes, min(H, W))
        self._flashes = sorted(
            (int(s), int(min(s + ln, self.num_frames)), SHAPES[int(k)], int(y), int(x), int(sz), int(g))
            for s, ln, k, y, x, sz, g in zip(
                starts, lens, rng.integers(0, len(SHAPES), nf),
                rng.integers(0, H - sizes + 1), rng.integers(0, W - sizes + 1), sizes,
                rng.choice(np.r_[np.arange(25, 80), np.arange(170, 235)], nf)))

    @property
    def flashes(self) -> list[tuple[int, int, str, int, int, int, int]]:
        """Grey distractor events: (start, end, shape, y0, x0, size, grey)."""
        return list(self._flashes)

    def render(self, t0: int, t1: int) -> np.ndarray:
        """Frames t0..t1-1 as uint8 [t1-t0, H, W, 3]."""
        t0, t1 = max(0, int(t0)), min(self.num_frames, int(t1))
        return self.render_at(np.arange(t0, max(t0, t1)))

    def render_at(self, frames: Sequence[int] | np.ndarray) -> np.ndarray:
        """The frames at the given indices (any order, repeats allowed) as uint8 [len, H, W, 3]:
        frame i is render(i, i + 1)[0], in one call (training draws scattered frames)."""
        ts = np.asarray(frames, np.int64).reshape(-1)
        if len(ts) and (ts.min() < 0 or ts.max() >= self.num_frames):
            raise ValueError(f"frames must lie within 0..{self.num_frames - 1}")
        n = len(ts)
        H, W = self.size
        oy = np.floor(self._vel[0] * ts).astype(np.int64) % self._th
        ox = np.floor(self._vel[1] * ts).astype(np.int64) % self._tw
        base = np.empty((n, H, W), np.int16)
        for i in range(n):
            base[i] = self._tex[oy[i]:oy[i] + H, ox[i]:ox[i] + W]
        th = (self._grad_phase + self._grad_omega * ts).astype(np.float32)[:, None, None]
        light = self._grad_amp * (np.cos(th) * self._gx + np.sin(th) * self._gy)
        light += (self._bright_amp * np.sin(self._bright_omega * ts)).astype(np.float32)[:, None, None]
        base += np.rint(light).astype(np.int16)
        if self._grain is not None:
            base += self._grain[ts % len(self._grain)]
        out = base[..., None] + self._tint  # [n, H, W, 3] int16

        # Wandering blobs (grey, gently pulsing).
        if len(self._blob_size):
            sz = self._blob_size
            py = _bounce(self._blob_p0[0], self._blob_v[0], ts, H - sz)
            px = _bounce(self._blob_p0[1], self._blob_v[1], ts, W - sz)
            for b, (shape, s, g) in enumerate(zip(self._blob_shape, sz, self._blob_grey)):
                m = shape_mask(shape, int(s))
                grey = np.clip(g + np.rint(15 * np.sin(0.05 * ts + b)), 0, 255).astype(np.int16)
                for i in range(n):
                    region = out[i, py[b, i]:py[b, i] + s, px[b, i]:px[b, i] + s]
                    region[m] = grey[i]
        # Grey flashes, then needles on top.
        lo, hi = (int(ts.min()), int(ts.max()) + 1) if n else (0, 0)
        for s, e, shape, y0, x0, size, g in self._flashes:
            if s < hi and e > lo:
                for i in np.nonzero((ts >= s) & (ts < e))[0]:
                    out[i, y0:y0 + size, x0:x0 + size][shape_mask(shape, size)] = g
        for nd in self.needles:
            if nd.frame_start < hi and nd.frame_end > lo:
                y0, y1, x0, x1 = nd.box
                for i in np.nonzero((ts >= nd.frame_start) & (ts < nd.frame_end))[0]:
                    out[i, y0:y1, x0:x1][nd.mask()] = np.asarray(nd.rgb, np.int16)
        np.clip(out, 0, 255, out=out)
        return out.astype(np.uint8)


def _auto_chunk(size: tuple[int, int]) -> int:
    return int(max(1, min(256, 4_000_000 // (size[0] * size[1]))))


def iter_frames(num_frames: int, seed: int, size: tuple[int, int] = DEFAULT_SIZE,
                needles: Sequence[Needle] = (), *, chunk: int | None = None, start: int = 0,
                stop: int | None = None, **scene) -> Iterator[np.ndarray]:
    """Yield frames start..stop-1 of the scene in uint8 chunks [<=chunk, H, W, 3].

    chunk=None picks up to 256 frames and ~4 Mpixel per chunk, so 10,000+ frames never sit in memory
    at once. Extra keyword arguments go to `Scene` (distractors, flash_rate, drift, grain).
    """
    sc = Scene(num_frames, seed, size, needles, **scene)
    step = int(chunk) if chunk else _auto_chunk(sc.size)
    if step < 1:
        raise ValueError(f"chunk {chunk}: use at least 1")
    stop = sc.num_frames if stop is None else min(int(stop), sc.num_frames)
    for t in range(max(0, int(start)), stop, step):
        yield sc.render(t, min(t + step, stop))


def make_frames(num_frames: int, seed: int, size: tuple[int, int] = DEFAULT_SIZE,
                needles: Sequence[Needle] = (), **kw) -> np.ndarray:
    """All frames of the scene as one uint8 array [T, H, W, 3] (see `iter_frames` for long videos)."""
    return np.concatenate(list(iter_frames(num_frames, seed, size, needles, **kw)), axis=0)


# --- video files ------------------------------------------------------------------------------------

def _pick_codec(codec: str | None) -> str:
    import av
    if codec:
        return codec
    return DEFAULT_CODEC if DEFAULT_CODEC in av.codecs_available else "mpeg4"


def _iter_single(frames: np.ndarray | Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    if isinstance(frames, np.ndarray):
        frames = [frames]
    for chunk in frames:
        chunk = np.asarray(chunk)
        if chunk.ndim == 3:
            chunk = chunk[None]
        if chunk.ndim != 4 or chunk.shape[-1] != 3 or chunk.dtype != np.uint8:
            raise ValueError(f"frames: expected uint8 [T, H, W, 3] or [H, W, 3], got {chunk.dtype} {chunk.shape}")
        yield from chunk


def _encode(container, frames, fps: float, codec: str | None, crf: int, gop: int) -> int:
    import av
    codec = _pick_codec(codec)
    rate = Fraction(fps).limit_denominator(1001)
    stream = None
    count = 0
    for img in _iter_single(frames):
        if stream is None:
            h, w = img.shape[:2]
            if h % 2 or w % 2:
                raise ValueError(f"frame size {h}x{w}: use even sides (yuv420p)")
            opts = {"crf": str(crf), "preset": "veryfast", "bf": "0"} if codec in ("libx264", "libx265") else {}
            stream = container.add_stream(codec, rate=rate, options=opts)
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            stream.codec_context.gop_size = gop
            stream.time_base = Fraction(1, 1) / rate
            if codec == "mpeg4":  # quantiser pinned low: near the best mpeg4 quality
                stream.codec_context.qmin, stream.codec_context.qmax = 1, 3
                stream.codec_context.bit_rate = max(1_000_000, int(w * h * float(rate) * 2))
        vf = av.VideoFrame.from_ndarray(img, format="rgb24")
        vf.pts = count
        container.mux(stream.encode(vf))
        count += 1
    if stream is None:
        raise ValueError("frames: nothing to write (no frames)")
    container.mux(stream.encode(None))
    return count


def write_video(path: str | os.PathLike, frames_iter: np.ndarray | Iterable[np.ndarray],
                fps: float = DEFAULT_FPS, *, codec: str | None = None, crf: int = DEFAULT_CRF,
                gop: int = DEFAULT_GOP) -> Path:
    """Encode RGB uint8 frames (an array [T, H, W, 3], or an iterable of such chunks or of single
    [H, W, 3] frames, consumed lazily) to `path` at constant `fps`; returns the path.

    Written to a sibling temporary file first and renamed, so a failed write leaves no half file.
    Default codec libx264 (crf 12, yuv420p, no B-frames, keyframe every `gop` frames); mpeg4 otherwise.
    """
    import av
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.partial{path.suffix or '.mp4'}")
    try:
        with av.open(str(tmp), "w") as container:
            _encode(container, frames_iter, fps, codec, crf, gop)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def read_video(path: str | os.PathLike, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Decode frames start..stop-1 of a file (in order, PyAV) as uint8 [T, H, W, 3]."""
    import av
    out = []
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if stop is not None and i >= stop:
                break
            if i >= start:
                out.append(frame.to_ndarray(format="rgb24"))
    return np.stack(out) if out else np.zeros((0, 0, 0, 3), np.uint8)


def codec_roundtrip(frames: np.ndarray, fps: float = DEFAULT_FPS, *, codec: str | None = None,
                    crf: int = DEFAULT_CRF) -> np.ndarray:
    """Encode and decode frames in memory: training clips then carry the same artefacts as files."""
    import av
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        _encode(container, frames, fps, codec, crf, DEFAULT_GOP)
    buf.seek(0)
    with av.open(buf) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


# --- planning: needles and questions ----------------------------------------------------------------

def _place_events(rng: np.random.Generator, num_frames: int, n: int, needle_len: tuple[int, int],
                  gap: int = MIN_GAP) -> list[tuple[int, int]]:
    """n non-overlapping [start, end) intervals at random times, at least `gap` frames apart."""
    lo, hi = int(needle_len[0]), int(needle_len[1])
    if n * lo + (n - 1) * gap > num_frames:
        raise ValueError(f"{n} needle(s) of >= {lo} frames do not fit in {num_frames} frames: "
                         "use more frames or shorter needles")
    lens = rng.integers(lo, hi + 1, n)
    while lens.sum() + (n - 1) * gap > num_frames:  # shrink the longest until they fit
        lens[np.argmax(lens)] -= 1
    free = num_frames - int(lens.sum()) - (n - 1) * gap
    cuts = np.sort(rng.integers(0, free + 1, n))  # random composition of the free frames
    out, t = [], 0
    for i in range(n):
        s = int(cuts[i]) + t if i == 0 else int(cuts[i] - cuts[i - 1]) + t
        out.append((s, s + int(lens[i])))
        t = s + int(lens[i]) + gap
    return out


def _needle_at(rng: np.random.Generator, span: tuple[int, int], colour: str, shape: str,
               size: tuple[int, int], needle_size: tuple[int, int]) -> Needle:
    H, W = size
    s = int(rng.integers(needle_size[0], needle_size[1] + 1))
    s = min(s, H, W)
    y = int(rng.integers(s // 2, H - (s - s // 2) + 1))
    x = int(rng.integers(s // 2, W - (s - s // 2) + 1))
    return Needle(span[0], span[1], colour, shape, x, y, s)


def _mc(rng: np.random.Generator, correct: str, pool: Sequence[str]) -> tuple[tuple[str, ...], str]:
    """4 options: `correct` plus 3 others from pool, in a seeded order; returns (options, letter)."""
    others = [p for p in pool if p != correct]
    picks = [others[i] for i in rng.permutation(len(others))[:3]]
    opts = [correct] + picks
    order = rng.permutation(4)
    opts = tuple(opts[i] for i in order)
    return opts, LETTERS[opts.index(correct)]


def _make_question(rng: np.random.Generator, kind: str, form: str, text: str, correct: str,
                   pool: Sequence[str], attribute: str | None = None) -> Question:
    if form == "mc":
        opts, letter = _mc(rng, correct, pool)
        return Question(kind, text, opts, letter, correct, attribute)
    if form == "open":
        return Question(kind, text, (), correct, correct, attribute)
    raise ValueError(f"form {form!r}: use one of {FORMS}")


def _both_options(rng: np.random.Generator, colour: str, shape: str) -> tuple[str, ...]:
    """Pool for "colour shape" answers: one shares the colour, one the shape, one shares neither."""
    same_c = f"{colour} {[s for s in SHAPES if s != shape][rng.integers(0, 3)]}"
    same_s = f"{[c for c in COLOURS if c != colour][rng.integers(0, 3)]} {shape}"
    rest = [f"{c} {s}" for c in COLOURS for s in SHAPES if c != colour and s != shape]
    return (f"{colour} {shape}", same_c, same_s, rest[int(rng.integers(0, len(rest)))])


def plan(num_frames: int, seed: int, kind: str = "what", form: str = "mc", *,
         size: tuple[int, int] = DEFAULT_SIZE, needle_frames: Sequence[int] | None = None,
         attribute: str | None = None, count: int | None = None, decoys: int | None = None,
         needle_len: tuple[int, int] = DEFAULT_NEEDLE_LEN,
         needle_size: tuple[int, int] = DEFAULT_NEEDLE_SIZE) -> tuple[list[Needle], list[Question]]:
    """Seeded needles and question(s) for a video of num_frames frames (nothing is rendered).

    kind "what": 1 needle; attribute colour/shape/both (None: drawn from the seed).
    kind "order": 2 needles of different colours; the answer is the first one's colour.
    kind "count": `count` (1-4, None: drawn) needles of one colour, plus `decoys` (None: 0-2 drawn)
    needles of other colours. needle_frames: start frames to use instead of seeded ones (then the
    count is len(needle_frames) and there are no decoys). form: "mc", "open", or "both" (both
    questions, MC first).
    """
    seed = _check_seed(seed)
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}: use one of {KINDS}")
    forms = FORMS if form == "both" else (form,)
    for f in forms:
        if f not in FORMS:
            raise ValueError(f"form {form!r}: use one of {FORMS} or 'both'")
    rng = np.random.default_rng([seed, 0x9E7])
    colours, shapes = list(COLOURS), list(SHAPES)

    if kind == "what":
        n_target, n_decoy = 1, 0
    elif kind == "order":
        n_target, n_decoy = 2, 0
    else:
        if needle_frames is not None:
            n_target, n_decoy = len(needle_frames), 0
        else:
            n_target = int(count) if count is not None else int(rng.integers(1, 5))
            n_decoy = int(decoys) if decoys is not None else int(rng.integers(0, 3))
        if not 1 <= n_target <= 4:
            raise ValueError(f"count {n_target}: use 1 to 4 needles for a count question")
    n = n_target + n_decoy
    if needle_frames is not None:
        if len(needle_frames) != n:
            raise ValueError(f"needle_frames: kind {kind!r} needs {n} start frame(s), got {len(needle_frames)}")
        lens = rng.integers(needle_len[0], needle_len[1] + 1, n)
        spans = sorted((int(s), min(int(s) + int(ln), num_frames)) for s, ln in zip(needle_frames, lens))
        for (s0, e0), (s1, _) in zip(spans, spans[1:]):
            if s1 < e0:
                raise ValueError(f"needle_frames {list(needle_frames)}: needles overlap in time; space them "
                                 f"by at least {int(needle_len[1])} frames")
        if spans and (spans[0][0] < 0 or spans[-1][0] >= num_frames):
            raise ValueError(f"needle_frames {list(needle_frames)}: use start frames in 0..{num_frames - 1}")
    else:
        spans = _place_events(rng, num_frames, n, needle_len)

    if kind == "what":
        colour, shape = colours[rng.integers(0, 4)], shapes[rng.integers(0, 4)]
        needles = [_needle_at(rng, spans[0], colour, shape, size, needle_size)]
        attr = attribute or ATTRIBUTES[int(rng.integers(0, 3))]
        if attr not in ATTRIBUTES:
            raise ValueError(f"attribute {attribute!r}: use one of {ATTRIBUTES}")
        text = TEMPLATES[f"what/{attr}"]
        correct = {"colour": colour, "shape": shape, "both": f"{colour} {shape}"}[attr]
        pool = {"colour": colours, "shape": shapes}.get(attr) or _both_options(rng, colour, shape)
        qs = [_make_question(rng, kind, f, text, correct, pool, attr) for f in forms]
    elif kind == "order":
        first, second = (colours[i] for i in rng.permutation(4)[:2])
        needles = [_needle_at(rng, spans[0], first, shapes[rng.integers(0, 4)], size, needle_size),
                   _needle_at(rng, spans[1], second, shapes[rng.integers(0, 4)], size, needle_size)]
        a, b = (first, second) if rng.integers(0, 2) else (second, first)
        text = TEMPLATES["order"].format(a=a, b=b)
        qs = [_make_question(rng, kind, f, text, first, colours) for f in forms]
    else:
        target = colours[rng.integers(0, 4)]
        others = [c for c in colours if c != target]
        who = np.zeros(n, bool)
        who[rng.permutation(n)[:n_target]] = True
        needles = [_needle_at(rng, sp, target if t else others[rng.integers(0, 3)], shapes[rng.integers(0, 4)],
                              size, needle_size) for sp, t in zip(spans, who)]
        text = TEMPLATES["count"].format(colour=target)
        qs = [_make_question(rng, kind, f, text, str(n_target), COUNTS) for f in forms]
    return needles, qs


def make_sample(path: str | os.PathLike, num_frames: int, seed: int, kind: str = "what", form: str = "mc",
                size: tuple[int, int] = DEFAULT_SIZE, fps: float = DEFAULT_FPS,
                needle_frames: Sequence[int] | None = None, *, codec: str | None = None,
                crf: int = DEFAULT_CRF, chunk: int | None = None, scene: dict | None = None,
                **plan_kw) -> Sample:
    """Plan needles and questions for `seed`, write the video to `path` (chunked) and describe it.

    plan_kw: attribute, count, decoys, needle_len, needle_size (see `plan`); scene: keyword arguments
    for `Scene` (distractors, flash_rate, drift, grain).
    """
    needles, questions = plan(num_frames, seed, kind, form, size=size, needle_frames=needle_frames, **plan_kw)
    frames = iter_frames(num_frames, seed, size, needles, chunk=chunk, **(scene or {}))
    write_video(path, frames, fps, codec=codec, crf=crf)
    return Sample(str(path), int(num_frames), float(fps), needles, questions, seed=int(seed),
                  size=(int(size[0]), int(size[1])))


def plan_clip(seed: int, num_frames: int, with_needle: bool, kind: str = "what", form: str = "mc",
              **plan_kw) -> tuple[list[Needle], Question]:
    """Needles and question of `make_clip` without rendering (e.g. to supervise which tokens matter).

    with_needle=False returns no needles and the same question text with answer = answer_text = "".
    Count questions draw a count (and 0-2 decoys) that fit in num_frames unless count/decoys are given.
    """
    if form not in FORMS:
        raise ValueError(f"form {form!r}: use one of {FORMS}")
    if kind == "count" and plan_kw.get("needle_frames") is None:
        lo = int(plan_kw.get("needle_len", DEFAULT_NEEDLE_LEN)[0])
        fit = max(1, (num_frames + MIN_GAP) // (lo + MIN_GAP))  # events that fit in the clip
        rng = np.random.default_rng([_check_seed(seed), 0xC0])
        if plan_kw.get("count") is None:
            plan_kw["count"] = int(rng.integers(1, min(4, fit) + 1))
        if plan_kw.get("decoys") is None:
            plan_kw["decoys"] = int(rng.integers(0, max(0, min(2, fit - plan_kw["count"])) + 1))
    needles, (q,) = plan(num_frames, seed, kind, form, **plan_kw)
    if with_needle:
        return needles, q
    return [], Question(q.kind, q.text, q.options, "", "", q.attribute)


def make_clip(seed: int, num_frames: int = 16, with_needle: bool = True, kind: str = "what",
              form: str = "mc", *, size: tuple[int, int] = DEFAULT_SIZE, roundtrip: bool = False,
              fps: float = DEFAULT_FPS, flash_rate: float = 1 / 16, **plan_kw
              ) -> tuple[np.ndarray, Question, str | None]:
    """A short in-memory training clip: (frames uint8 [T, H, W, 3], question, answer).

    with_needle=False: distractors only (same background and distractors as the needle clip of the
    same seed), the question still asks about a needle, and the answer is None: the model should be
    uncertain. Count questions need room for their needles: 4 events of 4+ frames need 22+ frames
    (with fewer frames, pass count= or shorter needle_len). roundtrip=True passes the frames through
    the video codec, so training sees the same artefacts as decoded files. flash_rate is higher than
    for files so short clips often hold a grey distractor event.
    """
    needles, q = plan_clip(seed, num_frames, with_needle, kind, form, size=size, **plan_kw)
    frames = make_frames(num_frames, seed, size, needles, flash_rate=flash_rate)
    if roundtrip:
        frames = codec_roundtrip(frames, fps)
    return frames, q, (q.answer if with_needle else None)


# --- task families (the benchmark's tasks) ----------------------------------------------------------
#
# Five seeded task families, each with one committed default setting (`TASK_DEFAULTS`): what the
# question needs decides how many groups hold evidence and how many tokens of one group it needs.
#
# * colour / shape: one needle (4-8 frames, 32-48 px) and "what colour / shape was it?"; one
#   group-sized piece of evidence: the top tokens of any group that shows it answer the question.
# * count: 1-5 short events (2 frames = one 2-frame slice, a 16-24 px shape inside one 28 px token
#   cell) of one colour, each in a different strided group: the evidence lies in several groups.
# * order: two such events of two colours, in different groups and at least a quarter of the video
#   apart: "which appeared first, the red object or the blue object?".
# * large: a pattern of 3-6 coloured tiles (each a 24 px square inside its own token cell) shown on
#   one slice: "how many coloured tiles made up the large pattern?". Each tile lies in one cell,
#   so a crop of 1-2 cells sees at most 2 tiles and cannot tell any two of the answers 3-6 apart.
#
# The events of count and order and the pattern of large last exactly one slice (2 frames starting
# on an even frame), so with every frame sampled exactly one group sees each; which groups those
# are follows the strided split of `group_size` slices (`groups.split_slices`).

TASKS: tuple[str, ...] = ("colour", "shape", "count", "order", "large")
NUMBERS: tuple[str, ...] = ("1", "2", "3", "4", "5", "6")
NUMBER_WORDS: dict[str, str] = {"zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
TEMPLATES["large"] = "How many coloured tiles made up the large pattern in the video?"
TILE_PX = 24                     # a large pattern's tile: a square inside one 28 px token cell


@dataclass(frozen=True)
class TaskDefaults:
    """The committed setting of one task, the same for every method: `budget` visual tokens,
    `group_size` slices per group, needle frames (`needle_len`) and px (`needle_size`), and
    `events` (lo, hi): needles per video (count), tiles per pattern (large)."""
    budget: int
    group_size: int
    needle_len: tuple[int, int]
    needle_size: tuple[int, int]
    events: tuple[int, int]


# Committed before any training on these tasks (see the commit that introduced them); results are
# reported on benchmark seeds that training never uses (training draws its own random scenes).
TASK_DEFAULTS: dict[str, TaskDefaults] = {
    "colour": TaskDefaults(256, 64, DEFAULT_NEEDLE_LEN, DEFAULT_NEEDLE_SIZE, (1, 1)),
    "shape": TaskDefaults(256, 64, DEFAULT_NEEDLE_LEN, DEFAULT_NEEDLE_SIZE, (1, 1)),
    "count": TaskDefaults(16, 64, (2, 2), (16, 24), (1, 5)),
    "order": TaskDefaults(16, 64, (2, 2), (16, 24), (2, 2)),
    "large": TaskDefaults(64, 64, (2, 2), (TILE_PX, TILE_PX), (3, 6)),
}


def num_groups(num_frames: int, group_size: int, frames_per_slice: int = 2) -> int:
    """Groups of the strided split when every frame is sampled (the plan pads to whole slices)."""
    from ..groups import split_slices
    S = -(-int(num_frames) // frames_per_slice)
    return len(split_slices(S, int(group_size)))


def group_of_slice(slice_id: int, num_frames: int, group_size: int, frames_per_slice: int = 2) -> int:
    """The strided group that holds a slice (every frame sampled)."""
    return int(slice_id) % num_groups(num_frames, group_size, frames_per_slice)


def cell_needle(rng: np.random.Generator, slice_id: int, cell: tuple[int, int], colour: str, shape: str,
                size: int, frames_per_slice: int = 2, token_px: int = 28) -> Needle:
    """A needle shown on exactly one slice's frames, its box inside one token cell."""
    r, c = cell
    size = int(min(size, token_px))
    y0 = token_px * r + int(rng.integers(0, token_px - size + 1))
    x0 = token_px * c + int(rng.integers(0, token_px - size + 1))
    f0 = int(slice_id) * frames_per_slice
    return Needle(f0, f0 + frames_per_slice, colour, shape, x0 + size // 2, y0 + size // 2, size)


def _grid(size: tuple[int, int], token_px: int = 28) -> tuple[int, int]:
    return size[0] // token_px, size[1] // token_px


def _distinct_group_slices(rng: np.random.Generator, S: int, G: int, n: int, min_apart: int = 0,
                           tries: int = 1000) -> list[int]:
    """n slices in n different strided groups (slice % G), pairwise at least min_apart slices apart."""
    if n > G:
        raise ValueError(f"{n} events in different groups need at least {n} groups (the video has {G})")
    for _ in range(tries):
        res = rng.permutation(G)[:n]
        out = []
        for r in res:
            k = int(rng.integers(0, max(1, -(-(S - r) // G))))
            out.append(min(int(r) + G * k, S - 1))
        if len({s % G for s in out}) == n and all(abs(a - b) >= min_apart for i, a in enumerate(out)
                                                   for b in out[i + 1:]):
            return sorted(out)
    raise ValueError(f"could not place {n} events {min_apart} slices apart in different groups "
                     f"of {S} slices: use a longer video")


def _question_pair(rng, kind, forms, text, correct, pool, attribute=None) -> list[Question]:
    return [_make_question(rng, kind, f, text, correct, pool, attribute) for f in forms]


def plan_task(task: str, num_frames: int, seed: int, form: str = "both", *,
              size: tuple[int, int] = DEFAULT_SIZE, group_size: int | None = None,
              events: int | None = None) -> tuple[list[Needle], list[Question]]:
    """Seeded needles and question(s) of one task family at its committed defaults.

    colour and shape are `plan(kind="what", attribute=task)` (same seeds, same videos). count:
    `events` (None: drawn from TASK_DEFAULTS) events in different groups; order: 2 events a
    quarter of the video apart, in different groups; large: a pattern of `events` tiles.
    group_size: the split the events are spread over (default: the task's)."""
    if task not in TASKS:
        raise ValueError(f"task {task!r}: use one of {', '.join(TASKS)}")
    d = TASK_DEFAULTS[task]
    if task in ("colour", "shape"):
        return plan(num_frames, seed, "what", form, size=size, attribute=task, needle_len=d.needle_len,
                    needle_size=d.needle_size)
    seed = _check_seed(seed)
    forms = FORMS if form == "both" else (form,)
    for f in forms:
        if f not in FORMS:
            raise ValueError(f"form {form!r}: use one of {FORMS} or 'both'")
    rng = np.random.default_rng([seed, 0x7A5C, TASKS.index(task)])
    gs = int(group_size or d.group_size)
    S = -(-int(num_frames) // 2)
    G = num_groups(num_frames, gs)
    rows, cols = _grid(size)
    colours = list(COLOURS)
    lo, hi = d.events
    n = int(events) if events is not None else int(rng.integers(lo, hi + 1))
    if not lo <= n <= hi:
        raise ValueError(f"events {n}: task {task!r} uses {lo} to {hi}")
    sz = lambda: int(rng.integers(d.needle_size[0], d.needle_size[1] + 1))     # noqa: E731
    cell = lambda: (int(rng.integers(0, rows)), int(rng.integers(0, cols)))     # noqa: E731
    if task == "count":
        colour = colours[int(rng.integers(0, 4))]
        slices = _distinct_group_slices(rng, S, G, n)
        needles = [cell_needle(rng, s, cell(), colour, SHAPES[int(rng.integers(0, 4))], sz()) for s in slices]
        text = TEMPLATES["count"].format(colour=colour)
        qs = _question_pair(rng, "count", forms, text, str(n), NUMBERS[:5])
    elif task == "order":
        first, second = (colours[i] for i in rng.permutation(4)[:2])
        slices = _distinct_group_slices(rng, S, G, 2, min_apart=max(1, S // 4))
        needles = [cell_needle(rng, slices[0], cell(), first, SHAPES[int(rng.integers(0, 4))], sz()),
                   cell_needle(rng, slices[1], cell(), second, SHAPES[int(rng.integers(0, 4))], sz())]
        a, b = (first, second) if rng.integers(0, 2) else (second, first)
        qs = _question_pair(rng, "order", forms, TEMPLATES["order"].format(a=a, b=b), first, colours)
    else:
        colour = colours[int(rng.integers(0, 4))]
        s = int(rng.integers(0, S))
        cells = rng.permutation(rows * cols)[:n]
        needles = [cell_needle(rng, s, (int(k) // cols, int(k) % cols), colour, "square", sz())
                   for k in sorted(cells.tolist())]
        qs = _question_pair(rng, "large", forms, TEMPLATES["large"], str(n), NUMBERS[2:6])
    for nd in needles:                       # a one-slice event never spills past the last frame
        if nd.frame_end > num_frames:
            raise ValueError(f"video of {num_frames} frames too short for task {task!r}")
    return needles, qs


def make_task_sample(path: str | os.PathLike, task: str, num_frames: int, seed: int, form: str = "both",
                     size: tuple[int, int] = DEFAULT_SIZE, fps: float = DEFAULT_FPS, *,
                     group_size: int | None = None, events: int | None = None,
                     codec: str | None = None, crf: int = DEFAULT_CRF, chunk: int | None = None) -> Sample:
    """`plan_task`, then write the video to `path` and describe it (as make_sample)."""
    needles, questions = plan_task(task, num_frames, seed, form, size=size, group_size=group_size,
                                   events=events)
    frames = iter_frames(num_frames, seed, size, needles, chunk=chunk)
    write_video(path, frames, fps, codec=codec, crf=crf)
    return Sample(str(path), int(num_frames), float(fps), needles, questions, seed=int(seed),
                  size=(int(size[0]), int(size[1])))


def normalize_answer(text: str) -> str:
    """Open answers for exact matching: lower case, punctuation dropped, number words as digits
    ("Three." -> "3", "a red." -> "a red")."""
    import re
    words = re.sub(r"[^a-z0-9 ]+", " ", str(text).lower()).split()
    return " ".join(NUMBER_WORDS.get(w, w) for w in words)


# --- helpers for tests and checks -------------------------------------------------------------------

def nearest_colour(rgb: Sequence[float], max_dist: float = 80.0) -> str | None:
    """The palette colour nearest to an RGB value, or None when none is within max_dist (greys)."""
    v = np.asarray(rgb, np.float32)
    best, dist = None, float("inf")
    for name, c in COLOURS.items():
        d = float(np.linalg.norm(v - np.asarray(c, np.float32)))
        if d < dist:
            best, dist = name, d
    return best if dist <= max_dist else None


def saturation(frames: np.ndarray) -> np.ndarray:
    """max - min over RGB per pixel (0 for greys, 150+ for needle colours)."""
    f = np.asarray(frames)
    return f.max(axis=-1).astype(np.int16) - f.min(axis=-1).astype(np.int16)


def _vocab_texts() -> list[str]:
    texts = ["You are a helpful assistant.", MC_INSTRUCTION, *LETTERS, *COLOURS, *SHAPES, *COUNTS,
             *[f"{c} {s}" for c in COLOURS for s in SHAPES], *[f"The answer is {L}" for L in LETTERS],
             *[f"{L}." for L in LETTERS], *[f"({L})" for L in LETTERS]]
    for seed in range(12):  # every template, colour and option layout, in both forms
        for kind in KINDS:
            attrs = ATTRIBUTES if kind == "what" else (None,)
            for attr in attrs:
                _, qs = plan(64, seed, kind, "both", attribute=attr, needle_frames=None,
                             **({"count": 1 + seed % 4, "decoys": 0} if kind == "count" else {}))
                for q in qs:
                    texts.append(q.prompt_text())
    for seed in range(12):
        for task in TASKS[2:]:
            _, qs = plan_task(task, 1024, seed, "both", group_size=16)
            texts += [q.prompt_text() for q in qs]
    texts += list(NUMBERS)
    seen, out = set(), []
    for t in texts:
        if t not in seen:
            seen.add(t)
            out.append(t)
    return out


VOCAB_TEXTS: list[str] = _vocab_texts()
