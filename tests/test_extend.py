"""Adding a part the way a user would: a module of their own (outside the package) registers a
projector, a spatial reducer and a judge, a config folder of their own holds the judge's YAML, and train.py /
evaluate.py use both by name."""

import json
import textwrap

import pytest

from conftest import run_cli, tiny_overrides

MY_PARTS = textwrap.dedent('''
    import torch

    from panda.evaluation.judge import JUDGES, ExactMatchJudge, Verdict
    from panda.models.stab import PROJECTORS, REDUCERS, WindowReducer


    @PROJECTORS.register("tanh_linear")
    def tanh_linear(in_dim, out_dim):
        return torch.nn.Sequential(torch.nn.Linear(in_dim, out_dim), torch.nn.Tanh())


    @REDUCERS.register("maxpool")
    class MaxPool(WindowReducer):
        """Each s×s window of patches becomes its largest value per channel."""

        def pool(self, windows):
            return windows.amax(1)


    @JUDGES.register("always_yes")
    class AlwaysYes(ExactMatchJudge):
        """Grades every answer correct: a judge whose verdicts the test can predict."""

        model = "always_yes"

        def judge_all(self, tasks, desc="judging"):
            return [Verdict(True, "yes", 5) for _ in tasks]
''')


def test_a_registry_names_what_it_has_and_how_to_add_one():
    from panda.errors import ConfigError
    from panda.registry import Registry

    parts = Registry("widget", "model.widget", "my.pkg.WIDGETS")

    @parts.register("round")
    def round_widget():
        return "round"

    assert parts["round"]() == "round" and "round" in parts and parts.names() == ["round"]
    with pytest.raises(ConfigError, match=r"model\.widget='square': no widget of that name; the registered ones: round "
                                          r"\(add one with @WIDGETS\.register\('square'\), my\.pkg\.WIDGETS, in a module "
                                          r"listed in plugins=\[\.\.\.\]\)"):
        parts["square"]
    with pytest.raises(ConfigError, match="registered twice"):
        parts.register("round")(lambda: "another")


@pytest.mark.slow
def test_a_projector_a_reducer_and_a_judge_from_a_module_outside_the_package_train_and_evaluate(synthetic_root, tmp_path):
    (tmp_path / "my_parts.py").write_text(MY_PARTS)
    (tmp_path / "conf" / "judge").mkdir(parents=True)
    (tmp_path / "conf" / "judge" / "always_yes.yaml").write_text("kind: always_yes\n")
    env = {"PYTHONPATH": str(tmp_path)}
    run_dir = tmp_path / "run"
    common = [*tiny_overrides(synthetic_root), "model.projector=tanh_linear", "stab.lsd=maxpool", "trainer.max_steps=2", "evaluate=false"]
    refused = run_cli(["train.py", *common, f"hydra.run.dir={tmp_path / 'refused'}"], check=False, env=env)
    assert refused.returncode == 2 and "stab.lsd='maxpool': no spatial reducer of that name" in refused.stderr
    assert "plugins=[...]" in refused.stderr and not (tmp_path / "refused").exists()

    run_cli(["train.py", *common, "plugins=[my_parts]", f"hydra.run.dir={run_dir}"], env=env)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["params/projector"] == 32 * 32 + 32  # one Linear (STAB width 32 -> LLM 32) + Tanh
    import torch

    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["hyper_parameters"]["cfg"]["stab"]["lsd"] == "maxpool"
    assert not [k for k in state["state_dict"] if ".lsd." in k]  # max pooling learns nothing (LSD's attention would)

    eval_dir = tmp_path / "eval"
    run_cli(["evaluate.py", f"checkpoint={run_dir / 'checkpoints' / 'last.ckpt'}", "plugins=[my_parts]",
             f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "judge=always_yes", "num_workers=0", "max_new_tokens=2",
             "benchmark.synthetic.limit=4", "benchmark.synthetic.judge=null", f"hydra.run.dir={eval_dir}"], env=env)
    results = json.loads((eval_dir / "results.json").read_text())
    assert results["benchmarks"]["synthetic"]["judged"] == 4 and results["benchmarks"]["synthetic"]["accuracy"] == 1.0
    assert results["judge"]["kind"] == "always_yes"
