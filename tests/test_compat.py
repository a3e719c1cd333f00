"""The private APIs of panda's dependencies, all behind panda/compat.py, checked against the installed
versions: each test names the dependency, its version and the private name when one is gone or no
longer behaves as panda expects, and the compat function to adapt. A last test keeps every other
module of the package off private names of other libraries."""

import ast
import contextlib
import inspect
import os
import warnings
from importlib.metadata import version

import pytest
import torch

import panda
from panda import compat


@contextlib.contextmanager
def private(dependency: str, name: str, adapter: str):
    """Turn any failure inside into one message naming ``dependency`` (and its installed version), its
    private ``name`` and the :mod:`panda.compat` function that uses it."""
    try:
        yield
    except Exception as exc:  # an assertion, or the name gone (ImportError, AttributeError, TypeError)
        pytest.fail(f"{dependency} {version(dependency)} changed or removed its private {name}, which panda uses "
                    f"through panda.compat.{adapter}: adapt that function (or use a public replacement if one "
                    f"now exists). {type(exc).__name__}: {exc}", pytrace=False)


def parameters(function) -> list[str]:
    return list(inspect.signature(function).parameters)


# ---------------------------------------------------------------------------------------- Lightning


def test_lightning_load_distributed_checkpoint(tmp_path):
    import torch.distributed.checkpoint as dcp

    folder = tmp_path / "sharded.ckpt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is ... uninitialized, assuming ... a single process"
        dcp.save({"state_dict": {"model.w": torch.arange(4.0)}, "loops": {"step": 3}}, checkpoint_id=str(folder),
                 no_dist=True)
    torch.save({"global_step": 7}, folder / "meta.pt")  # what Lightning writes beside the shards
    with private("lightning", "lightning.fabric.utilities.load._load_distributed_checkpoint",
                 "load_distributed_checkpoint"):
        from lightning.fabric.utilities.load import _load_distributed_checkpoint

        assert parameters(_load_distributed_checkpoint) == ["checkpoint_folder"]
        loaded = compat.load_distributed_checkpoint(str(folder))
        assert torch.equal(loaded["state_dict"]["model.w"], torch.arange(4.0)), loaded
        assert loaded["loops"] == {"step": 3} and loaded["global_step"] == 7, loaded


def test_lightning_model_checkpoint_save_hook(tmp_path):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self):
            return torch.utils.data.DataLoader(torch.ones(3, 2), batch_size=1)

    written = []

    class Recording(compat.model_checkpoint_base()):
        def checkpoint_written(self, trainer, filepath):
            written.append((os.path.basename(filepath), os.path.isfile(filepath)))

    # the way panda's MarkedCheckpoint is configured (panda/training/trainer.py)
    checkpoint = Recording(dirpath=str(tmp_path), filename="step{step:06d}", auto_insert_metric_name=False,
                           every_n_train_steps=1, save_last=True, save_top_k=1)
    with private("lightning", "ModelCheckpoint._save_checkpoint", "model_checkpoint_base"):
        assert parameters(ModelCheckpoint._save_checkpoint) == ["self", "trainer", "filepath"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            L.Trainer(max_steps=3, callbacks=[checkpoint], logger=False, enable_progress_bar=False,
                      enable_model_summary=False, accelerator="cpu", devices=1, default_root_dir=str(tmp_path)).fit(Tiny())
        assert written and all(existed for _, existed in written), f"reported before written: {written}"
        on_disk = sorted(f for f in os.listdir(tmp_path) if f.endswith(".ckpt"))
        assert on_disk == ["last.ckpt", "step000003.ckpt"], on_disk
        assert {name for name, _ in written} >= set(on_disk), f"files written without the hook: {written} vs {on_disk}"


def test_lightning_csv_writer_keeps_what_existing_metrics_keeps(tmp_path):
    metrics = tmp_path / "metrics.csv"
    metrics.write_text("step,loss\n0,1.0\n")
    seen = []

    class Keeping(compat.csv_writer_base()):
        def existing_metrics(self):
            seen.append((self.metrics_file_path, os.path.isfile(self.metrics_file_path)))

    with private("lightning", "ExperimentWriter._check_log_dir_exists", "csv_writer_base"):
        from lightning.pytorch.loggers.csv_logs import ExperimentWriter

        assert parameters(ExperimentWriter._check_log_dir_exists) == ["self"]
        Keeping(str(tmp_path))
        assert seen == [(str(metrics), True)], seen
        assert metrics.read_text() == "step,loss\n0,1.0\n"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Lightning's own: "... will be deleted"
            compat.csv_writer_base()(str(tmp_path))  # the default is Lightning's own behaviour
        assert not metrics.exists(), "Lightning's writer no longer deletes an existing metrics.csv"


def test_lightning_logger_experiment(tmp_path):
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.loggers.csv_logs import ExperimentWriter

    logger = CSVLogger(str(tmp_path), name="csv", version="")
    mine = ExperimentWriter(logger.log_dir)
    with private("lightning", "Logger._experiment", "set_logger_experiment"):
        assert logger._experiment is None, "a new CSVLogger already holds a writer"
        compat.set_logger_experiment(logger, lambda: mine)
        compat.set_logger_experiment(logger, lambda: pytest.fail("made a second writer"))
        assert logger.experiment is mine
        logger.log_metrics({"loss": 0.5}, step=4)
        logger.finalize("success")
        assert "0.5" in open(mine.metrics_file_path).read()


# -------------------------------------------------------------------------------------------- Hydra


def test_hydra_args_parser():
    with private("hydra-core", "hydra._internal.utils.get_args_parser", "hydra_args_parser"):
        from hydra._internal.utils import get_args_parser

        assert parameters(get_args_parser) == []
        args, rest = compat.hydra_args_parser().parse_known_args(
            ["--multirun", "a=1", "+b.c=2", "--config-dir", "/conf", "--cfg", "job"])
        assert list(args.overrides) == ["a=1", "+b.c=2"] and args.config_dir == "/conf", args
        assert args.multirun and args.cfg == "job" and rest == [], (args, rest)


# ------------------------------------------------------------------------------------- transformers


def _tiny_llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=32, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=32, max_position_embeddings=64)


