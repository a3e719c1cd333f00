"""panda inside lmms-eval: found through lmms-eval's own registry (the entry point in
pyproject.toml), answering hand-built ``Instance`` requests about generated videos with the same
answers ``evaluate.py`` gives for the same questions."""

import json
import os

import torch

from conftest import compose


def _instances(kind, rows, args_of):
    from lmms_eval.api.instance import Instance

    return [Instance(request_type=kind, arguments=args_of(i, row), idx=0,
                     metadata={"task": "tiny_video", "doc_id": i, "repeats": 1}) for i, row in enumerate(rows)]


def test_lmms_eval_finds_panda_and_it_answers_as_evaluate_py_does(synthetic_root, tmp_path):
    from lmms_eval.models import MODEL_REGISTRY_V2, get_model

    from conftest import train_tiny

    # trained long enough to answer with words (a 2-step model answers with nothing)
    tiny_checkpoint = train_tiny(synthetic_root, tmp_path / "run", "trainer.max_steps=200", "evaluate=false")["checkpoint"]

    from panda.evaluation.run import evaluate

    assert "panda" in MODEL_REGISTRY_V2.list_canonical_model_ids()  # through the lmms_eval.models entry point
    cls = get_model("panda")
    lm = cls.create_from_arg_string(f"pretrained={tiny_checkpoint},device=cpu,max_new_tokens=6", {"batch_size": 1})
    assert (lm.rank, lm.world_size) == (0, 1)

    # the same questions through evaluate.py (one question per batch: no padding differences)
    results = evaluate(compose([f"checkpoint={tiny_checkpoint}", f"run_dir={tmp_path / 'eval'}", "num_workers=0",
                                "batch_size=1", "max_new_tokens=6", "benchmark=[synthetic]",
                                "benchmark.synthetic.limit=3"], config_name="evaluate"))
    assert results["benchmarks"]["synthetic"]["judged"] == 3
    want = {json.loads(x)["uid"]: json.loads(x)["prediction"]
            for x in (tmp_path / "eval" / "synthetic" / "predictions.jsonl").read_text().splitlines()}
    qa_dir = os.path.join(synthetic_root, "eval", "Synthetic_Zero_Shot_QA")
    questions = json.load(open(os.path.join(qa_dir, "test_q.json")))[:3]
    docs = [{"video": os.path.join(qa_dir, "videos", q["video_name"] + ("" if "." in q["video_name"] else ".mp4")),
             "question": q["question"], "id": q["question_id"]} for q in questions]
    docs = [d if os.path.exists(d["video"]) else {**d, "video": next(
        os.path.join(qa_dir, "videos", f) for f in os.listdir(os.path.join(qa_dir, "videos"))
        if os.path.splitext(f)[0] == os.path.splitext(os.path.basename(d["video"]))[0])} for d in docs]
    lm.task_dict = {"tiny_video": {"test": docs}}

    def doc_to_visual(doc):
        return [doc["video"]]

    answers = lm.generate_until(_instances("generate_until", docs, lambda i, d: (
        d["question"], {"max_new_tokens": 6, "until": ["</s>"]}, doc_to_visual, i, "tiny_video", "test")))
    assert answers == [want[d["id"]] for d in docs]
    assert all(answers) and len(set(answers)) >= 1  # a checkpoint that answers something

    # log-likelihood: the model's own greedy answer is greedy, and its log-probability is the sum of its tokens'
    ids = lm.tokenizer(answers[0], add_special_tokens=False)["input_ids"]
    assert ids and lm.tokenizer.decode(ids) == answers[0]  # the answer round-trips through the tokenizer
    (logprob, greedy), (other, other_greedy) = lm.loglikelihood(_instances("loglikelihood", docs[:1] * 2, lambda i, d: (
        d["question"], [answers[0], " zzzz qqqq"][i], doc_to_visual, 0, "tiny_video", "test")))
    assert greedy and not other_greedy and logprob > other and logprob < 0
    with torch.no_grad():
        ids_prompt, pixels, mask = lm._encode(docs[0]["video"], docs[0]["question"])
        first = lm.model.generate(ids_prompt, torch.ones_like(ids_prompt), pixels, mask, max_new_tokens=1,
                                  output_scores=True, return_dict_in_generate=True,
                                  eos_token_id=lm.tokenizer.eos_token_id, pad_token_id=lm.tokenizer.pad_token_id)
    assert first.sequences[0, -1].item() == ids[0]  # the first token of the answer is the greedy one
