"""Evaluation as published: benchmarks, the LLM judge against a local OpenAI-compatible server
(including its failures), the SQLite cache, aggregation, resume, sharded generation."""

import json
import os

import pytest
from conftest import compose, make_video_file, run_cli
from judge_server import JudgeServer

from panda.config import BenchmarkConfig, JudgeConfig
from panda.evaluation.benchmarks import load_benchmark
from panda.evaluation.judge import JudgeTask, OpenAIJudge, Verdict, parse_reply
from panda.evaluation.run import aggregate

SECRET = "sk-test-DO-NOT-LEAK-4242"


@pytest.fixture
def judge_cfg(tmp_path, monkeypatch):
    monkeypatch.setenv("PANDA_TEST_JUDGE_KEY", SECRET)

    def make(server, **kw):
        settings = dict(kind="openai", model="judge-x", base_url=server.base_url, api_key_env="PANDA_TEST_JUDGE_KEY",
                        timeout_s=0.5, max_retries=3, backoff_s=0.01, backoff_max_s=0.05, concurrency=4,
                        cache=str(tmp_path / "cache.sqlite"))
        return JudgeConfig(**{**settings, **kw})

    return make


def test_parse_reply_is_strict():
    assert parse_reply('{"pred": "yes", "score": 4}', "qa") == ("yes", 4)
    assert parse_reply("Sure! {'pred': 'No', 'score': '2'}", "qa") == ("no", 2)
    assert parse_reply('{"score": 3}', "detail") == (None, 3)
    for bad in ("yes", '{"pred": "maybe", "score": 3}', '{"pred": "yes", "score": 7}', '{"pred": "yes", "score": 2.5}', ""):
        with pytest.raises(ValueError):
            parse_reply(bad, "qa")


def test_judge_survives_a_misbehaving_server_and_a_rerun_is_all_cache(judge_cfg):
    tasks = [JudgeTask("qa", "what colour?", "red", "red"), JudgeTask("qa", "what colour?", "red", "blue"),
             JudgeTask("qa", "q flaky429", "a", "a flaky429"), JudgeTask("qa", "q flaky500", "b", "b flaky500"),
             JudgeTask("qa", "q slowpoke", "c", "c slowpoke"), JudgeTask("qa", "q mumble", "d", "d mumble"),
             JudgeTask("qa", "q gibberish", "e", "e gibberish"), JudgeTask("detail", "describe", "a cat sits", "a cat sits still")]
    with JudgeServer(hang_s=2.0) as server:
        judge = OpenAIJudge(judge_cfg(server))
        verdicts = judge.judge_all(tasks)
        assert [v.ok for v in verdicts] == [True, True, True, True, True, True, False, True]  # none lost
        assert (verdicts[0].pred, verdicts[0].score, verdicts[1].pred, verdicts[1].score) == ("yes", 5, "no", 1)
        assert verdicts[2].pred == "no" and verdicts[5].pred == "no"  # graded after retries / after the repair request
        assert verdicts[6].pred is None and "unparseable" in verdicts[6].reason  # a failure, never a "no"
        assert verdicts[7].score == 4
        assert judge.served_models == {"judge-x-served-0001"}
        first_calls = judge.api_calls
        assert first_calls == server.requests == 8 + 2 + 2 + 1 + 1 + 1  # retries, one timeout, two repairs
        assert server.auth_headers == {f"Bearer {SECRET}"}

        again = OpenAIJudge(judge_cfg(server))
        second = again.judge_all(tasks)
        assert again.api_calls == 0 and server.requests == first_calls  # zero API calls: all cached
        assert all(v.cached for v in second)
        assert [(v.ok, v.pred, v.score) for v in second] == [(v.ok, v.pred, v.score) for v in verdicts]
        other = OpenAIJudge(judge_cfg(server, model="judge-y"))  # another judge model never reuses judge-x's verdicts
        other.judge_all(tasks[:1])
        assert other.api_calls == 1


