#!/usr/bin/env bash
# The study's second sweep (experiments/ablations_v2/README.md), exactly as it was run: the v2
# benchmark's order questions ("which corner lights up first?"), the full model and the
# GSTRA, FSRA and all-temporal ablations x 5 seeds = 20 runs of STAB + reader, 2 at a time. Order is learned only after
# a long plateau (chance at 500 steps, 0.99 at 2000 with lr 2e-3 in the sizing run), hence more
# steps and a higher learning rate than the direction sweep.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
DATA=data_cache/synthetic_v2_order
STEPS=${STEPS:-2000}
# (the synthetic settings below are train.py's defaults of the day, pinned since the default changed)
$PY -c "from panda.data.synthetic import SyntheticConfig, generate; generate(SyntheticConfig(version=2, kinds=['order'], question_mix={'colour': 1.0}), '$DATA')"
$PY experiments/ablations_v2/probe.py --multirun hydra/launcher=joblib hydra.launcher.n_jobs=2 \
  seed=0,1,2,3,4 \
  'experiment=ablation/full,ablation/no_fsra,ablation/no_gstra,ablation/no_temporal' \
  data.root=$DATA data.synthetic.version=2 'data.synthetic.kinds=[order]' \
  data.synthetic.train_videos=800 data.synthetic.train_motion_scale=1.0 data.synthetic.question_mix.colour=1.0 stage.lr=2e-3 \
  trainer.max_steps=$STEPS trainer.enable_progress_bar=false trainer.cpu_threads=1 logger=none \
  hydra.sweep.dir=experiments/ablations_v2/multirun_order
$PY -m panda.experiments.collect experiments/ablations_v2/multirun_order --out experiments/ablations_v2/order --chance 0.25
