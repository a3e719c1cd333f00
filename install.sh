#!/usr/bin/env bash
# Install panda into .venv (CPU, torch pinned, no CUDA packages) with everything its tests use.
# README's first command and CI (.ci/run) both run this.
set -euo pipefail
cd "$(dirname "$0")"
# TorchCodec (data.video_backend=torchcodec, tested) loads the system's FFmpeg 5 libraries
if ! ldconfig -p 2>/dev/null | grep 'libavcodec\.so\.59' >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq && apt-get install -y -qq --no-install-recommends libavcodec59 libavformat59 libavutil57 \
            libswscale6 libswresample4 libavdevice59 libavfilter8 >/dev/null
    else
        echo "install.sh: data.video_backend=torchcodec and its tests need the FFmpeg 5 libraries:" \
             "sudo apt-get install libavcodec59 libavformat59 libavutil57 libswscale6 libswresample4 libavdevice59 libavfilter8" >&2
    fi
fi
# tests/test_demo.py drives `panda demo` in a headless Chromium (Debian's chromium and its chromedriver)
if ! { [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; }; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
    else
        echo "install.sh: tests/test_demo.py (the browser test of panda demo) needs Chromium:" \
             "sudo apt-get install --no-install-recommends chromium chromium-driver" >&2
    fi
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install --upgrade --quiet pip
.venv/bin/pip install --quiet -c constraints.txt -e ".[dev,lmms,demo]"
# litdata and friends may pull a CUDA-only torchvision that breaks `import lightning`; panda needs none
.venv/bin/pip uninstall --yes --quiet torchvision 2>/dev/null || true
# panda as an lmms-eval model (`lmms-eval eval --model panda`, docs/lmms-eval.md). lmms-eval without its
# dependencies: they cannot all be installed next to panda (its latex2sympy2 pins antlr4 4.7.2, Hydra needs
# 4.9; it pins wandb==0.25.0 and av<16) and most are for other models (timm, sentence-transformers, opencv,
# yt-dlp, a torchvision that breaks a CPU torch). What its model API and its `eval` command import comes
# with panda's [lmms] extra above, with the pins that work (filelock<4)
.venv/bin/pip install --quiet --no-deps "lmms-eval==0.7.3"
