"""The sync audit (panda/training/syncs.py, ``trainer.audit_syncs=true``): what makes a GPU wait for
the host in a training step, counted on this CPU by source line."""

import json

import numpy as np
import pytest
import torch

from conftest import train_tiny
from panda.training.syncs import SyncAudit, SyncCounter


def test_the_counter_sees_each_kind_of_synchronisation():
    x = torch.arange(6.0)
    with SyncCounter() as counter:
        x.sum().item()  # a value read
        bool(x.max() > 2)
        x.nonzero()  # data-dependent shapes
        x[x > 2]
        torch.repeat_interleave(x, torch.tensor([1, 2, 0, 1, 1, 1]))
        x.tolist()  # an explicit copy to the host
    kinds = {site.split(" @ ")[0] for site in counter.sites}
    assert {"aten::_local_scalar_dense", "aten::nonzero", "aten::index.Tensor",
            "aten::repeat_interleave.Tensor", "Tensor.tolist()", "Tensor.item()"} <= kinds, kinds
    assert all("test_syncs.py" in site for site in counter.sites), counter.sites
    with SyncCounter() as quiet:  # what needs nothing back from the device
        y = x * 2 + 1
        torch.repeat_interleave(y, torch.tensor([1, 2, 0, 1, 1, 1]), output_size=6)
        y[torch.tensor([0, 2])]
        y.shape[0] * 2
        np.arange(3).tolist()  # host data
    assert quiet.total == 0, quiet.sites
    assert x.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]  # the methods it wrapped are back


def _panda_sites(entry: dict) -> dict:
    return {site: n for site, n in entry["sites"].items() if " @ panda/" in site}


DISTILL = ["stage=prealign", "teacher=tiny_languagebind", "distill.layer_stride=1", "distill.heads=4"]


@pytest.mark.parametrize("switches", [[], ["stab.lsd=perceiver"], ["stab.lsd_before_lste=true", "stab.use_fsra=false"],
                                      DISTILL])
def test_a_training_step_reads_nothing_back_from_the_device_but_on_logging_steps(synthetic_root, tmp_path, switches):
    """The splice of visual tokens, STAB's crop boxes, the supervised positions and the distillation
    head's frames are planned on the host from what the collator hands over; the loss history, grad
    norm, learning rates and the padding share stay on the device until a logging step; on a logging
    step the throughput monitor reads the interval's counts once."""
    train_tiny(synthetic_root, tmp_path, "trainer.audit_syncs=true", "trainer.max_steps=6", "trainer.log_every_n_steps=3",
               "evaluate=false", *switches)
    check_audit(json.loads((tmp_path / "syncs.json").read_text()), 6)


def check_audit(audit: dict, steps_run: int, log_every: int = 3) -> None:
    """A run's ``syncs.json`` (one micro-batch per optimiser step, metrics every ``log_every`` steps):
    no read of panda's in a micro-batch that does not log; on a logging step the ones listed below.
    tests/test_scale.py checks each rank of a 2-rank FSDP2 run with it."""
    steps = audit["micro_batches"]
    assert [e["step"] for e in steps] == list(range(1, steps_run + 1))
    assert [e["logging"] for e in steps] == [step % log_every == 0 for step in range(1, steps_run + 1)]
    for entry in steps:
        sites = _panda_sites(entry)
        # the non-finite guard's one read per optimiser step: whether to step at all (as an AMP grad
        # scaler reads whether it found an inf); every micro-batch here closes an optimiser step
        guard = [site for site in sites if "panda/training/nonfinite.py" in site]
        assert len(guard) == 1 and guard[0].endswith("(should_skip)") and sites.pop(guard[0]) == 1, guard
        if entry["logging"]:  # the throughput monitor's one read of the interval's counts; with several
            # ranks also the skipped-samples guard's one read of the ranks' summed counts
            allowed = {"(on_train_batch_end)", "(_check)"}
            assert all("panda/training/callbacks.py" in site and site.split()[-1] in allowed for site in sites), sites
            assert all(n == 1 for n in sites.values()) and any("(on_train_batch_end)" in site for site in sites), sites
        else:
            assert sites == {}, f"step {entry['step']}: {sites}"
    summary = SyncAudit()
    summary.steps = steps
    logging = steps_run // log_every
    assert "per micro-batch" in summary.table() and audit["summary"]["micro_batches"] == {"logging": logging,
                                                                                           "other": steps_run - logging}
