"""``panda demo``: the page's code without a browser (checks of uploads, streamed answers equal to
``panda chat``'s, a follow-up question), its command-line errors, and the page itself served by
``python -m panda.demo`` and driven in headless Chromium through Selenium: upload a clip, ask its
colour, read the streamed answer off the page and compare it with ``python -m panda.chat``'s, ask
a follow-up, see the frame strip, and see a text file refused in the page.

The browser test needs Debian's ``chromium`` and ``chromium-driver`` (install.sh installs them as
root) and skips with the install line without them. ``PANDA_DEMO_SCREENSHOT=PATH`` also writes the
page's screenshot to PATH (``PANDA_DEMO_CHECKPOINT=CKPT`` serves that checkpoint instead of the
session's 2-step one: docs/images/demo.png was taken with a trained one).
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest

from conftest import REPO, make_video_file

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
CHROMIUM_INSTALL = "sudo apt-get install --no-install-recommends chromium chromium-driver"
# this machine has no outside network: without these Chromium waits on refused connections
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--no-proxy-server", "--window-size=1280,1000"]
QUESTION = "What colour is the moving object?"
FOLLOW_UP = "In which direction does the object move?"
MAX_NEW_TOKENS = 4
QUIET = {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1",
         "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"}

gradio_needed = pytest.mark.skipif(__import__("importlib").util.find_spec("gradio") is None,
                                   reason='panda demo needs Gradio: pip install -c constraints.txt -e ".[demo]"')


@pytest.fixture(scope="module")
def checkpoint(request) -> str:
    """The session's 2-step checkpoint, or ``PANDA_DEMO_CHECKPOINT`` (then nothing is trained)."""
    return os.environ.get("PANDA_DEMO_CHECKPOINT") or request.getfixturevalue("tiny_checkpoint")


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> str:
    """A 2-second clip of a red circle moving right (16 frames at 8 fps, 128×96)."""
    return make_video_file(str(tmp_path_factory.mktemp("clips") / "red_circle.mp4"), width=128, height=96, frames=16)


@pytest.fixture(scope="module")
def chat(checkpoint):
    from panda.chat import load_chat_model

    return load_chat_model(checkpoint, device="cpu")


# ---------------------------------------------------------------------------------- without a browser

@gradio_needed
def test_the_answer_streams_in_and_ends_as_panda_chat_answers(chat, clip):
    from panda.chat import answer, generate_answer
    from panda.demo import DemoSession

    session = DemoSession(chat, max_new_tokens=MAX_NEW_TOKENS)
    shown = session.show(clip)
    assert shown.strip.shape == (chat.model.stab_cfg.resolution, chat.frames * chat.model.stab_cfg.resolution, 3)
    assert f"{chat.frames} frames" in shown.settings and "2.0 s, 8 fps, 128×96, h264" in shown.settings
    texts = list(session.answer(shown, [], QUESTION))
    expected = answer(chat.model, chat.tokenizer, clip, QUESTION, chat.frames, chat.template, MAX_NEW_TOKENS, stream=False)
    # the text so far as tokens arrive, then the whole answer: what was streamed, as panda chat answers
    assert len(texts) >= 2 and texts[-2].strip() == texts[-1] == expected, texts
    follow_up = list(session.answer(shown, [(QUESTION, expected)], FOLLOW_UP))[-1]
    assert follow_up == generate_answer(chat.model, chat.tokenizer, shown.sample, FOLLOW_UP, chat.frames, chat.template,
                                        [(QUESTION, expected)], MAX_NEW_TOKENS)


