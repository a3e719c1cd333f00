"""Train a Video-Panda-style model. ``python train.py`` runs the embedded synthetic default on CPU.

``python train.py ...`` in a checkout is ``panda train ...`` (panda/train.py); the examples hold for both::

    python train.py                                   # tiny STAB + tiny LLaMA on generated videos
    python train.py experiment=ablation/no_fsra       # one ablation
    python train.py --multirun experiment=ablation/no_fsra,ablation/no_gstra frames=4,8
    python train.py hydra.run.dir=outputs/x resume=last      # resume the run in outputs/x
"""

import sys

from panda.train import main

if __name__ == "__main__":
    main(sys.argv[1:], prog="train.py")
