"""The model class of an exported folder: panda's :class:`~panda.models.video_lm.VideoLanguageModel`
(STAB -> projector -> the causal LM) as a ``transformers`` model, so ``from_pretrained`` builds and
loads it and ``generate`` answers exactly as ``panda chat`` does (the same splice, the same greedy
decoding, the stop tokens the export wrote into ``generation_config.json``)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel

from panda.compat import init_module_as_owner
from panda.hub.configuration import PandaVideoConfig
from panda.models.stab import STABConfig
from panda.models.video_lm import VideoLanguageModel


class PandaVideoForCausalLM(PreTrainedModel, GenerationMixin):
    """A video-language model: ``pixel_values`` (B, F, 3, R, R) and ``frame_mask`` (B, F, R, R) become
    visual tokens in place of the frame placeholders of ``input_ids``; the LLM answers.

    ``video_lm``: an already built model to wrap (the export's); ``from_pretrained`` builds one from
    the config."""

    config_class = PandaVideoConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _supports_sdpa = True
    _supports_flash_attn = True

    def __init__(self, config: PandaVideoConfig, video_lm: VideoLanguageModel | None = None):
        super().__init__(config)
        if video_lm is None:
            llm = AutoModelForCausalLM.from_config(config.text_config)
            video_lm = VideoLanguageModel(STABConfig(**config.stab), llm, projector=config.projector)
        self.model = video_lm
        self.post_init()
        # the LLM's own tied weights (Qwen2's LM head is its input embedding), under this model's prefix:
        # saved once, tied again on loading
        self.all_tied_weights_keys = self.get_expanded_tied_weights_keys(all_submodels=True)

    def _init_weights(self, module):
        """Every weight comes from the folder; a module the LLM owns (its rotary embedding's buffers)
        initialises as the LLM's own class does."""
        llm = self.model.llm
        if isinstance(llm, PreTrainedModel) and any(module is m for m in llm.modules()):
            init_module_as_owner(llm, module)

    def get_input_embeddings(self):
        return self.model.llm.get_input_embeddings()

    def get_output_embeddings(self):
        return self.model.llm.get_output_embeddings()

    def forward(self, input_ids, attention_mask, pixel_values, frame_mask, labels=None, **kwargs):
        """Training-style forward: the LM loss over ``labels`` (-100 where unsupervised) and the logits."""
        return self.model(input_ids, attention_mask, pixel_values, frame_mask, labels=labels)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, pixel_values, frame_mask, **kwargs):
        """The new token ids (B, <= max_new_tokens), greedy unless ``do_sample=True``; the stop and pad
        ids default to the export's ``generation_config.json`` (what ``panda chat`` stops at)."""
        settings = self.generation_config
        kwargs.setdefault("max_new_tokens", settings.max_new_tokens or 256)
        kwargs.setdefault("eos_token_id", settings.eos_token_id)
        kwargs.setdefault("pad_token_id", settings.pad_token_id)
        dtype = next(self.model.parameters()).dtype
        return self.model.generate(input_ids, attention_mask, pixel_values.to(dtype), frame_mask.to(dtype), **kwargs)
