"""model.compile: the same training with compiled STAB parts, and no recompile when a batch brings
a new mix of aspect ratios or a new size (aot_eager: dynamo and AOT autograd without a C++ compiler)."""

import pytest
import torch
from conftest import run_cli, tiny_overrides, train_tiny
from test_stab import TINY, batch, video

from panda.models.compiled import compile_model, compiled_graphs


def test_compiled_stab_trains_exactly_as_eager(synthetic_root, tmp_path):
    common = ["trainer.max_steps=3", "evaluate=false", "logger.val_every_n_steps=0", "stage.schedule=constant",
              "stage.warmup_ratio=0"]
    eager = train_tiny(synthetic_root, tmp_path / "eager", *common)
    compiled = train_tiny(synthetic_root, tmp_path / "compiled", *common, "model.compile=true",
                          "model.compile_backend=aot_eager", "model.compile_llm_layers=true")
    assert compiled["train/loss_by_step"] == eager["train/loss_by_step"]


def test_a_new_mix_of_aspect_ratios_compiles_nothing_new():
    from panda.models.stab import STABConfig
    from panda.models.video_lm import VideoLanguageModel, build_llm

    torch.manual_seed(0)
    model = VideoLanguageModel(STABConfig(**{**TINY, "dropout": 0.0}),
                               build_llm(64, hidden_size=32, layers=2, heads=4, intermediate_size=64)).train()
    names = compile_model(model, "aot_eager")
    assert "stab.lsd.attend" in names and "projector" in names

    def step(sizes):
        px, mk = batch(*[video(w, h, seed=i) for i, (w, h) in enumerate(sizes)])
        model.encode_video(px, mk).tokens.sum().backward()

    step([(64, 48), (48, 64)])  # warm-up: one batch mixing crop shapes, one of a single shape
    step([(64, 36)] * 3)
    warm = compiled_graphs()
    for sizes in ([(64, 48), (48, 64), (64, 64)], [(36, 64), (64, 48), (64, 56), (48, 64), (64, 64)],
                  [(64, 64)] * 2, [(64, 48)] * 4):
        step(sizes)
    assert compiled_graphs() == warm


def test_sizes_equal_in_the_first_batch_do_not_share_a_symbol_and_the_process_setting_stays():
    """Without duck shaping inside the compiled parts, two sizes that happen to be equal in the first
    call and differ in the next compile nothing new; outside them torch's own setting is untouched."""
    import torch.fx.experimental._config as fx_config
    from torch import nn

    class Pair(nn.Module):
        def forward(self, x, y):
            return x.sum() * y.shape[0] + y.sum() * x.shape[0]

    model = nn.Module()
    model.stab, model.projector = nn.Module(), Pair()
    with fx_config.patch(use_duck_shape=True):  # torch's default, whatever ran before in this process
        assert compile_model(model, "eager") == ["projector"]
        model.projector(torch.ones(3), torch.ones(3))
        warm = compiled_graphs()
        model.projector(torch.ones(3), torch.ones(5))
        assert compiled_graphs() == warm
        assert fx_config.use_duck_shape is True


@pytest.mark.slow
def test_compiled_parts_train_under_fsdp2_over_two_processes(synthetic_root, tmp_path):
    overrides = [o for o in tiny_overrides(synthetic_root) if not o.startswith("logger=")]
    proc = run_cli(["train.py", "trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2", "logger=none",
                    "evaluate=false", "trainer.max_steps=3", "model.compile=true", "model.compile_backend=aot_eager",
                    f"hydra.run.dir={tmp_path}", *overrides])
    log = proc.stdout + proc.stderr
    assert "torch.compile (aot_eager, dynamic shapes): stab.patch_embed" in log
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
