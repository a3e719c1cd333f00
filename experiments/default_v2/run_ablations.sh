#!/usr/bin/env bash
# The whole model (train.py's default: STAB + the tiny LLaMA, v2, colour + direction) with the
# ablations that decide motion, 2 seeds each, 2 runs at a time (joblib): does the default's motion
# come from STAB's temporal parts, and do GSTRA / FSRA matter once an LLM (no learned positions)
# reads the tokens? The full model's two seeds run in the same sweep folder (full_seed0/1) as the
# reference row.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
DATA=data_cache/synthetic_default_v2
# the default's dataset once, before the sweep (every run reads the same cached copy)
# (the settings of conf/data/synthetic.yaml, so the runs find it made)
$PY -c "from panda.data.synthetic import SyntheticConfig, generate; generate(SyntheticConfig(version=2, train_videos=1120, train_motion_scale=2.0, question_mix={'colour': 0.3}), '$DATA')"
$PY train.py --multirun hydra/launcher=joblib hydra.launcher.n_jobs=2 \
  seed=0,1 \
  'experiment=ablation/no_lste,ablation/no_temporal,frames/f1,ablation/no_gstra,ablation/no_fsra' \
  data.root=$DATA trainer.enable_progress_bar=false trainer.cpu_threads=1 logger=csv \
  trainer.checkpoint_every_n_steps=100000 \
  hydra.sweep.dir=experiments/default_v2/multirun
# the reference row: the full model with the same seeds and settings, beside the ablations
$PY train.py --multirun hydra/launcher=joblib hydra.launcher.n_jobs=2 \
  seed=0,1 experiment=ablation/full \
  data.root=$DATA trainer.enable_progress_bar=false trainer.cpu_threads=1 logger=csv \
  trainer.checkpoint_every_n_steps=100000 \
  hydra.sweep.dir=experiments/default_v2/multirun 'hydra.sweep.subdir=full_seed${seed}'
$PY -m panda.experiments.collect experiments/default_v2/multirun --out experiments/default_v2 --chance 0.25
