"""A web page to ask a checkpoint about a video: upload a clip (or pick an example), chat about it
with the answers streamed in as they are generated, and see the frames the model was shown.

    panda demo --checkpoint DIR_OR_CKPT          # = python -m panda.demo --checkpoint DIR_OR_CKPT
    panda demo --checkpoint CKPT --examples clips/ --port 7861

``--checkpoint`` takes what ``panda chat`` takes (a Video-Panda release folder, a panda export, a
``train.py`` ``.ckpt``). The page runs the same code as ``panda chat`` (frame pipeline, prompt,
stop tokens) and decodes greedily, so the first answer about a video equals ``panda chat``'s for
the same checkpoint, video, question and ``--max-new-tokens``; a follow-up question carries the
conversation so far, rendered the way training renders a multi-turn record. Without
``--examples`` the page offers two short generated clips. It listens on 127.0.0.1 (``--host`` to
change) with Gradio's usage analytics off. Gradio comes with the ``demo`` extra:
``pip install "panda[demo]"``.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Iterator

from panda.errors import PandaError, VideoDecodeError

log = logging.getLogger(__name__)

INSTALL_HINT = 'pip install "panda[demo]"'
DEFAULT_MAX_SECONDS = 300.0  # 5 minutes: the frames are a handful whatever the length, decoding is not
MAX_UPLOAD = "1gb"  # what Gradio accepts at all; --max-seconds is the real limit
# the clips the page offers when --examples is not given: (file, colour, shape, direction, dot, lights)
SYNTHETIC_EXAMPLES = (("red_circle_right.mp4", "red", "circle", "right", "top left", ("top left", "bottom right")),
                      ("blue_square_up.mp4", "blue", "square", "up", "bottom right", ("top right", "bottom left")))
EXAMPLE_QUESTIONS = ("What colour is the moving object?", "In which direction does the object move?",
                     "Where is the black dot on the object?", "Which corner lights up first?")


class DemoError(PandaError):
    """A request the page refuses (a file that is no video, too long, undecodable); the message is
    shown in the page and says what to do instead."""


def quiet_gradio() -> None:
    """Keep Gradio and the Hugging Face hub from calling home (usage analytics, telemetry); set
    before Gradio is imported. Variables the user set stay as they are."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")


def gradio_missing() -> str | None:
    """Why the page cannot be served here (Gradio not installed), or None."""
    import importlib.util

    if importlib.util.find_spec("gradio") is None:
        return f"panda demo needs Gradio, which is not installed: {INSTALL_HINT}"
    return None


# --------------------------------------------------------------------------------- the videos

def write_synthetic_examples(folder: str) -> list[str]:
    """Two short clips of panda's synthetic benchmark (2 s at 8 fps, 128×96), written with PyAV:
    what the page offers when ``--examples`` is not given."""
    import numpy as np

    from panda.data.synthetic import render_clip_v2, write_video

    paths = []
    for k, (name, colour, shape, direction, dot, lights) in enumerate(SYNTHETIC_EXAMPLES):
        path = os.path.join(folder, name)
        frames = render_clip_v2(colour, shape, direction, dot, lights, 128, 96, 16, np.random.default_rng(k))
        write_video(path, frames, fps=8)
        paths.append(path)
    return paths


def find_examples(sources: list[str]) -> list[str]:
    """The video files of ``--examples``: files as given, folders' video files by name."""
    from panda.data.datasets import VIDEO_EXTENSIONS

    found = []
    for source in sources:
        if os.path.isdir(source):
            found += sorted(os.path.join(source, f) for f in os.listdir(source) if f.lower().endswith(VIDEO_EXTENSIONS))
        elif os.path.isfile(source):
            found.append(source)
        else:
            raise DemoError(f"--examples {source}: no such file or folder")
    if not found:
        raise DemoError(f"--examples {' '.join(sources)}: no video files there ({', '.join(VIDEO_EXTENSIONS[:5])}, ...)")
    return [os.path.abspath(p) for p in found]


