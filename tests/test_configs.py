import glob
import json
import os

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from conftest import CONF, compose, run_cli, tiny_overrides
from panda.config import to_train_config
from panda.training.run import train

validate = to_train_config  # composition -> typed, validated config objects (raises naming the key)

EXPERIMENTS = sorted(os.path.relpath(p, os.path.join(CONF, "experiment"))[:-5]
                     for p in glob.glob(os.path.join(CONF, "experiment", "**", "*.yaml"), recursive=True))
ABLATIONS = [e for e in EXPERIMENTS if e.startswith("ablation/")]
RECIPE = [e for e in EXPERIMENTS if e.startswith("videopanda_7b/")]
VARIANTS = sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(CONF, "variant", "*.yaml")))


def test_the_default_composes_to_the_tiny_synthetic_run():
    cfg = compose()
    validate(cfg)
    assert cfg.data.name == "synthetic" and cfg.stage.name == "scratch" and cfg.frames == 4
    assert cfg.stab.width == 64 and cfg.llm.pretrained is None
    # the default trains on benchmark v2 with 1-2x motion on training clips, and a 1/sqrt(hidden) LLM init
    assert cfg.data.synthetic.version == 2 and cfg.data.synthetic.train_motion_scale == 2.0
    assert cfg.data.synthetic.question_mix == {"colour": 0.3} and cfg.data.synthetic.train_videos == 1120
    assert cfg.llm.initializer_range == cfg.llm.hidden_size**-0.5


def test_release_stab_and_paper_stages_compose():
    cfg = compose(["stab=release", "stage=prealign", "frames=8"])
    validate(cfg)
    assert (cfg.stab.width, cfg.stab.resolution, cfg.stab.chunk_size) == (1024, 448, 4)
    assert not cfg.stage.train_llm and cfg.stage.vision_lr == 4e-4 and cfg.stage.lr == 4e-5


@pytest.mark.parametrize("experiment", ABLATIONS)
def test_every_ablation_composes_and_trains_one_step(experiment, synthetic_root, tmp_path):
    cfg = compose(tiny_overrides(synthetic_root, str(tmp_path)) + [f"experiment={experiment}", "debug=fast_dev_run"])
    validate(cfg)
    summary = train(cfg)
    assert summary["train/steps"] == 1 and summary["eval/num_questions"] == 6  # data.eval_limit
    assert summary["name"] == cfg.name != "default"


