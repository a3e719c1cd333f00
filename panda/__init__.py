"""panda: train, ablate and evaluate encoder-free video-language models of the Video-Panda kind.

Layout (data flows one way: file -> record -> sample -> batch -> model -> loss/metrics; each layer
imports only those before it, see tests/test_layers.py):

- ``panda.constants``, ``panda.errors``  shared ids/statistics and error types; import nothing.
- ``panda.models``     plain ``nn.Module``s: STAB, projector, the video-language model, teachers.
- ``panda.data``       decode, sample, resize/pad/mask, conversations, datasets, the DataModule.
- ``panda.config``     typed config schemas, validation, ``Derived``.
- ``panda.build``, ``panda.loading``  config -> model/tokenizer/DataModule; any checkpoint -> model.
- ``panda.evaluation`` generation, judging, benchmarks (``evaluate.py`` and a run's held-out split).
- ``panda.training``   the LightningModule, callbacks, Trainer, ``train()``.

Importing panda changes nothing in the process (warning and logging filters, torch settings) and
imports no optional library; what a run needs is set where it starts, for as long as it lasts.
"""

__version__ = "0.1.0"


def check_torchvision() -> None:
    """litdata pulls in torchvision, and pip may pick a CUDA-only build whose import fails and takes
    ``import lightning`` and transformers down with it. panda never uses torchvision: say so.

    Called by the entry points (``train.py``, ``evaluate.py``) before they import Lightning; not on
    ``import panda``, which would otherwise import torchvision in every process that imports panda."""
    import importlib.util

    if importlib.util.find_spec("torchvision") is None:
        return
    try:
        import torchvision  # noqa: F401
    except Exception as exc:  # RuntimeError: operator torchvision::nms does not exist
        raise ImportError(
            f"torchvision is installed but does not import ({type(exc).__name__}: {exc}). panda does not use it "
            "(it came with litdata, built for another torch/CUDA): run `pip uninstall -y torchvision`."
        ) from exc
