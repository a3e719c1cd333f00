"""panda inside lmms-eval: ``lmms-eval --model panda --model_args pretrained=CKPT --tasks videomme,mvbench``.

Registered through lmms-eval's ``lmms_eval.models`` entry point (``pyproject.toml``), so
lmms-eval's own registry finds it once panda is installed next to it. :class:`PandaLMM` loads any
checkpoint kind panda loads (a ``train.py`` ``.ckpt``, a panda export, a Video-Panda release
folder), decodes the video lmms-eval hands over with panda's own frame sampling, asks with the
checkpoint's evaluation template, and answers greedily — the same code path as ``evaluate.py``,
so the same question gets the same answer. ``rank``/``world_size`` come from the launcher's
environment (``RANK``/``WORLD_SIZE``), as lmms-eval splits requests across processes itself.

``model_args`` (strings, as lmms-eval passes them): ``pretrained`` (required), ``device`` (auto),
``dtype`` (float32), ``frames`` (the checkpoint's), ``max_new_tokens`` (1024), ``attn_implementation``
(sdpa), and the frame sampling keys of ``evaluate.py`` with their defaults (:class:`SamplingConfig`):
``sampling`` (release | fps | budget), ``sample_fps``, ``max_frames``, ``max_visual_tokens``.
"""

from __future__ import annotations

import dataclasses
import os

import torch
from lmms_eval.api.model import lmms

from panda.choices import Choice
from panda.compat import set_lmms_process
from panda.data.budget import SamplingConfig, sampling_rule
from panda.data.conversation import stop_token_ids
from panda.data.datasets import FramePipeline
from panda.evaluation.qa import encode_question, sequence_logits


def manifest():
    """lmms-eval's entry point payload: the model id ``panda`` and where its class lives."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="panda", simple_class_path="panda.evaluation.lmms.PandaLMM")


def sampling_config(model_args: dict) -> SamplingConfig:
    """The :class:`SamplingConfig` of lmms-eval's ``model_args``: each sampling key given is converted to its
    field's type (an unknown ``sampling`` fails naming the key); the others keep their defaults."""
    defaults, values = SamplingConfig(), {}
    for f in dataclasses.fields(SamplingConfig):
        value = model_args.get(f.name)
        if value in (None, "", "None"):
            continue
        kind = type(getattr(defaults, f.name))
        values[f.name] = kind.parse(value, f.name) if issubclass(kind, Choice) else kind(value)
    return SamplingConfig(**values)


class PandaLMM(lmms):
    is_simple = True

    def __init__(self, pretrained: str, device: str = "auto", dtype: str = "float32", frames=None,
                 max_new_tokens=1024, attn_implementation: str = "sdpa", batch_size=1, **model_args) -> None:
        super().__init__()
        from panda.loading import load_model

        set_lmms_process(self, int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))
        if device == "auto":
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
        loaded = load_model(pretrained, dtype, attn_implementation)
        self.device = torch.device(device)
        self.model = loaded.model.to(self.device).eval()
        self.tokenizer, self.template = loaded.tokenizer, loaded.prompt_template
        self.frames = int(frames) if frames not in (None, "", "None") else loaded.frames
        self.max_new_tokens = int(max_new_tokens)
        stab = self.model.stab_cfg
        self.sampling = sampling_config(model_args)
        self.pipeline = FramePipeline(self.frames, stab.resolution, stab.patch_size, stab.ratio, self.sampling.sample_fps,
                                      sampling=sampling_rule(self.sampling, stab, self.frames))

    # ------------------------------------------------------------------ inputs
    def _video(self, doc_to_visual, doc_id, task, split) -> str:
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if callable(doc_to_visual) else doc_to_visual
        flat = []
        for v in visuals if isinstance(visuals, (list, tuple)) else [visuals]:
            flat += list(v) if isinstance(v, (list, tuple)) else [v]
        paths = [v for v in flat if isinstance(v, (str, os.PathLike))]
        if not paths:
            raise ValueError(f"panda answers about one video file; task {task} doc {doc_id} gave {type(flat[0]).__name__ if flat else 'no visual'}")
        return os.fspath(paths[0])

    def _encode(self, video: str, context: str):
        return encode_question(self.model, self.tokenizer, self.template, self.pipeline, video, context)

    # ------------------------------------------------------------------ requests
    @torch.no_grad()
    def generate_until(self, requests) -> list[str]:
        out = []
        for context, gen_kwargs, doc_to_visual, doc_id, task, split in [r.args for r in requests]:
            ids, pixels, mask = self._encode(self._video(doc_to_visual, doc_id, task, split), context)
            gen_kwargs = dict(gen_kwargs or {})
            new = self.model.generate(ids, torch.ones_like(ids), pixels, mask,
                                      max_new_tokens=int(gen_kwargs.get("max_new_tokens", self.max_new_tokens)),
                                      eos_token_id=stop_token_ids(self.template, self.tokenizer, self.model.llm),
                                      pad_token_id=self.tokenizer.pad_token_id)
            text = self.tokenizer.decode(new[0].tolist(), skip_special_tokens=True).strip()
            until = gen_kwargs.get("until") or []
            for stop in [until] if isinstance(until, str) else until:
                if stop and stop in text:
                    text = text.split(stop, 1)[0]
            out.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return out

    @torch.no_grad()
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """log p(continuation | video, context) and whether greedy decoding would produce it."""
        out = []
        for context, doc_to_target, doc_to_visual, doc_id, task, split in [r.args for r in requests]:
            doc = self.task_dict[task][split][doc_id] if callable(doc_to_target) else None
            continuation = doc_to_target(doc) if callable(doc_to_target) else doc_to_target
            ids, pixels, mask = self._encode(self._video(doc_to_visual, doc_id, task, split), context)
            cont = torch.tensor(self.tokenizer(str(continuation), add_special_tokens=False)["input_ids"], device=self.device)
            logits = sequence_logits(self.model, torch.cat([ids[0], cont])[None], pixels, mask)
            n = len(cont)
            scores = torch.log_softmax(logits[-n - 1:-1].float(), -1)  # the positions that predict the continuation
            logprob = float(scores.gather(1, cont[:, None]).sum())
            greedy = bool((scores.argmax(-1) == cont).all())
            out.append((logprob, greedy))
        return out

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("panda answers single-turn questions about a video (generate_until)")