def test_recipe_configs_hold_the_papers_values():
    paths = ["teacher.path=/m/LanguageBind_Video_merge", "data.root=/data", "runs_root=/runs"]
    expect = {  # stage: (data, train_llm, lr, vision_lr, warmup, global batch, init kind, starts from)
        "stage1_prealign": ("valley", False, 4e-5, 4e-4, 0.03, 2048, "eve", "/m/EVE-7B-Pretrain-v1.0"),
        "stage2_pretrain": ("valley", True, 4e-5, None, 0.01, 2048, "release", "/runs/videopanda_7b/stage1_prealign/final"),
        "stage3_finetune": ("videochatgpt", True, 2e-5, None, 0.01, 1024, "release", "/runs/videopanda_7b/stage2_pretrain/final"),
    }
    assert sorted(e.split("/")[1] for e in RECIPE) == sorted(expect)
    for stage, (data, train_llm, lr, vision_lr, warmup, batch, init, start) in expect.items():
        eve = ["init.path=/m/EVE-7B-Pretrain-v1.0"] if stage == "stage1_prealign" else []  # later stages: by reference
        cfg = compose([f"experiment=videopanda_7b/{stage}"] + paths + eve)
        validate(cfg)
        assert (cfg.data.name, cfg.stage.train_llm, cfg.stage.lr, cfg.stage.vision_lr) == (data, train_llm, lr, vision_lr)
        assert (cfg.stage.warmup_ratio, cfg.trainer.global_batch_size, cfg.init.kind, cfg.init.path) == (warmup, batch, init, start)
        assert cfg.stage.schedule == "cosine" and cfg.stage.weight_decay == 0.0 and cfg.trainer.max_epochs == 1
        assert cfg.frames == 8 and cfg.model.max_length == 4096 and cfg.model.gradient_checkpointing
        assert cfg.seed == 42 and cfg.stab.width == 1024
        if train_llm:  # the whole LLM trains: FSDP2 in bf16 with fp32 master weights (python -m panda.plan)
            assert cfg.trainer.strategy == "fsdp" and cfg.trainer.fsdp.param_dtype == "bfloat16"
            assert cfg.trainer.fsdp.reduce_dtype == "float32" and cfg.trainer.fsdp.activation_checkpointing
        else:  # frozen LLM: DDP with the LLM stored in bf16
            assert cfg.trainer.precision == "bf16-mixed" and cfg.llm.dtype == "bfloat16"
        assert cfg.teacher.kind == "languagebind_video" and cfg.distill.loss == "cosine" and cfg.distill.weight == 1.0
        assert cfg.teacher.dtype == "bfloat16"  # frozen: the compute dtype
        assert cfg.data.fraction == (0.5 if stage == "stage1_prealign" else 1.0)
    with pytest.raises(ValueError, match="init.path"):  # the EVE folder is required
        validate(compose(["experiment=videopanda_7b/stage1_prealign"] + paths))
    with pytest.raises(ValueError, match="teacher.path"):  # and so is the teacher: never a silent random one
        validate(compose(["experiment=videopanda_7b/stage2_pretrain", "data.root=/data"]))
    with pytest.raises(ValueError, match="data.root"):  # real data has no default location
        validate(compose(["experiment=videopanda_7b/stage3_finetune", "teacher.path=/m/LB"]))


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_paper_table_row_composes_on_every_recipe_stage_and_chains_in_its_own_folder(variant):
    paths = ["teacher.path=/m/teacher", "data.root=/data", "runs_root=/runs", "init.path=/m/EVE"]
    expect = {  # row: (distillation loss, stage-1 data fraction, teacher kind)
        "table5_no_distill": ("off", 0.5, "languagebind_video"), "table5_mse": ("mse", 0.5, "languagebind_video"),
        "table5_cosine": ("cosine", 0.5, "languagebind_video"),
        "table7_stage1_all_valley": ("cosine", 1.0, "languagebind_video"),
        "table7_stage1_half_valley": ("cosine", 0.5, "languagebind_video"),
        "table10_clip": ("cosine", 0.5, "hf_vision"), "table10_dinov2": ("cosine", 0.5, "hf_vision"),
        "table9_perceiver": ("off", 0.5, "languagebind_video"),
        "table9_half_res_no_lsd": ("cosine", 0.5, "languagebind_video"),
    }
    stab = {"table9_perceiver": ("perceiver", 448, 2), "table9_half_res_no_lsd": ("none", 224, 1)}.get(variant, ("attention", 448, 2))
    assert set(VARIANTS) == set(expect)
    loss, fraction, teacher = expect[variant]
    for k, stage in enumerate(["stage1_prealign", "stage2_pretrain", "stage3_finetune"]):
        overrides = [f"experiment=videopanda_7b/{stage}", f"variant={variant}"] + paths[:3 + (k == 0)]
        cfg = validate(compose(overrides))
        assert cfg.recipe == f"videopanda_7b_{variant}" and cfg.name == f"videopanda_7b_{variant}_{stage}"
        assert (str(cfg.distill.loss), cfg.teacher.kind) == (loss, teacher)
        assert cfg.data.fraction == (fraction if k == 0 else 1.0)
        assert (cfg.stab.lsd, cfg.stab.resolution, cfg.stab.ratio) == stab
        if k:  # each stage starts from the previous stage of the same row
            previous = ["stage1_prealign", "stage2_pretrain"][k - 1]
            assert cfg.init.path == f"/runs/videopanda_7b_{variant}/{previous}/final"
    if teacher == "hf_vision":  # the row's teacher folder is required, never a silent default
        with pytest.raises(ValueError, match="teacher.path"):
            validate(compose(["experiment=videopanda_7b/stage2_pretrain", f"variant={variant}", "data.root=/data"]))


