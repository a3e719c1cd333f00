"""The README's table of what a run writes, checked against a real tiny run."""

import csv
import os

from conftest import REPO, train_tiny


def readme_row(name: str) -> str:
    """The line of the README's run-directory table that describes ``name``."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        return next(line for line in f if line.startswith(f"| `{name}` |"))


def test_metrics_csv_has_the_cadence_the_readme_gives_and_the_summary_every_step(synthetic_root, tmp_path):
    summary = train_tiny(synthetic_root, tmp_path, "logger=csv", "trainer.max_steps=7",
                         "trainer.log_every_n_steps=3", "logger.val_every_n_steps=0", "evaluate=false")
    with open(tmp_path / "csv" / "metrics.csv") as f:
        logged = [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert logged == [2, 5]  # the 3rd and 6th optimiser steps (the column counts from 0); not the 7th
    assert [step for step, _ in summary["train/loss_by_step"]] == list(range(1, 8))
    row = readme_row("csv/metrics.csv")
    assert "every `trainer.log_every_n_steps`-th optimiser step" in row and "per optimiser step" not in row
    assert "counts from 0" in row and "`train/loss_by_step`" in row
