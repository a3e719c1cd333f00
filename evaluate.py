"""Evaluate a checkpoint on one or more benchmarks: generate, judge, tabulate.

``python evaluate.py ...`` in a checkout is ``panda evaluate ...`` (panda/evaluate.py)::

    python evaluate.py checkpoint=outputs/default/<date>/checkpoints/last.ckpt        # the synthetic split
    python evaluate.py checkpoint=/models/Video-Panda-7B benchmark=[msvd_qa,vcgbench] \\
        benchmark.msvd_qa.root=/data/eval benchmark.vcgbench.root=/data/eval judge=openai
    torchrun --nproc_per_node=4 evaluate.py ...                                        # sharded generation
"""

import sys

from panda.evaluate import main

if __name__ == "__main__":
    main(sys.argv[1:], prog="evaluate.py")
