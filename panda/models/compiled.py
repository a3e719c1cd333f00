"""``model.compile=true``: ``torch.compile`` on the parts of the model whose shapes vary only in
their batch-like dimension, each compiled with dynamic shapes so a new micro-batch size, frame
count or mix of aspect ratios reuses the compiled code instead of compiling again.

STAB's forward itself is not compiled whole: it reads each frame's crop box on the host (one sync
per batch) and gathers a data-dependent number of windows, which would break the graph anyway.
Compiled: the patch embedding, LSTE and GSTRA (on the (B·F, d, g, g) canvas grid), LSD's and FSRA's
attention pools (on (windows, s², d) and (frames, tokens, d)), the context fusion, the projector,
and optionally every LLM decoder layer. Under FSDP2 this runs after ``fully_shard`` (per-module
compile of sharded modules, the order FSDP2 documents).
"""

from __future__ import annotations

from torch import nn

from panda.compat import compiled_graph_count, no_duck_shape, wrap_compiled_call
from panda.models.llm_parts import decoder_layers

STAB_PARTS = ("patch_embed", "lste", "gstra", "lsd.attend", "resampler", "fsra", "fusion_proj")


def compile_model(model: nn.Module, backend: str = "inductor", llm_layers: bool = False) -> list[str]:
    """Compile ``model``'s parts in place (``nn.Module.compile``, dynamic shapes); returns their names.

    Each part compiles without duck shaping (``torch.fx.experimental._config.use_duck_shape``):
    otherwise two sizes that happen to be equal in the first batch (say, frames and windows) share a
    symbol, and the next batch where they differ compiles again. The setting holds only while a
    compiled part runs (where dynamo traces it); the process's own value is left as it was."""
    names = []
    for name in STAB_PARTS:
        module = model.stab
        for part in name.split("."):
            module = getattr(module, part, None) if module is not None else None
        if module is not None:
            _compile(module, backend)
            names.append(f"stab.{name}")
    _compile(model.projector, backend)
    names.append("projector")
    if llm_layers:
        for i, layer in enumerate(decoder_layers(model.llm)):
            _compile(layer, backend)
        names.append(f"llm decoder layers x{i + 1}")
    return names


def _compile(module: nn.Module, backend: str) -> None:
    """``module.compile`` with dynamic shapes, its compiled call run without duck shaping."""
    module.compile(backend=backend, dynamic=True)

    def without_duck_shape(compiled):
        def call(*args, **kwargs):
            with no_duck_shape():  # read when dynamo (re)traces the part, inside this call
                return compiled(*args, **kwargs)

        return call

    wrap_compiled_call(module, without_duck_shape)


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far (a recompile adds one)."""
    return compiled_graph_count()