@pytest.mark.parametrize("override, message", [
    ("stab.widht=32", "widht"),
    ("stab.width=wide", "width"),
    ("trainer.max_steps=1.5", "max_steps"),
    ("stage.schedule=linear", "stage.schedule"),
    ("trainer.strategy=deepspeed", "trainer.strategy"),
    ("init.kind=hub", "init.kind"),
    ("distill.loss=kl", "distill.loss"),
    ("data.on_bad_record=ignore", "data.on_bad_record"),
    ("model.tokenization=bpe", "model.tokenization"),
    ("data.sampling=random", "data.sampling"),
    ("data.video_backend=opencv", "data.video_backend"),
])
def test_invalid_overrides_fail_naming_the_key(override, message):
    with pytest.raises((ConfigCompositionException, ConfigKeyError, ValidationError)) as err:
        compose([override])
    assert message in str(err.value) + str(err.value.__cause__)


@pytest.mark.parametrize("override, message", [
    ("frames=6", "stab.chunk_size"),
    ("teacher=languagebind_video", "teacher.path"),
    ("teacher.kind=clip", "teacher.kind"),
    ("+trainer.max_step=5", r"trainer\.max_step \(did you mean trainer\.max_steps\?\)"),  # `+` cannot add a typo
    ("+data.synthetic.kind=[colour]", "did you mean data.synthetic.kinds"),
    ("trainer=fsdp trainer.accelerator=cpu trainer.fsdp.cpu_offload=true", "cpu_offload"),
    ("stab.lsd=perceiver teacher=languagebind_video teacher.path=/t", "teacher=none"),  # PR latents have no patch
    ("stab.lsd=maxpool", r"stab\.lsd='maxpool': no spatial reducer of that name; the registered ones: attention, "
                         r"avgpool, none, perceiver \(add one with @REDUCERS\.register"),  # a plugin can add one
    ("data.synthetic.kinds=[mark] data.synthetic.version=1", "version 1 asks colour, shape, direction"),
    ("data.synthetic.version=4", "data.synthetic.version=4"),
])
def test_semantic_errors_name_the_key_and_fix(override, message):
    with pytest.raises(ValueError, match=message):
        validate(compose(override.split()))


@pytest.mark.slow
def test_multirun_sweeps_ablations_and_frames_from_the_cli(synthetic_root, tmp_path):
    sweep = tmp_path / "sweep"
    run_cli(["train.py", "--multirun", "experiment=ablation/no_fsra,ablation/no_gstra", "frames=4,8",
             "debug=fast_dev_run", f"hydra.sweep.dir={sweep}", *tiny_overrides(synthetic_root)])
    summaries = [json.loads(open(p).read()) for p in sorted(glob.glob(str(sweep / "*" / "summary.json")))]
    assert sorted((s["name"], s["frames"]) for s in summaries) == [
        ("ablation_no_fsra", 4), ("ablation_no_fsra", 8), ("ablation_no_gstra", 4), ("ablation_no_gstra", 8)]


def test_wandb_run_a_lab_would_use(synthetic_root, tmp_path):
    """Offline wandb: config with command line, overrides and commit; a name from the experiment and
    overrides; grad norm and learning rate per step; val/loss and a samples table with frames during
    training, whose images also land in the run folder."""
    run_dir = tmp_path / "run"
    run_cli(["train.py", "experiment=ablation/no_fsra", "seed=3", *tiny_overrides(synthetic_root), "logger=wandb",
             "trainer.max_steps=4", "trainer.log_every_n_steps=1", "logger.val_every_n_steps=2",
             "logger.val_loss_items=4", "logger.table_items=2", f"hydra.run.dir={run_dir}"],
            env={"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_API_KEY": ""})
    summary = json.loads((run_dir / "summary.json").read_text())
    runs = glob.glob(str(run_dir / "wandb" / "offline-run-*"))
    assert len(runs) == 1
    # an offline run keeps config and history in its .wandb record file (what `wandb sync` uploads)
    (record,) = glob.glob(os.path.join(runs[0], "*.wandb"))
    data = open(record, "rb").read()
    for needle in (b"params/stab", str(summary["params/stab"]).encode(), b"train/loss", b"eval/accuracy", b"use_fsra",
                   b"optim/grad_norm", b"lr/vision", b"val/loss", b"samples", b"git_commit", b"train.py",
                   b"ablation/no_fsra seed=3", b"perf/tflops_per_device", b"perf/mfu"):
        assert needle in data, needle
    samples = sorted((run_dir / "samples").glob("*.jsonl"))
    assert [p.name for p in samples] == ["step000002.jsonl", "step000004.jsonl"]
    rows = [json.loads(line) for line in samples[-1].read_text().splitlines()]
    assert len(rows) == 2 and all((run_dir / "samples" / r["frames"]).is_file() for r in rows)
    assert {"question", "answer", "prediction"} <= set(rows[0])