def test_client_errors_fail_at_once_and_transport_failures_are_not_cached(judge_cfg):
    with JudgeServer() as server:
        judge = OpenAIJudge(judge_cfg(server))
        v = judge.judge_one(JudgeTask("qa", "q", "a", "a badrequest"))
        assert not v.ok and "HTTP 400" in v.reason and judge.api_calls == 1  # retrying cannot fix a 400
    task = JudgeTask("qa", "q", "a", "a")
    judge.client = judge.client.with_options(base_url="http://127.0.0.1:9/v1")  # nothing listens there
    v = judge.judge_one(task)
    assert not v.ok and "gave up after 4 attempts" in v.reason and judge.api_calls == 1 + 4
    assert judge.cache.get(judge.cache.key(judge.fingerprint_id, judge.prompt_version, task)) is None  # tried again next run


def test_the_judge_is_pinned_structured_and_fingerprinted(judge_cfg):
    """Every request carries temperature 0, the seed and the reply's JSON schema as
    response_format; the fingerprint keys the cache, so another revision or seed misses it."""
    from panda.evaluation.judge import SCHEMAS

    tasks = [JudgeTask("qa", "what colour?", "red", "red"), JudgeTask("detail", "describe", "a cat", "a cat sits")]
    with JudgeServer() as server:
        first = OpenAIJudge(judge_cfg(server, revision="rev-a"))
        assert [v.ok for v in first.judge_all(tasks)] == [True, True]
        by_task = {("qa" if "Does the assistant" in b["messages"][1]["content"] else "detail"): b for b in server.bodies}
        for task, schema in (("qa", SCHEMAS["qa"]), ("detail", SCHEMAS["score"])):
            body = by_task[task]
            assert body["temperature"] == 0.0 and body["seed"] == 0 and body["model"] == "judge-x"
            assert body["response_format"]["type"] == "json_schema"
            assert body["response_format"]["json_schema"]["schema"] == schema
        assert first.fingerprint["revision"] == "rev-a" and first.fingerprint["schema"]
        assert OpenAIJudge(judge_cfg(server, revision="rev-a")).judge_all(tasks) and server.requests == 2  # cached
        for changed in (dict(revision="rev-b"), dict(revision="rev-a", seed=1), dict(revision="rev-a", structured_output=False)):
            before = server.requests
            judge = OpenAIJudge(judge_cfg(server, **changed))
            judge.judge_all(tasks[:1])
            assert server.requests == before + 1 and judge.api_calls == 1, changed  # a new fingerprint: judged anew
        assert "response_format" not in server.bodies[-1]


