#!/usr/bin/env bash
# The study of experiments/ablations_synthetic/README.md, exactly as it was run:
# 12 variants x 3 seeds = 36 runs, 2 at a time (joblib), on direction-only synthetic data.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
# the dataset once, before the sweep (every run reads the same cached copy)
# (version 1, 800 videos, no question mix and the LLM's 0.02 init were train.py's defaults when this ran;
#  they are pinned below)
$PY -c "from panda.data.synthetic import SyntheticConfig, generate; generate(SyntheticConfig(kinds=['direction'], question_mix={'colour': 1.0}), 'data_cache/synthetic_direction')"
$PY train.py --multirun hydra/launcher=joblib hydra.launcher.n_jobs=2 \
  'experiment=ablation/full,ablation/no_fsra,ablation/no_gstra,ablation/no_lste,ablation/no_temporal,ablation/no_row_tokens,ablation/lsd_avgpool,ablation/lsd_before_lste,frames/f1,frames/f2,frames/f8,frames/f16' \
  seed=0,1,2 \
  data.root=data_cache/synthetic_direction 'data.synthetic.kinds=[direction]' \
  data.synthetic.version=1 data.synthetic.train_videos=800 data.synthetic.train_motion_scale=1.0 data.synthetic.question_mix.colour=1.0 llm.initializer_range=0.02 \
  trainer.max_steps=600 trainer.max_epochs=1000 trainer.enable_progress_bar=false trainer.cpu_threads=1 \
  trainer.checkpoint_every_n_steps=100000 data.num_workers=0 \
  logger=wandb logger.group=ablations_synthetic logger.offline=true \
  hydra.sweep.dir=experiments/ablations_synthetic/multirun
$PY -m panda.experiments.collect experiments/ablations_synthetic/multirun --out experiments/ablations_synthetic --chance 0.25