@pytest.mark.slow
def test_ddp_trains_with_two_cpu_processes(synthetic_root, tmp_path):
    run_dir = tmp_path / "ddp"
    result = run_cli(["train.py", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_steps=3",
                      f"hydra.run.dir={run_dir}", *tiny_overrides(synthetic_root), "logger=csv"])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["train/steps"] == 3 and summary["eval/num_questions"] == 6
    assert "distributed_backend=gloo" in result.stderr + result.stdout
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in result.stderr + result.stdout


@pytest.mark.slow
def test_a_config_error_is_one_line_exit_2_and_leaves_no_run_folder(tmp_path):
    import os

    from conftest import REPO

    proc = run_cli([os.path.join(REPO, "train.py"), "+trainer.max_step=5"], check=False, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == ("train.py: config error: unknown config key(s): trainer.max_step (did you mean "
                                   "trainer.max_steps?). Every key must exist in the schema (panda/config.py); "
                                   "`+key=value` cannot add new ones.")
    assert list(tmp_path.iterdir()) == []  # Hydra's outputs/default/<time>/ is gone again


@pytest.mark.parametrize("group, typo, closest", [
    ("experiment", "ablation/no_fsr", "ablation/no_fsra"),
    ("experiment", "videopanda_7b/stage2_pretrian", "videopanda_7b/stage2_pretrain"),
    ("variant", "table5_mes", "table5_mse"),
    ("debug", "fast_dev", "fast_dev_run"),
])
def test_a_misspelt_group_option_fails_naming_the_closest(group, typo, closest):
    """A group option that is not a file must never compose the baseline under the typo's name."""
    from hydra.errors import MissingConfigException

    from panda.config import TrainConfig
    from panda.overrides import check_overrides

    with pytest.raises(MissingConfigException):  # composition itself: the groups are not `optional`
        compose([f"{group}={typo}"])
    with pytest.raises(ValueError, match=f"did you mean {group}={closest}"):
        check_overrides([f"{group}={typo}"], TrainConfig)
    with pytest.raises(ValueError, match=f"{group}={typo}: there is no config"):  # one bad point of a sweep
        check_overrides([f"{group}={closest},{typo}", "frames=4,8"], TrainConfig)
    check_overrides([f"{group}={closest}", f"{group}=null"], TrainConfig)  # the real names pass


@pytest.mark.parametrize("overrides, schema, message", [
    (["trainer.max_step=5"], "train", r"trainer\.max_step \(did you mean trainer\.max_steps\?\)"),
    (["+trainer.max_step=5"], "train", r"trainer\.max_step \(did you mean trainer\.max_steps\?\)"),
    (["data.synthetic.kind=[colour]"], "train", r"did you mean data\.synthetic\.kinds\?"),
    (["stab=release", "stab.widht=32"], "train", r"stab\.widht \(did you mean stab\.width\?\)"),
    (["max_new_token=3"], "evaluate", r"max_new_token \(did you mean max_new_tokens\?\)"),
    (["benchmark=[msvd_qa]", "benchmark.msvd_qa.rot=/d"], "evaluate", r"benchmark\.msvd_qa\.rot \(did you mean benchmark\.msvd_qa\.root\?\)"),
    (["benchmark=[msvd_qa,vcgbnch]"], "evaluate", r"did you mean benchmark=vcgbench\?"),
    (["judge=opanai"], "evaluate", r"did you mean judge=openai\?"),
])
def test_a_misspelt_key_names_the_closest_key(overrides, schema, message):
    from panda.config import EvaluateConfig, TrainConfig
    from panda.overrides import check_overrides

    with pytest.raises(ValueError, match=message):
        check_overrides(overrides, {"train": TrainConfig, "evaluate": EvaluateConfig}[schema], schema)


@pytest.mark.parametrize("override, group", [("logger.kind=wandb", "logger"), ("teacher.kind=hf_vision", "teacher")])
def test_the_kind_of_a_logger_or_teacher_is_its_group_choice(override, group):
    from panda.config import EvaluateConfig, TrainConfig
    from panda.overrides import check_overrides

    with pytest.raises(ValueError, match=rf"{group}\.kind is set by the {group} group: choose {group}=<option>"):
        check_overrides([f"{group}=none", override], TrainConfig)
    with pytest.raises(ValueError, match=r"judge\.kind is set by the judge group: .*exact_match, openai"):
        check_overrides(["judge.kind=openai"], EvaluateConfig, "evaluate")


def test_real_overrides_pass_the_command_line_check():
    from panda.config import EvaluateConfig, TrainConfig
    from panda.overrides import check_overrides

    check_overrides(["experiment=ablation/no_fsra,ablation/no_gstra", "frames=4,8", "seed=range(0,3)", "stab.lsd=none",
                     "data.synthetic.kinds=[colour]", "data.synthetic=null", "hydra.run.dir=/x", "hydra/launcher=joblib",
                     "+stage.lr=1e-4", "~data.eval_qa", "llm.lora.rank=4", "trainer.fsdp.param_dtype=null"], TrainConfig)
    check_overrides(["benchmark=[msvd_qa,vcgbench]", "benchmark.msvd_qa.root=/d", "judge=openai", "judge.extra.top_p=1"],
                    EvaluateConfig, "evaluate")


@pytest.mark.slow
def test_misspelt_experiment_exits_2_naming_the_closest_and_trains_nothing(tmp_path):
    from conftest import REPO

    from conftest import run_clis

    train = os.path.join(REPO, "train.py")
    proc, sweep, plan = run_clis([
        [train, "experiment=ablation/no_fsr", "trainer.max_steps=1"],
        [train, "--multirun", "experiment=ablation/no_fsra,ablation/no_fsr", "trainer.max_step=1"],
        ["-m", "panda.plan", "experiment=videopanda_7b/stage2_pretrian"]], cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("train.py: config error: experiment=ablation/no_fsr: there is no config")
    assert "did you mean experiment=ablation/no_fsra" in proc.stderr
    assert sweep.returncode == 2 and "experiment=ablation/no_fsr:" in sweep.stderr
    assert "trainer.max_step (did you mean trainer.max_steps?)" in sweep.stderr  # no "use +trainer.max_step"
    assert plan.returncode == 2 and "did you mean experiment=videopanda_7b/stage2_pretrain" in plan.stderr
    assert list(tmp_path.iterdir()) == []  # no run or sweep folder


@pytest.mark.parametrize("preset", ["local", "chat", "qwen2_5", "llama3", "mistral"])
def test_an_llm_preset_without_its_folder_names_llm_pretrained(preset):
    with pytest.raises(ValueError, match=r"^needs llm\.pretrained=PATH: a local Hugging Face folder"):
        validate(compose([f"llm={preset}"]))
    assert validate(compose([f"llm={preset}", "llm.pretrained=/m/x"])).llm.pretrained == "/m/x"


def test_a_wrong_llm_folder_names_llm_pretrained(synthetic_root, tmp_path):
    from panda.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^llm\.pretrained=/nope: no such folder; set llm\.pretrained"):
        train(compose(tiny_overrides(synthetic_root, str(tmp_path)) + ["llm=local", "llm.pretrained=/nope"]))
    with pytest.raises(ConfigError, match=r"holds no config\.json: it is not a Hugging Face model folder"):
        train(compose(tiny_overrides(synthetic_root, str(tmp_path)) + ["llm=local", f"llm.pretrained={tmp_path}"]))
    with pytest.raises(ConfigError, match=r"^llm\.tokenizer=/nope: no such folder"):
        train(compose(tiny_overrides(synthetic_root, str(tmp_path)) + ["llm.tokenizer=/nope"]))


def test_the_chat_llm_presets_are_one_preset_that_selects_the_chat_format():
    """llm=chat picks model=chat (the tokenizer's chat_template, span labels); the family names are
    the same preset, and no llm preset writes outside its own group or depends on the defaults order."""
    composed = {preset: compose([f"llm={preset}", "llm.pretrained=/m"]) for preset in ("chat", "qwen2_5", "llama3", "mistral")}
    assert all(c == composed["chat"] for c in composed.values())
    assert (composed["chat"].model.template, composed["chat"].model.eval_template, composed["chat"].model.tokenization) == (
        "chat", "chat", "spans")
    assert compose(["llm=local", "llm.pretrained=/m"]).model == compose([]).model  # the release's Vicuna format
    for path in glob.glob(os.path.join(CONF, "llm", "*.yaml")):
        assert "@package _global_" not in open(path).read(), path


def test_adapters_on_a_stage_that_freezes_the_llm_are_refused():
    with pytest.raises(ValueError, match=r"llm\.adapter=lora: stage 'prealign' does not train the LLM"):
        validate(compose(["stage=prealign", "llm.adapter=lora"]))
    assert validate(compose(["stage=finetune", "llm.adapter=lora"])).llm.adapter == "lora"


@pytest.mark.slow
def test_refused_runs_leave_no_run_folder(synthetic_root, tmp_path):
    """Refused at composition, at the start of train(), or with nothing left to train: outputs/ stays
    as it was (the finished run keeps its folder; the call that found it finished makes none)."""
    from conftest import REPO

    from conftest import run_clis

    train_py = os.path.join(REPO, "train.py")
    refusals = (["llm=qwen2_5"], ["llm=local", "llm.pretrained=/nope"], ["stage=prealign", "llm.adapter=lora"])
    for refused, proc in zip(refusals, run_clis([[train_py, *tiny_overrides(synthetic_root), *refused]
                                                 for refused in refusals], cwd=tmp_path)):
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert proc.stderr.count("\n") == 1 and "llm." in proc.stderr, refused  # one line naming the key
    assert list(tmp_path.iterdir()) == []
    common = [*tiny_overrides(synthetic_root), "name=finished", "trainer.max_steps=1", "evaluate=false"]
    run_cli([train_py, *common], cwd=tmp_path)
    (first,) = (tmp_path / "outputs" / "finished").iterdir()
    proc = run_cli([train_py, *common, "resume=auto"], cwd=tmp_path)
    assert "there is nothing left to train" in proc.stdout
    assert list((tmp_path / "outputs" / "finished").iterdir()) == [first]


def test_evaluate_without_a_checkpoint_names_the_key():
    from panda.config import to_evaluate_config

    with pytest.raises(ValueError, match=r"evaluate\.py needs checkpoint=PATH"):
        to_evaluate_config(compose([], config_name="evaluate"))


def test_validation_loss_and_samples_are_logged_once_per_interval(synthetic_root, tmp_path):
    import csv

    from conftest import train_tiny

    train_tiny(synthetic_root, tmp_path, "logger=csv", "trainer.max_steps=6", "trainer.log_every_n_steps=1",
               "logger.val_every_n_steps=2", "logger.val_loss_items=4", "logger.table_items=1", "evaluate=false")
    rows = list(csv.DictReader(open(tmp_path / "csv" / "metrics.csv")))
    val = [(int(r["step"]), float(r["val/loss"])) for r in rows if r.get("val/loss")]
    assert [s for s, _ in val] == [2, 4, 6] and len({v for _, v in val}) == 3  # once each, never repeated
    grad = [r for r in rows if r.get("optim/grad_norm")]
    assert len(grad) == 6 and all(float(r["optim/grad_norm"]) > 0 for r in grad)
    assert all(float(r["perf/tflops_per_device"]) > 0 and 0 < float(r["perf/mfu"]) < 1 for r in rows if r.get("perf/mfu"))
    assert sorted(p.name for p in (tmp_path / "samples").glob("*.jsonl")) == [
        "step000002.jsonl", "step000004.jsonl", "step000006.jsonl"]
