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
    _check_audit(json.loads((tmp_path / "syncs.json").read_text()))


@pytest.mark.slow
def test_fsdp_training_steps_read_nothing_back_from_the_device_on_either_rank(synthetic_root, tmp_path):
    """FSDP2 over 2 gloo processes, distilling: the same on each rank; batch-norm statistics are
    averaged once per optimiser step (a collective, not a read)."""
    from conftest import run_cli, tiny_overrides

    run_dir = tmp_path / "fsdp"
    overrides = [o for o in tiny_overrides(synthetic_root) if not o.startswith("logger=")]
    run_cli(["train.py", "trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2", "logger=none", "evaluate=false",
             "trainer.audit_syncs=true", "trainer.max_steps=6", "trainer.log_every_n_steps=3", *DISTILL,
             f"hydra.run.dir={run_dir}", *overrides])
    for name in ("syncs.json", "syncs_rank1.json"):
        _check_audit(json.loads((run_dir / name).read_text()))


def _check_audit(audit: dict) -> None:
    steps = audit["micro_batches"]
    assert [e["step"] for e in steps] == [1, 2, 3, 4, 5, 6] and [e["logging"] for e in steps] == [False, False, True] * 2
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
    assert "per micro-batch" in summary.table() and audit["summary"]["micro_batches"] == {"logging": 2, "other": 4}
