"""The sync audit (panda/training/syncs.py, ``trainer.audit_syncs=true``): what makes a GPU wait for
the host in a training step, counted on this CPU by source line."""

import json

import torch

from conftest import train_tiny
from panda.training.syncs import SyncAudit, SyncCounter

# what the LLM input still needs from the device in every micro-batch: the splice finds the frame
# placeholders and the visual token counts on the device (panda/models/video_lm.py), STAB its crop
# boxes (panda/models/stab.py), the supervised LM loss its positions. The collator knows all of them
# on the host; handing them over with the batch takes these to 0.
STILL_SYNCING = {("panda/models/video_lm.py", "splice_visual_tokens"), ("panda/models/stab.py", "crop_boxes"),
                 ("panda/models/video_lm.py", "forward"), ("panda/models/video_lm.py", "supervised_lm_loss")}
PER_MICRO_BATCH = 17  # their count per micro-batch of the tiny default (was 25 with logging's own reads)


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
    assert all("tests/test_syncs.py" in site or "test_syncs.py" in site for site in counter.sites), counter.sites
    with SyncCounter() as quiet:  # what needs nothing back from the device
        y = x * 2 + 1
        torch.repeat_interleave(y, torch.tensor([1, 2, 0, 1, 1, 1]), output_size=6)
        y[torch.tensor([0, 2])]
        y.shape[0] * 2
    assert quiet.total == 0, quiet.sites
    assert x.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]  # the methods it wrapped are back


def _panda_sites(entry: dict) -> dict:
    return {site: n for site, n in entry["sites"].items() if " @ panda/" in site}


def _where(site: str) -> tuple[str, str]:
    location = site.split(" @ ")[1]  # "<path>:<line> (<function>)"
    return location.split(":")[0], location.split("(")[1].rstrip(")")


def test_a_training_step_syncs_only_where_the_splice_still_needs_the_device(synthetic_root, tmp_path):
    """No logging, loss-history, throughput or learning-rate read in a micro-batch that does not log;
    on a logging step the throughput's one read; the rest is the splice's, listed above."""
    train_tiny(synthetic_root, tmp_path, "trainer.audit_syncs=true", "trainer.max_steps=6", "trainer.log_every_n_steps=3",
               "evaluate=false")
    audit = json.loads((tmp_path / "syncs.json").read_text())
    steps = audit["micro_batches"]
    assert [e["step"] for e in steps] == [1, 2, 3, 4, 5, 6] and [e["logging"] for e in steps] == [False, False, True] * 2
    for entry in steps:
        sites = _panda_sites(entry)
        extra = {site for site in sites if _where(site) not in STILL_SYNCING}
        if entry["logging"]:  # the throughput monitor's one read of the interval's counts
            assert [_where(site) for site in extra] == [("panda/training/callbacks.py", "on_train_batch_end")], extra
            assert sites[extra.pop()] == 1
        assert not extra, f"step {entry['step']}: synchronisations outside the splice: {extra}"
        assert sum(n for site, n in sites.items() if _where(site) in STILL_SYNCING) <= PER_MICRO_BATCH, sites
    summary = SyncAudit()
    summary.steps = steps
    assert "per micro-batch" in summary.table() and audit["summary"]["micro_batches"] == {"logging": 2, "other": 4}