@gradio_needed
def test_uploads_that_are_no_usable_video_are_refused_with_a_reason(chat, clip, tmp_path):
    from panda.demo import DemoError, DemoSession

    session = DemoSession(chat, max_seconds=1.5, max_new_tokens=MAX_NEW_TOKENS)
    (tmp_path / "notes.mp4").write_text("not a video\n")
    (tmp_path / "empty.mp4").write_bytes(b"")
    cases = [(str(tmp_path / "notes.mp4"), "notes.mp4 is not a video panda can read"),
             (str(tmp_path / "empty.mp4"), "empty.mp4 is empty"),
             (clip, "red_circle.mp4 is 2 s long; this page takes videos up to 2 s (panda demo --max-seconds)")]
    for path, message in cases:
        with pytest.raises(DemoError, match=message.replace("(", r"\(").replace(")", r"\)")):
            session.show(path)


def test_panda_demo_without_gradio_names_the_extra(monkeypatch, capsys):
    from panda.cli import main as cli_main

    monkeypatch.setitem(sys.modules, "gradio", None)  # importlib finds no gradio
    assert cli_main(["demo", "--checkpoint", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("panda demo: error: ") and 'pip install "panda[demo]"' in err and len(err.strip().splitlines()) == 1


@gradio_needed
def test_panda_demo_mistakes_get_one_line_errors(tmp_path, capsys):
    from panda.demo import main as demo_main

    cases = [(["--checkpoint", str(tmp_path / "nope.ckpt")], "checkpoint not found"),
             (["--checkpoint", "x", "--examples", str(tmp_path / "missing")], "no such file or folder"),
             (["--checkpoint", "x", "--max-seconds", "0"], "--max-seconds 0")]
    for argv, message in cases:
        assert demo_main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("panda demo: error: ") and message in err and len(err.strip().splitlines()) == 1, err


# ---------------------------------------------------------------------------------- in a browser

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_served(url: str, proc: subprocess.Popen, log: str, timeout: float = 120) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1 never through a proxy
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"panda demo exited {proc.returncode}:\n{open(log).read()[-3000:]}")
        try:
            with opener.open(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"panda demo did not answer on {url} in {timeout:.0f} s:\n{open(log).read()[-3000:]}")


@pytest.fixture
def browser():
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        pytest.skip(f"the browser test needs Chromium ({', '.join(missing)} missing): {CHROMIUM_INSTALL}")
    webdriver = pytest.importorskip("selenium.webdriver", reason='selenium is in panda[dev]: pip install -e ".[dev]"')
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tempfile.mkdtemp(prefix='panda_chromium_')}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _save_screenshot(driver, path: str) -> None:
    """The page as a PNG with at most 256 colours (a fraction of the size, the same look)."""
    from PIL import Image

    image = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