def test_a_retired_judge_model_stops_with_one_line_naming_it_and_the_presets(judge_cfg, tiny_checkpoint, eval_root,
                                                                            tmp_path, monkeypatch):
    from panda.evaluation.judge import JudgeModelNotFound

    with JudgeServer(unknown_models=("gpt-3.5-turbo",)) as server:
        judge = OpenAIJudge(judge_cfg(server, model="gpt-3.5-turbo"))
        with pytest.raises(JudgeModelNotFound) as err:
            judge.judge_all([JudgeTask("qa", "q", "a", "a")] * 3)
        message = str(err.value)
        assert "gpt-3.5-turbo" in message and "judge=openai" in message and "judge=qwen3_8b_vllm" in message
        assert "\n" not in message and judge.api_calls <= 3  # not retried
        monkeypatch.setenv("PANDA_TEST_JUDGE_KEY", SECRET)
        args = [a.replace("judge.model=judge-x", "judge.model=gpt-3.5-turbo") for a in
                _eval_overrides(tiny_checkpoint, eval_root, tmp_path / "eval", server, tmp_path) if not a.startswith("run_dir=")]
        proc = run_cli(["evaluate.py", *args, f"hydra.run.dir={tmp_path / 'eval'}"], check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("evaluate.py: error: the judge server") and "gpt-3.5-turbo" in last and "Traceback" not in proc.stderr


def test_a_judge_server_that_is_not_running_stops_at_once_naming_its_address(judge_cfg):
    import time

    from panda.evaluation.judge import JudgeUnreachable

    class Nowhere:  # nothing listens on port 9
        base_url = "http://127.0.0.1:9/v1"

    judge = OpenAIJudge(judge_cfg(Nowhere, max_retries=6, backoff_s=1.0))
    start = time.perf_counter()
    with pytest.raises(JudgeUnreachable, match=r"cannot reach the judge at http://127.0.0.1:9/v1.*judge.base_url"):
        judge.judge_all([JudgeTask("qa", "q", "a", "a")] * 4)
    assert time.perf_counter() - start < 5 and judge.api_calls == 0  # no backoff over every item


def test_the_default_judge_presets_name_no_retired_model():
    from panda.config import to_evaluate_config

    for preset in ("openai", "qwen3_8b_vllm"):
        judge = to_evaluate_config(compose([f"judge={preset}", "checkpoint=x"], config_name="evaluate")).judge
        assert judge.kind == "openai" and not judge.model.startswith("gpt-3.5") and judge.temperature == 0.0
        assert judge.seed == 0 and judge.structured_output
    local = to_evaluate_config(compose(["judge=qwen3_8b_vllm", "checkpoint=x"], config_name="evaluate")).judge
    assert local.model == "Qwen/Qwen3-8B" and len(local.revision) == 40 and local.base_url.startswith("http://")
    assert not JudgeConfig().model.startswith("gpt-3.5")


def test_bootstrap_intervals_are_seeded_and_match_the_normal_approximation():
    """Every accuracy and score carries a 95% interval. For n answers with accuracy p
    the bootstrap interval's half-width is close to 1.96 * sqrt(p(1-p)/n)."""
    import math

    from panda.evaluation.benchmarks import _qa_summary, bootstrap_ci

    for n, p in ((400, 0.5), (900, 0.3)):
        values = [1.0] * int(n * p) + [0.0] * (n - int(n * p))
        lo, hi = bootstrap_ci(values)
        assert lo < p < hi and bootstrap_ci(values) == [lo, hi]  # seeded: the same verdicts, the same interval
        assert abs((hi - lo) / 2 - 1.96 * math.sqrt(p * (1 - p) / n)) < 0.1 * 1.96 * math.sqrt(p * (1 - p) / n)
    assert bootstrap_ci([1.0] * 50) == [1.0, 1.0] and bootstrap_ci([1.0]) is None
    verdicts = [Verdict(True, "yes" if i % 4 else "no", i % 6) for i in range(40)]
    summary = _qa_summary(verdicts)
    assert summary["accuracy"] == 0.75 and summary["accuracy_ci95"][0] < 0.75 < summary["accuracy_ci95"][1]
    assert summary["score_ci95"][0] < summary["score"] < summary["score_ci95"][1]
    narrow = _qa_summary(verdicts * 10)  # the same answers ten times over: a narrower interval
    assert narrow["accuracy_ci95"][1] - narrow["accuracy_ci95"][0] < summary["accuracy_ci95"][1] - summary["accuracy_ci95"][0]


def test_aggregation_matches_hand_computed_accuracy_and_score(tmp_path):
    qa_dir = tmp_path / "qa"
    (qa_dir / "videos").mkdir(parents=True)
    qs = [{"video_name": f"v{i}", "question": f"q{i}", "question_id": f"id{i}"} for i in range(5)]
    ans = [{"answer": "x", "type": "what" if i < 3 else "how", "question_id": f"id{i}"} for i in range(5)]
    (qa_dir / "test_q.json").write_text(json.dumps(qs))
    (qa_dir / "test_a.json").write_text(json.dumps(ans))
    bench = load_benchmark(BenchmarkConfig(name="t", root=str(tmp_path), qa_dir="qa"))
    rows = {"id0": {"prediction": "a"}, "id1": {"prediction": "b"}, "id2": {"prediction": "c"},
            "id3": {"uid": "id3", "error": "video file not found"}, "id4": {"prediction": "e"}}
    judged = [("id0", "qa", Verdict(True, "yes", 5)), ("id1", "qa", Verdict(True, "no", 2)),
              ("id2", "qa", Verdict(False, reason="unparseable reply")), ("id4", "qa", Verdict(True, "yes", 4))]
    res = aggregate(bench, rows, judged)
    assert res["accuracy"] == pytest.approx(2 / 3) and res["score"] == pytest.approx(11 / 3)  # yes/(yes+no), mean score
    assert res["judged"] == 3 and res["judge_failures"]["count"] == 1 and res["judge_failures"]["items"][0]["id"] == "id2"
    assert res["missing_videos"] == {"count": 1, "ids": ["id3"]}
    assert (res["accuracy_what"], res["score_what"], res["judged_what"]) == (0.5, 3.5, 2)
    assert (res["accuracy_how"], res["score_how"], res["judged_how"]) == (1.0, 4.0, 1)


@pytest.fixture(scope="module")
def eval_root(tmp_path_factory):
    """A small evaluation DATA_ROOT: MSVD-style QA (.avi-less mp4 names), ActivityNet-style v_ prefix,
    one missing video, and a Video-ChatGPT benchmark fixture."""
    root = tmp_path_factory.mktemp("eval_root")
    msvd = root / "GPT_Zero_Shot_QA" / "MSVD_Zero_Shot_QA"
    anet = root / "GPT_Zero_Shot_QA" / "Activitynet_Zero_Shot_QA"
    vcg = root / "Video-ChatGPT"
    for folder in (msvd / "videos", anet / "videos", vcg / "Test_Videos"):
        folder.mkdir(parents=True)
    make_video_file(str(msvd / "videos" / "clipA.mp4"), seed=1)
    make_video_file(str(msvd / "videos" / "clipB.mkv"), seed=2)
    make_video_file(str(anet / "videos" / "v_abc.mp4"), seed=3)
    make_video_file(str(vcg / "Test_Videos" / "v_xyz.mp4"), seed=4)
    (msvd / "test_q.json").write_text(json.dumps([
        {"video_name": "clipA", "question": "what colour is it?", "question_id": "m0"},
        {"video_name": "clipB", "question": "where does it move?", "question_id": "m1"},
        {"video_name": "gone", "question": "what is it?", "question_id": "m2"},
        {"video_name": "clipA", "question": "what shape is it? gibberish", "question_id": "m3"}]))
    (msvd / "test_a.json").write_text(json.dumps([{"answer": "red", "type": "what", "question_id": f"m{i}"} for i in range(4)]))
    (anet / "test_q.json").write_text(json.dumps([{"video_name": "abc", "question": "what happens?", "question_id": "a0"}]))
    (anet / "test_a.json").write_text(json.dumps([{"answer": "a shape moves", "type": 1, "question_id": "a0"}]))
    (vcg / "generic_qa.json").write_text(json.dumps([{"video_name": "v_xyz", "Q": "describe the video", "A": "a red circle moves right"}]))
    (vcg / "temporal_qa.json").write_text(json.dumps([{"video_name": "v_xyz", "Q": "what happens first?", "A": "the circle appears"}]))
    (vcg / "consistency_qa.json").write_text(json.dumps([{"video_name": "v_xyz", "Q1": "what moves?", "Q2": "which object is moving?", "A": "a circle"}]))
    return str(root)


def _eval_overrides(ckpt, eval_root, run_dir, server, tmp_path):
    return [f"checkpoint={ckpt}", f"run_dir={run_dir}", "num_workers=0", "max_new_tokens=6", "batch_size=2",
            "benchmark=[msvd_qa,activitynet_qa,vcgbench]", f"benchmark.msvd_qa.root={eval_root}",
            f"benchmark.activitynet_qa.root={eval_root}", f"benchmark.vcgbench.root={eval_root}",
            "judge=openai", f"judge.base_url={server.base_url}", "judge.model=judge-x", "judge.api_key_env=PANDA_TEST_JUDGE_KEY",
            "judge.timeout_s=2", "judge.backoff_s=0.01", f"judge.cache={tmp_path / 'cache.sqlite'}"]


def test_evaluate_end_to_end_with_an_llm_judge_resumes_and_never_writes_the_key(
        tiny_checkpoint, eval_root, tmp_path, monkeypatch):
    from panda.evaluation.run import evaluate

    monkeypatch.setenv("PANDA_TEST_JUDGE_KEY", SECRET)
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = tmp_path / "eval"
    with JudgeServer() as server:
        cfg = compose(_eval_overrides(tiny_checkpoint, eval_root, run_dir, server, tmp_path) + ["logger=wandb", "samples=3"],
                      config_name="evaluate")
        results = evaluate(cfg)
        msvd, anet, vcg = (results["benchmarks"][k] for k in ("msvd_qa", "activitynet_qa", "vcgbench"))
        assert msvd["num_questions"] == 4 and msvd["missing_videos"] == {"count": 1, "ids": ["m2"]}
        assert msvd["judged"] + msvd["judge_failures"]["count"] == 3  # every generated answer judged or a failure
        assert anet["num_questions"] == 1 and anet["missing_videos"]["count"] == 0  # v_ prefix resolved
        assert set(vcg) >= {"correctness", "detail", "context", "temporal", "consistency", "average"}
        assert vcg["judged"] == 5 and vcg["average"] is not None
        assert results["judge"]["model"] == "judge-x" and results["judge"]["served_models"] == ["judge-x-served-0001"]
        assert results["judge"]["prompt_version"] == "panda-judge-v1" and results["git_commit"]
        table = (run_dir / "results.md").read_text()
        assert "| Video-Panda (published) | 64.7 / 3.8 | 40.0 / 3.3 |" in table and "2.57" in table
        judgements = [json.loads(x) for x in (run_dir / "msvd_qa" / "judgements.jsonl").read_text().splitlines()]
        assert all(j["question"] and j["reference"] and "prediction" in j and "type" in j for j in judgements)
        from panda.evaluation.agreement import compare, read_run

        same = compare(read_run(str(run_dir)), read_run(str(run_dir)))["groups"]  # a judge agrees with itself
        assert same["msvd_qa"]["agreement"] == 1.0 and same["msvd_qa"]["disagreements"] == []
        assert same["vcgbench/detail"]["mean_abs_score_difference"] == 0.0
        preds = [json.loads(x) for x in (run_dir / "msvd_qa" / "predictions.jsonl").read_text().splitlines()]
        assert [p["uid"] for p in preds] == ["m0", "m1", "m2", "m3"] and "error" in preds[2]

        # interrupted: drop the last answers; the re-run regenerates only those and judges nothing anew
        calls = server.requests
        lines = (run_dir / "msvd_qa" / "predictions.jsonl").read_text().splitlines()
        (run_dir / "msvd_qa" / "predictions.jsonl").write_text("\n".join(lines[:2]) + "\n")
        again = evaluate(compose(_eval_overrides(tiny_checkpoint, eval_root, run_dir, server, tmp_path), config_name="evaluate"))
        assert again["benchmarks"]["msvd_qa"]["generated_now"] == 2  # m2 (missing, retried) and m3
        assert again["benchmarks"]["activitynet_qa"]["generated_now"] == 0
        assert again["judge"]["api_calls"] == 0 and server.requests == calls  # a re-run hits the cache 100%
        assert again["benchmarks"]["msvd_qa"]["accuracy"] == msvd["accuracy"]
    for folder, _, files in os.walk(tmp_path):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                assert SECRET.encode() not in f.read(), os.path.join(folder, name)
    (table_file,) = list((run_dir / "wandb").glob("offline-run-*/files/media/table/samples_*.table.json"))
    table = json.loads(table_file.read_text())
    assert table["columns"] == ["benchmark", "id", "frames", "question", "reference", "prediction", "verdict", "score"]
    assert len(table["data"]) == 3 + 1 + 3  # samples=3 per benchmark (activitynet has 1)
    assert table["data"][0][:2] == ["msvd_qa", "m0"] and table["data"][0][2] == "Image"  # a frame strip of clipA


@pytest.mark.slow
def test_sharded_generation_over_two_processes_merges_to_the_single_process_predictions(tiny_checkpoint, synthetic_root, tmp_path):
    common = [f"checkpoint={tiny_checkpoint}", "num_workers=0", "max_new_tokens=6", "batch_size=3", "benchmark.synthetic.limit=7"]
    run_cli(["evaluate.py", *common, f"hydra.run.dir={tmp_path / 'one'}"])
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # no hydra.run.dir: the ranks must agree on rank 0's timestamped run dir by themselves
    run_cli(["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
             "evaluate.py", *common, f"hydra.run.dir={tmp_path / 'two'}/${{now:%H-%M-%S-%f}}"])
    # Hydra makes one (microsecond-named) dir per rank; all predictions and results land in rank 0's
    written = [d for d in (tmp_path / "two").iterdir() if (d / "synthetic").exists()]
    assert len(written) == 1
    two_dir = written[0]
    one = (tmp_path / "one" / "synthetic" / "predictions.jsonl").read_text()
    two = (two_dir / "synthetic" / "predictions.jsonl").read_text()
    assert len(one.splitlines()) == 7 and one == two
    assert not list((two_dir / "synthetic").glob("predictions.rank*"))
    r1, r2 = (json.loads((d / "results.json").read_text())["benchmarks"]["synthetic"] for d in (tmp_path / "one", two_dir))
    assert r1["accuracy"] == r2["accuracy"] and r1["judged"] == r2["judged"] == 7


def test_a_prompt_file_overrides_the_prompts_and_versions_the_cache(judge_cfg, tmp_path):
    custom = {"version": "lab-prompts-v7", "prompts": {"qa": {
        "system": "You are strict.",
        "user": "Does the assistant's answer match?\nCorrect answer: {reference}\nAssistant's answer: {prediction}\n"}}}
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(custom))
    task = JudgeTask("qa", "q", "red", "red")
    with JudgeServer() as server:
        default = OpenAIJudge(judge_cfg(server))
        default.judge_one(task)
        judge = OpenAIJudge(judge_cfg(server, prompt_file=str(path)))
        v = judge.judge_one(task)
        assert v.ok and v.pred == "yes" and not v.cached and judge.prompt_version == "lab-prompts-v7"
        assert any(user.startswith("Does the assistant's answer match?\nCorrect answer: red") for user in server.attempts)
    (tmp_path / "broken.json").write_text(json.dumps({"prompts": {}}))
    with pytest.raises(ValueError, match="version"):
        OpenAIJudge(judge_cfg(server, prompt_file=str(tmp_path / "broken.json")))


