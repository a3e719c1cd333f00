import numpy as np
import pytest
import torch

from panda.data.conversation import IGNORE_INDEX, IMAGE_PLACEHOLDER_ID, get_template, tokenize_prompt
from panda.data.datasets import Collator
from panda.data.frames import preprocess_frames
from panda.models.stab import STABConfig, VisualTokens
from panda.models.video_lm import VideoLanguageModel, build_llm, splice_visual_tokens

P = IMAGE_PLACEHOLDER_ID


def test_splice_places_each_frame_at_its_placeholder_with_ignored_labels():
    D = 3
    ids = torch.tensor([[1, 5, P, P, 6, 7], [1, P, P, 8, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    labels = torch.tensor([[-100, -100, -100, -100, 6, 7], [-100, -100, -100, 8, -100, -100]])
    text = ids.clamp(min=0).float()[..., None].expand(-1, -1, D) * 1.0
    lengths = torch.tensor([[2, 2], [3, 1]])  # different token counts per video and frame
    vis = torch.arange(8, dtype=torch.float)[:, None].expand(-1, D) + 100  # 100..107
    out = splice_visual_tokens(text, ids, mask, VisualTokens(vis, lengths), labels)
    first = out.inputs_embeds[..., 0]
    assert first[0].tolist() == [1, 5, 100, 101, 102, 103, 6, 7]
    assert first[1, :6].tolist() == [1, 104, 105, 106, 107, 8]
    assert out.attention_mask.tolist() == [[1] * 8, [1] * 6 + [0, 0]]
    assert out.labels[0].tolist() == [IGNORE_INDEX] * 6 + [6, 7]
    assert out.labels[1].tolist() == [IGNORE_INDEX] * 5 + [8, IGNORE_INDEX, IGNORE_INDEX]
    left = splice_visual_tokens(text, ids, mask, VisualTokens(vis, lengths), padding_side="left")
    assert left.attention_mask[1].tolist() == [0, 0] + [1] * 6
    assert left.inputs_embeds[1, 2:, 0].tolist() == [1, 104, 105, 106, 107, 8]


def _tiny_model(vocab):
    torch.manual_seed(0)
    cfg = STABConfig(width=32, patch_size=7, heads=4, chunk_size=2, resolution=56, dropout=0.0)
    return VideoLanguageModel(cfg, build_llm(vocab, hidden_size=32, layers=2, heads=4, intermediate_size=64)).eval()


def _sample(tokenizer, question, width, height, seed):
    rng = np.random.default_rng(seed)
    pixels, mask = preprocess_frames(rng.integers(0, 255, (2, height, width, 3), dtype=np.uint8), 2, 56, 7)
    ids = tokenize_prompt(tokenizer, get_template("vicuna_v1_eval"), question, 2)
    return {"id": question, "input_ids": ids, "labels": None, "pixels": pixels, "frame_mask": mask}


def test_batched_generation_equals_one_by_one(tokenizer):
    model = _tiny_model(len(tokenizer))
    samples = [_sample(tokenizer, "What colour is the moving object?", 64, 36, 1),
               _sample(tokenizer, "Which way?", 64, 64, 2)]
    collate = Collator(tokenizer.pad_token_id)

    def run(batch):
        return model.generate(batch["input_ids"], batch["attention_mask"], batch["pixels"], batch["frame_mask"],
                              max_new_tokens=5, eos_token_id=None, pad_token_id=tokenizer.pad_token_id)

    together = run(collate(samples))
    alone = [run(collate([s])) for s in samples]
    assert together.shape == (2, 5)
    assert together.tolist() == [a[0].tolist() for a in alone]


def test_loss_ignores_visual_and_prompt_positions(tokenizer):
    model = _tiny_model(len(tokenizer))
    s = _sample(tokenizer, "What colour?", 64, 64, 0)
    ids = torch.cat([s["input_ids"], torch.tensor([tokenizer.convert_tokens_to_ids("▁red"), tokenizer.eos_token_id])])
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[-2:] = ids[-2:]
    batch = Collator(0)([{**s, "input_ids": ids, "labels": labels}])
    out = model(batch["input_ids"], batch["attention_mask"], batch["pixels"], batch["frame_mask"], batch["labels"])
    spliced = model.prepare_inputs(batch["input_ids"], batch["attention_mask"], batch["pixels"], batch["frame_mask"], batch["labels"])
    assert (spliced.labels != IGNORE_INDEX).sum() == 2
    logits = model(batch["input_ids"], batch["attention_mask"], batch["pixels"], batch["frame_mask"]).logits[0, :-1]
    target = spliced.labels[0, 1:]
    expected = torch.nn.functional.cross_entropy(logits[target != IGNORE_INDEX], target[target != IGNORE_INDEX])
    assert torch.allclose(out.loss, expected, atol=1e-5)
    assert out.logits.shape == (2, len(tokenizer))  # with labels, logits of the supervised positions only


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_supervised_only_logits_give_the_llms_own_loss_and_gradients(tokenizer, family):
    """The LM head runs at supervised positions only: the loss and every gradient equal
    the LLM's own full-logits loss to 1e-6 in fp32."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from panda.models.video_lm import supervised_head_supported

    torch.manual_seed(0)
    if family == "gpt2":
        llm = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=512))
    else:
        llm = _tiny_model(len(tokenizer)).llm
    model = VideoLanguageModel(STABConfig(width=32, patch_size=7, heads=4, chunk_size=2, resolution=56, dropout=0.0), llm).eval()
    assert supervised_head_supported(model.llm)
    samples = [_sample(tokenizer, q, 64, 64 + 16 * k, k) for k, q in enumerate(["What colour?", "Which way does it go?"])]
    for s in samples:
        s["labels"] = s["input_ids"].clone()
        s["labels"][: len(s["labels"]) // 2] = IGNORE_INDEX
        s["labels"][s["labels"] < 0] = IGNORE_INDEX
    batch = Collator(0)(samples)
    args = (batch["input_ids"], batch["attention_mask"], batch["pixels"], batch["frame_mask"], batch["labels"])
    ours = model(*args)
    grads = torch.autograd.grad(ours.loss, list(model.parameters()), allow_unused=True)
    spliced = model.prepare_inputs(*args)
    full = model.llm(inputs_embeds=spliced.inputs_embeds, attention_mask=spliced.attention_mask,
                     position_ids=spliced.position_ids, labels=spliced.labels, use_cache=False)
    want = torch.autograd.grad(full.loss, list(model.parameters()), allow_unused=True)
    assert torch.allclose(ours.loss, full.loss, atol=1e-6, rtol=0)
    for g, w in zip(grads, want):
        assert (g is None) == (w is None) and (g is None or torch.allclose(g, w, atol=1e-6, rtol=1e-5))


def test_any_local_hugging_face_causal_lm_folder_loads(tmp_path, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    # a non-LLaMA architecture, saved locally: the video LM wraps it the same way
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2)).save_pretrained(tmp_path / "gpt2")
    llm = build_llm(tokenizer, pretrained=str(tmp_path / "gpt2"), attn_implementation="eager")
    model = VideoLanguageModel(STABConfig(width=32, patch_size=7, heads=4, chunk_size=2, resolution=56), llm).eval()
    batch = Collator(tokenizer.pad_token_id)([_sample(tokenizer, "What colour?", 64, 48, 0)])
    out = model.generate(batch["input_ids"], batch["attention_mask"], batch["pixels"], batch["frame_mask"],
                         max_new_tokens=3, pad_token_id=tokenizer.pad_token_id)
    assert type(model.llm).__name__ == "GPT2LMHeadModel" and out.shape == (1, 3)


def test_padded_fraction_all_counts_visual_and_text_positions(tokenizer):
    """A square and a 16:9 video in one batch: the LLM pads the shorter sequence, which
    the text-only padded fraction cannot see; the output counts every sample's real positions."""
    model = _tiny_model(len(tokenizer))
    samples = [_sample(tokenizer, "Which way?", 64, 64, 1), _sample(tokenizer, "Which way?", 64, 36, 2)]
    batch = Collator(tokenizer.pad_token_id)(samples)
    assert batch["padded_fraction"] == 0.0  # the same text: no text padding
    with torch.no_grad():
        out = model(batch["input_ids"], batch["attention_mask"], batch["pixels"], batch["frame_mask"])
        alone = [model.prepare_inputs(s["input_ids"][None], torch.ones_like(s["input_ids"][None]), s["pixels"][None],
                                      s["frame_mask"][None]).attention_mask.sum().item() for s in samples]
    assert out.positions.tolist() == alone and alone[0] > alone[1]  # the square frame has more tokens
    assert out.padded_positions == 2 * max(alone)
    assert abs(out.padded_fraction_all - (1 - sum(alone) / (2 * max(alone)))) < 1e-9 and out.padded_fraction_all > 0


def _word_tokenizer():
    """A tokenizer whose special ids are not LLaMA's 1/2/0."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["a", "b", "<pad>", "<s>", "</s>", "c"])}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="a")),
                                   bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def test_a_built_llm_takes_its_special_ids_from_the_tokenizer():
    tok = _word_tokenizer()
    llm = build_llm(tok, hidden_size=32, layers=1, heads=4)
    assert llm.config.vocab_size == 6
    assert (llm.config.bos_token_id, llm.config.eos_token_id, llm.config.pad_token_id) == (3, 4, 2)
    assert (llm.generation_config.bos_token_id, llm.generation_config.eos_token_id) == (3, 4)
    assert llm.get_input_embeddings().padding_idx == 2
    plain = build_llm(6, hidden_size=32, layers=1, heads=4)  # a vocabulary size alone: LLaMA's ids
    assert (plain.config.bos_token_id, plain.config.eos_token_id, plain.config.pad_token_id) == (1, 2, 0)


def test_the_run_builds_its_llm_with_its_tokenizers_ids_and_the_synthetic_default_is_unchanged(tokenizer):
    """panda.build passes the run's tokenizer; the synthetic tokenizer's ids are LLaMA's 1/2/0, so the
    default run's LLM is the one it always was."""
    from conftest import compose
    from panda.build import build_model
    from panda.config import to_train_config

    cfg = to_train_config(compose())
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 0)
    default = build_model(cfg, tokenizer).llm.config
    assert (default.bos_token_id, default.eos_token_id, default.pad_token_id) == (1, 2, 0)
    other = build_model(cfg, _word_tokenizer()).llm.config
    assert (other.bos_token_id, other.eos_token_id, other.pad_token_id) == (3, 4, 2)


def test_build_llm_defaults_are_llm_configs():
    """One default per size: what build_llm builds unasked is what llm.* says."""
    import inspect

    from panda.config import LLMConfig

    llm_cfg = LLMConfig()
    same = {"hidden_size", "layers", "heads", "kv_heads", "intermediate_size", "initializer_range",
              "attn_implementation", "dtype"}
    defaults = {n: p.default for n, p in inspect.signature(build_llm).parameters.items() if n in same}
    assert defaults == {n: getattr(llm_cfg, n) for n in same}