@dataclass
class ShownVideo:
    """One video as the model sees it: its frames (the pipeline's ``pixels``/``frame_mask``), the
    same frames as one image, and a line saying how they were taken."""

    path: str
    sample: dict
    strip: object  # (H, frames × W, 3) uint8
    settings: str


# --------------------------------------------------------------------------------- the model side

class DemoSession:
    """What the page does, without the page: check and sample a video, answer a question about it
    (streamed). One answer is generated at a time."""

    def __init__(self, chat, max_seconds: float = DEFAULT_MAX_SECONDS, max_new_tokens: int = 256,
                 sample_fps: float = 1.0, temperature: float = 0.0):
        from panda.chat import frame_pipeline

        self.chat = chat  # a panda.chat.ChatModel
        self.max_seconds = max_seconds
        self.max_new_tokens = max_new_tokens
        self.sample_fps = sample_fps
        self.temperature = temperature
        self.pipeline = frame_pipeline(chat.model, chat.frames, sample_fps)
        self._generating = threading.Lock()

    def show(self, path: str) -> ShownVideo:
        """Check the file and take its frames; raises :class:`DemoError` saying what is wrong."""
        from panda.constants import CLIP_MEAN, CLIP_STD
        from panda.data.video import probe_video
        from panda.training.monitor import frames_strip

        name = os.path.basename(path)
        if not os.path.isfile(path) or os.path.getsize(path) == 0:
            raise DemoError(f"{name} is empty: upload a video file")
        try:
            probe = probe_video(path)
        except VideoDecodeError as exc:
            why = "FFmpeg cannot open it as a video" if exc.code == "unreadable" else exc.reason
            raise DemoError(f"{name} is not a video panda can read ({why}); upload an mp4, webm, mov, mkv or avi "
                            f"file") from None
        except Exception as exc:  # a container PyAV opens but cannot walk
            raise DemoError(f"{name} is not a video panda can read ({type(exc).__name__}: {exc})") from None
        seconds = probe.seconds
        if seconds is not None and seconds > self.max_seconds:
            raise DemoError(f"{name} is {seconds:.0f} s long; this page takes videos up to {self.max_seconds:.0f} s "
                            f"(panda demo --max-seconds): cut it shorter")
        try:
            sample = self.pipeline(path)
        except VideoDecodeError as exc:
            raise DemoError(f"{name} could not be decoded ({exc.reason}); re-encode it (H.264 mp4 works)") from None
        strip = frames_strip(sample["pixels"], sample["frame_mask"], CLIP_MEAN, CLIP_STD)
        stab = self.chat.model.stab_cfg
        length = f"{seconds:.1f} s" if seconds is not None else "length unknown"
        settings = (f"**{self.chat.frames} frames** at sample fps **{self.sample_fps:g}**, each fitted into "
                    f"**{stab.resolution}×{stab.resolution} px** (patch {stab.patch_size}; grey: padding) · "
                    f"the video: {length}, {probe.fps:g} fps, {probe.width}×{probe.height}, {probe.codec}")
        return ShownVideo(path, sample, strip, settings)

    def answer(self, shown: ShownVideo, history: list[tuple[str, str]], question: str) -> Iterator[str]:
        """The answer to ``question`` after ``history``: the text so far as tokens arrive, and last
        the whole answer, decoded as ``panda chat`` decodes it."""
        from transformers import TextIteratorStreamer

        from panda.chat import generate_answer

        chat = self.chat
        streamer = TextIteratorStreamer(chat.tokenizer, skip_prompt=True, skip_special_tokens=True)
        result: dict = {}

        def generate():
            try:
                result["text"] = generate_answer(chat.model, chat.tokenizer, shown.sample, question, chat.frames,
                                                 chat.template, history, self.max_new_tokens, chat.device, streamer,
                                                 self.temperature)
            except Exception as exc:  # reported by the caller; the streamer must end either way
                result["error"] = exc
                streamer.end()

        with self._generating:
            worker = threading.Thread(target=generate, name="panda-demo-generate", daemon=True)
            worker.start()
            try:
                text = ""
                for piece in streamer:
                    if piece:
                        text += piece
                        yield text
            finally:  # also when the page goes away mid-answer: the next answer waits for this one
                worker.join()
        if "error" in result:
            raise result["error"]
        yield result["text"]