def test_transformers_from_config():
    from transformers import LlamaForCausalLM, PreTrainedModel

    with private("transformers", "PreTrainedModel._from_config", "model_from_config"):
        assert parameters(PreTrainedModel._from_config)[:1] == ["config"]
        config = _tiny_llama_config()
        model = compat.model_from_config(LlamaForCausalLM, config, torch.bfloat16)
        assert type(model) is LlamaForCausalLM
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
        assert model.config.dtype == torch.bfloat16


def test_transformers_no_split_modules():
    from transformers import LlamaForCausalLM

    with private("transformers", "PreTrainedModel._no_split_modules", "no_split_modules"):
        model = LlamaForCausalLM(_tiny_llama_config())
        assert compat.no_split_modules(model) == {"LlamaDecoderLayer"}
        assert compat.no_split_modules(torch.nn.Linear(1, 1)) == set()


def test_transformers_init_weights_of_the_owner():
    from transformers import LlamaForCausalLM

    with private("transformers", "PreTrainedModel._init_weights", "init_module_as_owner"):
        model = LlamaForCausalLM(_tiny_llama_config())
        assert parameters(LlamaForCausalLM._init_weights) == ["self", "module"]
        layer = model.model.layers[0].mlp.up_proj
        with torch.no_grad():
            layer.weight.zero_()
        compat.init_module_as_owner(model, layer)
        assert layer.weight.abs().sum() > 0  # initialised again, with the model's own rule
        assert abs(float(layer.weight.std()) - model.config.initializer_range) < 0.01


# -------------------------------------------------------------------------------------------- torch


def test_torch_dispatch_mode_sees_aten_ops_below_autograd():
    import torch

    from panda.compat import dispatch_mode_base

    seen = []

    class Record(dispatch_mode_base()):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func.name())
            return func(*args, **(kwargs or {}))

    x = torch.ones(3, requires_grad=True)
    with Record():
        (x * 2).sum().backward()
        x.detach().nonzero()
    assert "aten::mul.Tensor" in seen and "aten::nonzero" in seen, f"torch {torch.__version__}: {seen}"
    assert any(name.startswith("aten::ones_like") or name.startswith("aten::expand") for name in seen)  # backward too


def test_torch_non_persistent_buffer_names():
    import torch

    from panda.compat import non_persistent_buffer_names

    module = torch.nn.Module()
    module.register_buffer("kept", torch.zeros(1))
    module.register_buffer("inv_freq", torch.ones(2), persistent=False)
    module.register_buffer("alpha", torch.ones(1), persistent=False)
    assert non_persistent_buffer_names(module) == ["alpha", "inv_freq"], f"torch {torch.__version__}"
    assert set(module.state_dict()) == {"kept"}


def test_torch_batch_norm_base():
    with private("torch", "torch.nn.modules.batchnorm._BatchNorm", "is_batch_norm"):
        for module in (torch.nn.BatchNorm1d(2), torch.nn.BatchNorm2d(2), torch.nn.BatchNorm3d(2),
                       torch.nn.SyncBatchNorm(2), torch.nn.LazyBatchNorm2d()):
            assert compat.is_batch_norm(module), type(module).__name__
        for module in (torch.nn.LayerNorm(2), torch.nn.GroupNorm(1, 2), torch.nn.InstanceNorm2d(2), torch.nn.Linear(2, 2)):
            assert not compat.is_batch_norm(module), type(module).__name__