@gradio_needed
@pytest.mark.slow
def test_the_page_in_a_browser_answers_as_panda_chat_does(checkpoint, chat, clip, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    started = time.monotonic()
    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    log = str(tmp_path / "demo.log")
    env = {**os.environ, **QUIET}
    server = subprocess.Popen([sys.executable, "-m", "panda.demo", "--checkpoint", checkpoint, "--port", str(port),
                               "--max-new-tokens", str(MAX_NEW_TOKENS), "--examples", clip],
                              cwd=REPO, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    # panda chat's answer, computed while the page starts
    chat_cli = subprocess.Popen([sys.executable, "-m", "panda.chat", "--checkpoint", checkpoint, "--video", clip,
                                 "--max-new-tokens", str(MAX_NEW_TOKENS), "--no-stream", QUESTION],
                                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    steps = {}
    try:
        _wait_until_served(url, server, log)
        steps["server up"] = time.monotonic() - started
        wait = WebDriverWait(browser, 60, poll_frequency=0.2)
        browser.get(url)
        upload = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#video input[type=file]"))
        steps["page loaded"] = time.monotonic() - started

        # a clip: the frames the model was shown appear, with the sampling settings
        upload.send_keys(clip)
        strip = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#frame-strip img[src]"))
        wait.until(lambda d: browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", strip))
        size = browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", strip)
        resolution = chat.model.stab_cfg.resolution
        assert size == [chat.frames * resolution, resolution], size
        settings = browser.find_element(By.ID, "frame-settings").text
        assert f"{chat.frames} frames" in settings and f"{resolution}×{resolution} px" in settings, settings
        steps["frames shown"] = time.monotonic() - started

        # a question: the streamed answer, once done, is panda chat's
        def ask(question: str, answers: int) -> str:
            box = browser.find_element(By.CSS_SELECTOR, "#question textarea")
            box.send_keys(question)
            browser.find_element(By.ID, "ask").click()
            wait.until(lambda d: d.find_element(By.ID, "chat-status").text.startswith("Answered")
                       and len(d.find_elements(By.CSS_SELECTOR, "#chatbot [data-testid='bot']")) == answers)
            return browser.find_elements(By.CSS_SELECTOR, "#chatbot [data-testid='bot']")[-1].text

        first = ask(QUESTION, 1)
        out, err = chat_cli.communicate(timeout=120)
        assert chat_cli.returncode == 0, err[-3000:]
        assert first == out.strip(), (first, out)
        steps["answered as panda chat"] = time.monotonic() - started

        # a follow-up: the conversation so far goes into the prompt
        from panda.chat import generate_answer
        from panda.demo import DemoSession

        shown = DemoSession(chat, max_new_tokens=MAX_NEW_TOKENS).show(clip)
        expected = generate_answer(chat.model, chat.tokenizer, shown.sample, FOLLOW_UP, chat.frames, chat.template,
                                   [(QUESTION, first)], MAX_NEW_TOKENS)
        assert ask(FOLLOW_UP, 2) == expected
        steps["follow-up"] = time.monotonic() - started
        _save_screenshot(browser, str(tmp_path / "demo.png"))
        if os.environ.get("PANDA_DEMO_SCREENSHOT"):
            _save_screenshot(browser, os.environ["PANDA_DEMO_SCREENSHOT"])

        # a text file named .mp4: refused in the page, with the reason; the frames and conversation go
        notes = tmp_path / "notes.mp4"
        notes.write_text("these are notes, not a video\n")
        browser.find_element(By.CSS_SELECTOR, "#video button[aria-label='Clear']").click()
        upload = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#video input[type=file]"))
        upload.send_keys(str(notes))
        error = wait.until(lambda d: d.find_element(By.ID, "video-error").text)
        assert "notes.mp4 is not a video panda can read" in error, error
        assert not browser.find_elements(By.CSS_SELECTOR, "#frame-strip img[src]")
        assert not browser.find_elements(By.CSS_SELECTOR, "#chatbot [data-testid='bot']")
        # ... and a question without a video asks for one
        browser.find_element(By.CSS_SELECTOR, "#question textarea").send_keys(QUESTION)
        browser.find_element(By.ID, "ask").click()
        wait.until(lambda d: d.find_element(By.ID, "chat-status").text == "Upload a video first.")
        steps["renamed text file refused"] = time.monotonic() - started

        # a .txt file: the page's upload refuses it before it is sent
        text_file = tmp_path / "notes.txt"
        text_file.write_text("these are notes\n")
        browser.find_element(By.CSS_SELECTOR, "#video button[aria-label='Clear']").click()
        upload = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#video input[type=file]"))
        upload.send_keys(str(text_file))
        wait.until(lambda d: any("notes.txt" in t.text for t in d.find_elements(By.CSS_SELECTOR, "[data-testid='toast-body']")))
        page_text = browser.find_element(By.TAG_NAME, "body").text
        assert "Traceback" not in page_text and 'File "' not in page_text
        steps[".txt refused"] = time.monotonic() - started
        _save_screenshot(browser, str(tmp_path / "demo_refused.png"))
    finally:
        browser.get("about:blank")  # the page's open connections would hold up the server's shutdown
        server.terminate()  # stops as Ctrl+C does
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        steps["server stopped"] = time.monotonic() - started
        if chat_cli.poll() is None:
            chat_cli.kill()
        print("browser test steps (s since start): " + ", ".join(f"{k} {v:.1f}" for k, v in steps.items()))
    assert server.returncode == 0 and "Traceback" not in open(log).read(), open(log).read()[-3000:]