# --------------------------------------------------------------------------------- the page

CSS = """
#frame-strip img { image-rendering: pixelated; }
#video-error, #video-error * { color: #b42318 !important; font-weight: 600; }
"""


def build_page(session: DemoSession, checkpoint: str, examples: list[str]):
    """The Gradio page: video and frames on the left, the conversation on the right."""
    import gradio as gr

    chat = session.chat

    def on_video(path):
        """A new video (upload, example or cleared): its frames and settings, a new conversation."""
        if not path:
            return None, None, "", "", [], []
        try:
            shown = session.show(path)
        except DemoError as exc:
            gr.Warning(str(exc))
            return None, None, "", f"⚠ {exc}", [], []
        except Exception as exc:  # never a traceback in the page
            log.exception("panda demo: reading %s failed", path)
            gr.Warning(f"could not read {os.path.basename(path)}: {exc}")
            return None, None, "", f"⚠ could not read {os.path.basename(path)}: {type(exc).__name__}: {exc}", [], []
        return shown, shown.strip, shown.settings, "", [], []

    def on_question(question, shown, turns):
        """Stream the answer into the conversation; the status line says when it is done."""
        question = (question or "").strip()
        messages = _messages(turns)
        if shown is None:
            gr.Warning("Upload a video (or pick an example) first.")
            yield messages, turns, question, "Upload a video first."
            return
        if not question:
            yield messages, turns, "", ""
            return
        start = time.perf_counter()
        text = ""
        try:
            for text in session.answer(shown, turns, question):
                yield _messages(turns + [(question, text)]), turns, "", "Answering…"
        except Exception as exc:  # never a traceback in the page
            log.exception("panda demo: generation failed")
            gr.Warning(f"generation failed: {exc}")
            yield messages, turns, question, f"⚠ generation failed: {type(exc).__name__}: {exc}"
            return
        turns = turns + [(question, text)]
        seconds = time.perf_counter() - start
        took = f"{seconds:.1f} s" if seconds >= 1 else f"{seconds * 1000:.0f} ms"
        yield _messages(turns), turns, "", f"Answered in {took}."

    parts = os.path.normpath(checkpoint).split(os.sep)
    name = "/".join(parts[-3:]) if parts[-1].endswith(".ckpt") else parts[-1]  # a .ckpt: its run folder too
    stab = chat.model.stab_cfg
    decoding = "greedy" if session.temperature <= 0 else f"sampled at temperature {session.temperature:g}"
    with gr.Blocks(title=f"panda demo · {name}", analytics_enabled=False) as page:
        gr.Markdown(f"## panda demo · `{name}`\n"
                    f"Upload a video or pick an example, then ask about it. The model sees {chat.frames} frames "
                    f"at {stab.resolution}×{stab.resolution}; answers are {decoding}, at most "
                    f"{session.max_new_tokens} tokens; videos up to {session.max_seconds:g} s.")
        shown = gr.State(None)
        turns = gr.State([])
        with gr.Row():
            with gr.Column(scale=1):
                video = gr.Video(label="Video", sources=["upload"], format=None, elem_id="video", height=240)
                error = gr.Markdown("", elem_id="video-error")
                if examples:
                    gr.Examples([[p] for p in examples], inputs=[video], label="Example videos")
                gr.Markdown("**The frames the model was shown**")
                strip = gr.Image(label="frames", show_label=False, type="numpy", interactive=False,
                                 elem_id="frame-strip", height=150)
                settings = gr.Markdown("", elem_id="frame-settings")
            with gr.Column(scale=1):
                chatbot = gr.Chatbot(label="Conversation", show_label=False, elem_id="chatbot", height=380)
                question = gr.Textbox(label="Question", placeholder=EXAMPLE_QUESTIONS[0], elem_id="question",
                                      lines=1, max_lines=3)
                with gr.Row():
                    ask = gr.Button("Ask", variant="primary", elem_id="ask")
                    clear = gr.Button("New conversation", elem_id="clear")
                status = gr.Markdown("", elem_id="chat-status")
                gr.Examples([[q] for q in EXAMPLE_QUESTIONS], inputs=[question], label="Example questions")
        video.change(on_video, [video], [shown, strip, settings, error, turns, chatbot], concurrency_limit=1)
        for event in (question.submit, ask.click):
            event(on_question, [question, shown, turns], [chatbot, turns, question, status], concurrency_limit=1)
        clear.click(lambda: ([], [], ""), None, [chatbot, turns, status])
    return page