def test_a_release_style_folder_evaluates_like_its_checkpoint(tiny_checkpoint, eval_root, tmp_path):
    from panda.evaluation.run import evaluate
    from panda.export import main as export_main

    folder = str(tmp_path / "export")
    assert export_main([tiny_checkpoint, "--out", folder]) == 0
    common = ["num_workers=0", "max_new_tokens=6", "benchmark=[msvd_qa]", f"benchmark.msvd_qa.root={eval_root}"]
    from_ckpt = evaluate(compose([f"checkpoint={tiny_checkpoint}", f"run_dir={tmp_path / 'a'}", *common], config_name="evaluate"))
    from_folder = evaluate(compose([f"checkpoint={folder}", f"run_dir={tmp_path / 'b'}", *common], config_name="evaluate"))
    assert from_folder["frames"] == from_ckpt["frames"] == 4
    a = (tmp_path / "a" / "msvd_qa" / "predictions.jsonl").read_text()
    assert a == (tmp_path / "b" / "msvd_qa" / "predictions.jsonl").read_text() and len(a.splitlines()) == 4


def test_benchmark_videos_resolve_whatever_their_container(tmp_path, tokenizer):
    """.mpg / .m4v / any container the decoders open, by stem or by explicit name, with or without the
    ActivityNet v_ prefix; a stem with no file stays missing."""
    from panda.data.conversation import get_template
    from panda.data.datasets import FramePipeline, QADataset, find_video
    from panda.data.records import QAItem

    videos = tmp_path / "videos"
    make_video_file(str(videos / "clipM.mpg"), codec="mpeg1video", fps=25, seed=1)
    make_video_file(str(videos / "v_clipN.m4v"), seed=2)
    make_video_file(str(videos / "clipO.mp4"), seed=3)
    (videos / "clipO.srt").write_text("1\n00:00:00,000 --> 00:00:01,000\nsubtitle\n")
    assert find_video(str(videos), "clipM") == str(videos / "clipM.mpg")
    assert find_video(str(videos), "clipM.mpg") == str(videos / "clipM.mpg")
    assert find_video(str(videos), "clipN") == find_video(str(videos), "clipN.m4v") == str(videos / "v_clipN.m4v")
    assert find_video(str(videos), "clipO") == str(videos / "clipO.mp4")  # the video, not the subtitles beside it
    assert find_video(str(videos), "gone") is None
    items = [QAItem(f"q{i}", name, "what colour?", "red") for i, name in enumerate(["clipM", "clipN.m4v", "gone"])]
    dataset = QADataset(items, str(videos), tokenizer, get_template("vicuna_v1_eval"), FramePipeline(4, 112, 14))
    assert dataset[0]["pixels"].shape == dataset[1]["pixels"].shape == (4, 3, 112, 112)
    assert dataset[2]["error"]["reason"] == "video file not found"