def test_torch_compiled_call_duck_shape_and_graph_count():
    import torch.fx.experimental._config as fx_config

    class Part(torch.nn.Module):  # not a torch.nn module: dynamo traces into it
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(2, 3))

        def forward(self, x):
            return torch.relu(x @ self.weight.T) * 2

    default = fx_config.use_duck_shape
    with private("torch", "nn.Module._compiled_call_impl", "wrap_compiled_call"):
        module = Part()
        with pytest.raises(RuntimeError, match="not compiled"):
            compat.wrap_compiled_call(module, lambda compiled: compiled)
        module.compile(backend="eager", dynamic=True)
        calls = []

        def counting(compiled):
            def call(*args, **kwargs):
                calls.append(fx_config.use_duck_shape)
                with compat.no_duck_shape():
                    calls.append(fx_config.use_duck_shape)
                    return compiled(*args, **kwargs)

            return call

        compat.wrap_compiled_call(module, counting)
        before = compat.compiled_graph_count()
        x = torch.randn(4, 3)
        assert torch.allclose(module(x), torch.relu(x @ module.weight.T) * 2)
    with private("torch", "torch.fx.experimental._config.use_duck_shape", "no_duck_shape"):
        assert calls == [default, False], calls  # the process's own value, then off inside
        assert fx_config.use_duck_shape == default
    with private("torch", 'torch._dynamo.utils.counters["stats"]["unique_graphs"]', "compiled_graph_count"):
        assert compat.compiled_graph_count() == before + 1
        module(torch.randn(5, 3))  # dynamic: the same graph
        assert compat.compiled_graph_count() == before + 1


# ------------------------------------------------------------------------------------------- litdata


def test_litdata_without_pyarrow():
    with private("litdata", "litdata.streaming.item_loader._PYARROW_AVAILABLE", "litdata_without_pyarrow"):
        from litdata.streaming import item_loader

        footer = item_loader.append_arrow_row_footer
        before = item_loader._PYARROW_AVAILABLE
        with compat.litdata_without_pyarrow():
            assert footer(b"body", [{"a": 1}]) == b"body", "litdata wrote its Arrow footer with pyarrow hidden"
        assert item_loader._PYARROW_AVAILABLE is before
        if before:  # pyarrow installed: what is hidden is what writes the footer
            assert footer(b"body", [{"a": 1}]) != b"body"


# ----------------------------------------------------------------------------------------- lmms-eval


def test_lmms_eval_process():
    lmms = pytest.importorskip("lmms_eval.api.model").lmms
    with private("lmms_eval", "lmms._rank / lmms._world_size", "set_lmms_process"):
        Model = type("Model", (lmms,), {name: lambda self, *a: None for name in lmms.__abstractmethods__})
        model = Model()
        assert (model._rank, model._world_size) == (0, 1)
        compat.set_lmms_process(model, 3, 8)
        assert (model.rank, model.world_size) == (3, 8)


# ------------------------------------------------------------------------ nothing private elsewhere


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_uses(source: str) -> list[tuple[int, str]]:
    """(line, what) for each private name of another library a module's code reaches: an import from a
    private module or of a private name (panda's own excepted), ``x._name`` on anything but
    ``self``/``cls``, and ``getattr``/``setattr``/``hasattr`` with a private name."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.split(".")[0] != "panda":
            if any(_private(p) for p in node.module.split(".")) or any(_private(a.name) for a in node.names):
                found.append((node.lineno, f"from {node.module} import {', '.join(a.name for a in node.names)}"))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, f"import {a.name}") for a in node.names
                      if a.name.split(".")[0] != "panda" and any(_private(p) for p in a.name.split("."))]
        elif isinstance(node, ast.Attribute) and _private(node.attr):
            if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                found.append((node.lineno, ast.unparse(node)))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "setattr", "hasattr", "delattr") and len(node.args) > 1
              and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)
              and _private(node.args[1].value)):
            found.append((node.lineno, ast.unparse(node)))
    return found


def test_private_names_of_other_libraries_only_in_compat():
    root = os.path.dirname(panda.__file__)
    found = [f"{os.path.relpath(os.path.join(folder, name), os.path.dirname(root))}:{line}: {what}"
             for folder, _, names in os.walk(root) for name in sorted(names)
             if name.endswith(".py") and os.path.join(folder, name) != compat.__file__
             for line, what in private_uses(open(os.path.join(folder, name), encoding="utf-8").read())]
    assert not found, ("a private name of another library outside panda/compat.py (give it a function there, and a "
                       "test here; a private name of panda's own: make it public or reach it through its owner):\n"
                       + "\n".join(found))


def test_the_scan_sees_each_kind_of_private_use():
    source = ("from hydra._internal.utils import get_args_parser\nimport torch._dynamo\n"
              "from lightning.fabric.utilities.load import _load_distributed_checkpoint\n"
              "config._attn_implementation = 'sdpa'\nx = getattr(model, '_no_split_modules', None)\n"
              "self._mine = 1\nfrom panda.models.teachers import _hidden_index\ny = obj.__dict__\n")
    assert [line for line, _ in private_uses(source)] == [1, 2, 3, 4, 5]
