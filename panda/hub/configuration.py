"""The configuration class of an exported folder (``config.json``): STAB's settings, the projector,
the LLM's own config as ``text_config``, and how the checkpoint was prompted."""

from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig


class PandaVideoConfig(PretrainedConfig):
    """STAB + projector in front of the causal LM that ``text_config`` describes.

    ``stab``: the fields of :class:`panda.models.stab.STABConfig`; ``projector``: its registered
    name; ``text_config``: the LLM's config (a dict with its ``model_type``, or a config object)."""

    model_type = "panda_video"
    sub_configs = {"text_config": AutoConfig}

    def __init__(self, stab: dict | None = None, projector: str = "mlp2x_gelu", text_config=None, **kwargs):
        self.stab = dict(stab or {})
        self.projector = projector
        if isinstance(text_config, dict):
            from transformers import CONFIG_MAPPING

            text_config = dict(text_config)
            text_config = CONFIG_MAPPING[text_config.pop("model_type")](**text_config)
        self.text_config = text_config
        super().__init__(**kwargs)