@pytest.mark.slow
def test_evaluate_py_fails_and_says_why_when_nothing_could_be_judged(tiny_checkpoint, tmp_path):
    qa = tmp_path / "root" / "GPT_Zero_Shot_QA" / "MSVD_Zero_Shot_QA"
    (qa / "videos").mkdir(parents=True)
    (qa / "test_q.json").write_text(json.dumps([{"video_name": f"gone{i}", "question": "q?", "question_id": f"m{i}"}
                                                for i in range(3)]))
    (qa / "test_a.json").write_text(json.dumps([{"answer": "red", "question_id": f"m{i}"} for i in range(3)]))
    run_dir = tmp_path / "eval"
    proc = run_cli(["evaluate.py", f"checkpoint={tiny_checkpoint}", "benchmark=[msvd_qa]",
                    f"benchmark.msvd_qa.root={tmp_path / 'root'}", "num_workers=0", f"hydra.run.dir={run_dir}"], check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "`msvd_qa`: nothing judged of 3 questions; 3 missing or unreadable video(s) (m0, m1, m2)" in proc.stderr
    table = (run_dir / "results.md").read_text()  # the results are still written, with the reason beside them
    assert "Not in the numbers above:" in table and "3 missing or unreadable video(s)" in table


def _evaluate_synthetic(checkpoint, run_dir, *overrides):
    from panda.evaluation.run import evaluate

    return evaluate(compose([f"checkpoint={checkpoint}", f"run_dir={run_dir}", "num_workers=0", *overrides],
                            config_name="evaluate"))


def test_a_rerun_with_other_decoding_settings_generates_again_and_keeps_the_old_answers_aside(tiny_checkpoint, tmp_path,
                                                                                              caplog):
    """Saved predictions are resumed only under the settings that made them: a rerun into the same
    folder with another max_new_tokens moves them to superseded/, says what changed, and writes
    what a fresh run with the new settings writes."""
    folder = tmp_path / "eval" / "synthetic"
    _evaluate_synthetic(tiny_checkpoint, tmp_path / "eval", "max_new_tokens=12")
    long_answers = (folder / "predictions.jsonl").read_text()
    with caplog.at_level("WARNING", logger="panda.evaluation.run"):
        again = _evaluate_synthetic(tiny_checkpoint, tmp_path / "eval", "max_new_tokens=2")
    fresh = _evaluate_synthetic(tiny_checkpoint, tmp_path / "fresh", "max_new_tokens=2")
    short_answers = (tmp_path / "fresh" / "synthetic" / "predictions.jsonl").read_text()
    assert short_answers != long_answers  # the setting changes the answers of this checkpoint
    assert (folder / "predictions.jsonl").read_text() == short_answers
    assert again["benchmarks"]["synthetic"]["generated_now"] == fresh["benchmarks"]["synthetic"]["num_questions"] == 8
    assert again["benchmarks"]["synthetic"] == fresh["benchmarks"]["synthetic"]
    assert "max 2 new tokens" in (tmp_path / "eval" / "results.md").read_text()
    (aside,) = (folder / "superseded").iterdir()
    assert (aside / "predictions.jsonl").read_text() == long_answers
    assert json.loads((aside / "generation.json").read_text())["max_new_tokens"] == 12
    (notice,) = [r.getMessage() for r in caplog.records if "superseded" in r.getMessage()]
    assert "max_new_tokens 12 -> 2" in notice and str(aside) in notice and "\n" not in notice
    # the same settings again: resumed, nothing generated, nothing moved
    assert _evaluate_synthetic(tiny_checkpoint, tmp_path / "eval", "max_new_tokens=2")["benchmarks"]["synthetic"]["generated_now"] == 0
    assert len(list((folder / "superseded").iterdir())) == 1
    # predictions without a record of their settings (an older panda's, or put there by hand) are kept, with a warning
    (folder / "generation.json").unlink()
    caplog.clear()
    with caplog.at_level("WARNING", logger="panda.evaluation.run"):
        kept = _evaluate_synthetic(tiny_checkpoint, tmp_path / "eval", "max_new_tokens=2")["benchmarks"]["synthetic"]
    assert kept["generated_now"] == 0 and any("record no settings" in r.getMessage() for r in caplog.records)
    assert json.loads((folder / "generation.json").read_text())["max_new_tokens"] == 2


def _settings_shown(stdout: str) -> dict[str, str]:
    """The ``evaluation settings`` block evaluate prints: setting -> the rest of its line, spaces collapsed."""
    block = stdout.split("== evaluation settings ==\n", 1)[1].split("\n\n", 1)[0]
    return {line.split()[0]: " ".join(line.split()[1:]) for line in block.splitlines() if line.strip()}


def test_a_training_checkpoint_brings_its_evaluation_settings_and_a_release_folder_keeps_the_defaults(
        tiny_checkpoint, tmp_path, capsys):
    """A train.py checkpoint's own evaluation settings (max_new_tokens 16, data.eval_batch_size,
    frames, sampling) apply where the caller set nothing; what the caller sets wins; an exported
    (release-format) folder has none of them and keeps evaluate.py's defaults (1,024 new tokens)."""
    from panda.config import to_evaluate_config
    from panda.evaluation.run import settings_in_force
    from panda.export import main as export_main
    from panda.loading import load_model

    results = _evaluate_synthetic(tiny_checkpoint, tmp_path / "eval", "benchmark.synthetic.limit=2", "sample_fps=2")
    settings = results["settings"]
    assert settings["max_new_tokens"] == {"value": 16, "from": "checkpoint: max_new_tokens"}
    assert settings["batch_size"] == {"value": 8, "from": "checkpoint: data.eval_batch_size"}
    assert settings["frames"] == {"value": 4, "from": "checkpoint: frames"}
    assert settings["sampling"] == {"value": "release", "from": "checkpoint: data.sampling"}
    assert settings["sample_fps"] == {"value": 2.0, "from": "config"}  # the caller's value wins
    assert results["decoding"]["max_new_tokens"] == 16 and "max 16 new tokens" in (tmp_path / "eval" / "results.md").read_text()
    shown = _settings_shown(capsys.readouterr().out)
    assert shown["max_new_tokens"] == "16 (checkpoint: max_new_tokens)" and shown["sample_fps"] == "2.0 (config)"

    folder = str(tmp_path / "export")
    assert export_main([tiny_checkpoint, "--out", folder]) == 0
    cfg = to_evaluate_config(compose([f"checkpoint={folder}"], config_name="evaluate"))
    resolved, sources = settings_in_force(cfg, load_model(folder), command_line=())
    assert (resolved.max_new_tokens, sources["max_new_tokens"]) == (1024, "default")
    assert (resolved.batch_size, sources["batch_size"]) == (8, "default")
    assert (resolved.frames, sources["frames"]) == (4, "checkpoint")


@pytest.mark.slow
def test_evaluate_py_prints_its_settings_and_the_command_line_wins_over_the_checkpoint(tiny_checkpoint, tmp_path):
    """max_new_tokens=1024 on the command line is the default's value, and still beats the
    checkpoint's 16; what nobody set comes from the checkpoint, and each line says so."""
    proc = run_cli(["evaluate.py", f"checkpoint={tiny_checkpoint}", "num_workers=0", "benchmark.synthetic.limit=2",
                    "max_new_tokens=1024", f"hydra.run.dir={tmp_path}"])
    shown = _settings_shown(proc.stdout)
    assert shown["max_new_tokens"] == "1024 (command line)"
    assert shown["batch_size"] == "8 (checkpoint: data.eval_batch_size)" and shown["frames"] == "4 (checkpoint: frames)"
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["decoding"]["max_new_tokens"] == 1024
    assert results["settings"]["max_new_tokens"] == {"value": 1024, "from": "command line"}