def _messages(turns: list[tuple[str, str]]) -> list[dict]:
    """The conversation as Gradio's chatbot shows it."""
    out = []
    for question, answer in turns:
        out += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return out


# --------------------------------------------------------------------------------- the command

def parse_args(argv=None) -> argparse.Namespace:
    from panda.chat import add_answer_arguments

    parser = argparse.ArgumentParser(prog="panda demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="release folder, panda export folder, or train.py .ckpt")
    parser.add_argument("--examples", nargs="+", metavar="DIR_OR_FILE",
                        help="example videos to offer (files, or folders of videos); default: two generated clips")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--max-seconds", type=float, default=DEFAULT_MAX_SECONDS,
                        help="longest video the page accepts, in seconds")
    add_answer_arguments(parser, "0 = greedy (the same answers as panda chat)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    missing = gradio_missing()
    if missing:
        print(f"panda demo: error: {missing}", file=sys.stderr)
        return 2
    quiet_gradio()
    logging.basicConfig(level=logging.WARNING)
    from panda import check_torchvision
    from panda.chat import USER_ERRORS, load_chat_model

    check_torchvision()  # a .ckpt builds through Lightning's data module: explain a broken torchvision first
    try:
        if args.max_seconds <= 0:
            raise DemoError(f"--max-seconds {args.max_seconds:g}: give the longest video to accept, in seconds (> 0)")
        if args.max_new_tokens < 1:
            raise DemoError(f"--max-new-tokens {args.max_new_tokens}: give at least 1")
        examples = find_examples(args.examples) if args.examples else []
        chat = load_chat_model(args.checkpoint, args.frames, args.device, args.dtype, args.attn)
    except USER_ERRORS as exc:
        print(f"panda demo: error: {exc}", file=sys.stderr)
        return 2
    session = DemoSession(chat, args.max_seconds, args.max_new_tokens, args.sample_fps, args.temperature)
    with tempfile.TemporaryDirectory(prefix="panda_demo_examples_") as generated:
        examples = examples or write_synthetic_examples(generated)
        page = build_page(session, args.checkpoint, examples)
        try:
            page.queue().launch(server_name=args.host, server_port=args.port, share=False, inbrowser=False,
                                quiet=True, ssr_mode=False, show_error=False, max_file_size=MAX_UPLOAD,
                                allowed_paths=sorted({os.path.dirname(p) for p in examples}), css=CSS,
                                footer_links=[], prevent_thread_lock=True)
        except OSError as exc:  # the port is taken, or the address is not this machine's
            why = "something else listens there" if "empty port" in str(exc) else str(exc)
            print(f"panda demo: error: cannot listen on {args.host}:{args.port} ({why}); choose another --port"
                  f"{'' if args.host == '127.0.0.1' else ' or --host'}", file=sys.stderr)
            return 2
        print(f"panda demo: serving {args.checkpoint} on http://{args.host}:{args.port} (Ctrl+C stops it)",
              flush=True)
        signal.signal(signal.SIGTERM, _stop)  # a plain `kill` stops it like Ctrl+C: server closed, clips removed
        page.block_thread()  # until Ctrl+C (Gradio closes the server then)
    return 0


def _stop(signum, frame):
    """SIGTERM: stop as Ctrl+C does (once; a second one is ignored while the server closes)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
