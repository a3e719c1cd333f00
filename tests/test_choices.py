"""One enum per config choice, on one base (panda/choices.py), owned by the layer that acts on it."""

import ast
import dataclasses
import glob
import os
import typing

import pytest

import panda
from conftest import compose
from panda.choices import Choice
from panda.config import EvaluateConfig, TrainConfig, to_train_config

# the choice fields of the layers below panda.config, and the module that owns each one's enum
OWNED_BELOW = {
    "model.tokenization": "panda.data.conversation",
    "data.sampling": "panda.data.budget",
    "data.video_backend": "panda.data.video",
    "data.on_bad_record": "panda.data.records",
    "distill.loss": "panda.models.distill",
}


def _unwrap(tp):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if typing.get_origin(tp) is typing.Union and len(args) == 1 else tp


def choice_fields(schema: type, prefix: str = "") -> dict[str, type]:
    """{dotted key: its enum} for every field of ``schema`` (nested dataclasses too) typed by an Enum."""
    found = {}
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        tp = _unwrap(hints[f.name])
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            found.update(choice_fields(tp, f"{prefix}{f.name}."))
        elif isinstance(tp, type) and issubclass(tp, Choice):
            found[prefix + f.name] = tp
    return found


def test_the_choice_fields_are_typed_by_their_layers_enum():
    fields = choice_fields(TrainConfig)
    for key, module in OWNED_BELOW.items():
        assert key in fields, f"{key} is not typed by a Choice"
        assert fields[key].__module__ == module, f"{key}: {fields[key].__module__}, not {module}"
    assert choice_fields(EvaluateConfig)["sampling"] is fields["data.sampling"]


def test_the_string_tuples_of_choices_are_gone():
    from panda.data import budget, conversation
    from panda.models import distill, stab

    for module, name in [(conversation, "TOKENIZATIONS"), (budget, "SAMPLING_MODES"), (stab, "LSD_KINDS"),
                         (distill, "DISTILL_LOSSES")]:
        assert not hasattr(module, name), f"{module.__name__}.{name} repeats its enum"


def test_one_enum_base_in_the_package():
    """Only panda/choices.py subclasses Enum itself; every choice derives from its Choice."""
    root = os.path.dirname(panda.__file__)
    bases = []
    for path in glob.glob(os.path.join(root, "**", "*.py"), recursive=True):
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
            if isinstance(node, ast.ClassDef) and any(getattr(b, "id", getattr(b, "attr", None)) == "Enum" for b in node.bases):
                bases.append(f"{os.path.relpath(path, root)}:{node.name}")
    assert bases == ["choices.py:Choice"]
    for enum in set(choice_fields(TrainConfig).values()) | set(choice_fields(EvaluateConfig).values()):
        assert issubclass(enum, Choice), enum


def test_a_composed_choice_is_its_enum_and_a_python_built_one_is_checked():
    from panda.data.conversation import Tokenization, get_template

    cfg = to_train_config(compose(["model.tokenization=spans"]))
    assert cfg.model.tokenization is Tokenization.spans and f"{cfg.model.tokenization}" == "spans"
    with pytest.raises(ValueError, match=r"^model\.tokenization='bpe': use one of release, spans$"):
        get_template("vicuna_v1", "bpe")
    assert get_template("vicuna_v1", "spans").tokenization is Tokenization.spans


@pytest.mark.parametrize("override, schema", [
    ("model.tokenization=bpe", "train"), ("data.sampling=random", "train"),
    ("data.video_backend=opencv", "train"), ("distill.loss=kl", "train"), ("stage.schedule=linear", "train"),
    ("sampling=random", "evaluate"),
])
def test_an_unknown_choice_on_the_command_line_is_one_line_naming_the_options(override, schema):
    """Checked before Hydra composes (train.py, evaluate.py and panda.plan exit 2 with this line)."""
    from panda.overrides import check_overrides

    key, value = override.split("=")
    options = ", ".join(m.value for m in choice_fields({"train": TrainConfig, "evaluate": EvaluateConfig}[schema])[key])
    with pytest.raises(ValueError, match=f"^{key}={value}: use one of {options}$"):
        check_overrides([override], {"train": TrainConfig, "evaluate": EvaluateConfig}[schema], schema)
    check_overrides([f"{key}={options.split(', ')[-1]}"], {"train": TrainConfig, "evaluate": EvaluateConfig}[schema], schema)


@pytest.mark.slow
def test_train_py_refuses_an_unknown_choice_with_exit_2(tmp_path):
    from conftest import REPO, run_cli

    proc = run_cli([os.path.join(REPO, "train.py"), "data.sampling=random"], check=False, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr == ("train.py: config error: data.sampling=random: use one of release, "
                                                    "fps, budget\n")
    assert list(tmp_path.iterdir()) == []
