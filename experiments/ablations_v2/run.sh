#!/usr/bin/env bash
# The study of experiments/ablations_v2/README.md, exactly as it was run: 14 variants x 5 seeds =
# 70 runs of STAB + a reader (experiments/ablations_v2/stab_probe.py) on the v2 synthetic benchmark's
# direction questions, 2 at a time (joblib). Seeds are the outer loop, so a sweep cut short still
# holds whole seeds.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
DATA=data_cache/synthetic_v2_direction
STEPS=${STEPS:-600}
# (the synthetic settings below are train.py's defaults of the day, pinned since the default changed)
# the dataset once, before the sweep (every run reads the same cached copy and decoded frames)
$PY -c "from panda.data.synthetic import SyntheticConfig, generate; generate(SyntheticConfig(version=2, kinds=['direction'], question_mix={'colour': 1.0}), '$DATA')"
$PY experiments/ablations_v2/probe.py --multirun hydra/launcher=joblib hydra.launcher.n_jobs=2 \
  seed=0,1,2,3,4 \
  'experiment=ablation/full,ablation/no_fsra,ablation/no_gstra,ablation/no_lste,ablation/no_temporal,ablation/no_row_tokens,ablation/lsd_avgpool,ablation/lsd_before_lste,ablation/perceiver,ablation/half_res_no_lsd,frames/f1,frames/f2,frames/f8,frames/f16' \
  data.root=$DATA data.synthetic.version=2 'data.synthetic.kinds=[direction]' \
  data.synthetic.train_videos=800 data.synthetic.train_motion_scale=1.0 data.synthetic.question_mix.colour=1.0 \
  trainer.max_steps=$STEPS trainer.enable_progress_bar=false trainer.cpu_threads=1 logger=none \
  hydra.sweep.dir=experiments/ablations_v2/multirun
$PY -m panda.experiments.collect experiments/ablations_v2/multirun --out experiments/ablations_v2 --chance 0.25
