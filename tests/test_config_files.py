"""The files in conf/ themselves: each value is declared once, and each group sets only its own keys.

A value in a config file that equals what the composed config would hold without it (the schema
default in panda/config.py, or the preset an experiment or variant builds on) is a second copy of a
setting: the two drift apart the day one of them changes. The first test composes every file of
conf/ in the context where it is used with the file's values taken out (its package header and
defaults list stay), and fails on every value the file sets to what that composition already holds:
a value the file could drop without changing the composed config.
"""

import glob
import os
import re
import shutil
from enum import Enum

import pytest
from omegaconf import Container, DictConfig, OmegaConf

from conftest import CONF

RECIPE_STAGES = ["videopanda_7b/stage1_prealign", "videopanda_7b/stage2_pretrain", "videopanda_7b/stage3_finetune"]
TRAIN_GROUPS = ("stab", "model", "llm", "data", "stage", "trainer", "teacher", "debug", "experiment")
TRAINERS = sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(CONF, "trainer", "*.yaml")))
FILES = sorted(os.path.relpath(p, CONF) for p in glob.glob(os.path.join(CONF, "**", "*.yaml"), recursive=True))



def contexts(path: str, hardware: bool = False) -> list[tuple[str, list[str]]]:
    """Where a file is used: (entry config, overrides that select it). A value is inherited only if
    it is inherited in every one of them (a variant applies to each recipe stage). ``hardware``: the
    file sets trainer.* keys, which a trainer= option also sets; any config may run on any of them."""
    if hardware and os.path.dirname(path) != "trainer":
        return [(name, overrides + extra) for name, overrides in contexts(path)
                for extra in [[]] + [[f"trainer={t}"] for t in TRAINERS]]
    group, option = os.path.dirname(path), os.path.basename(path)[:-5]
    if not group:
        return [(option, [])]  # an entry config over its schema
    top = group.split("/")[0]
    option = os.path.relpath(path, top)[:-5] if top == "experiment" else option
    if top in TRAIN_GROUPS:
        return [("train", [f"{top}={option}"])]  # over the default
    if group == "hydra/launcher":
        return [("train", [f"hydra/launcher={option}"])]
    if group == "variant":  # over each recipe stage it applies to
        return [("train", [f"experiment={stage}", f"variant={option}"]) for stage in RECIPE_STAGES]
    if group == "logger":  # train.py's and evaluate.py's
        return [("train", [f"logger={option}"]), ("evaluate", [f"logger={option}"])]
    if group == "benchmark":
        return [("evaluate", [f"benchmark=[{option}]"])]
    if group == "judge":
        return [("evaluate", [f"judge={option}"])]
    raise AssertionError(f"conf/{path}: no context to compose it in; add its group to contexts()")


def package(path: str, text: str) -> list[str]:
    """Where the file's keys land in the composed config."""
    header = re.search(r"^#\s*@package\s+(\S+)", text, re.M)
    name = header.group(1) if header else os.path.dirname(path).replace("/", ".")
    return [] if name in ("", "_global_") else name.split(".")


def leaves(node: DictConfig, prefix=()) -> list[tuple[str, ...]]:
    """Key paths of the values a file sets (a list is one value; nested mappings are walked)."""
    found = []
    for key in node.keys():
        if not prefix and key == "defaults":
            continue
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_none() and not child._is_missing() \
                and not child._is_interpolation() and len(child):
            found += leaves(child, prefix + (key,))
        else:
            found.append(prefix + (key,))
    return found


def skeleton(node: DictConfig, prefix=()) -> dict:
    """The file's mappings without their values (so a nested node the file creates still exists)."""
    out = {}
    for key in node.keys():
        child = node._get_node(key)
        if not prefix and key == "defaults":
            out[key] = OmegaConf.to_container(child, resolve=False)
        elif isinstance(child, DictConfig) and not child._is_none() and not child._is_missing() \
                and not child._is_interpolation() and len(child):
            out[key] = skeleton(child, prefix + (key,))
    return out


def compose(overrides=(), config_name="train", config_dir=CONF, return_hydra_config=False) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from panda.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides), return_hydra_config=return_hydra_config)


ABSENT = object()


def raw(node):
    """A node's value as written (interpolations unresolved, choices as strings)."""
    if node._is_missing():
        return "???"
    if node._is_none():
        return None
    if node._is_interpolation() or not isinstance(node, Container):
        value = node._value()
        return value.value if isinstance(value, Enum) else value
    return OmegaConf.to_container(node, resolve=False, enum_to_str=True)


def lookup(cfg: DictConfig, keys) -> object:
    node = cfg
    for key in keys:
        if not isinstance(node, DictConfig) or node._is_none() or node._is_missing() or node._is_interpolation():
            return ABSENT
        if key not in node.keys():
            return ABSENT
        node = node._get_node(key)
    return raw(node)


def same(value, inherited) -> bool:
    """Whether setting ``value`` over ``inherited`` leaves it as it is. ``???`` never replaces a value
    (merging it keeps what was there, a None default included): it only creates a key that is absent."""
    if value is ABSENT or inherited is ABSENT:
        return False
    if value == "???":
        return True
    return isinstance(value, bool) == isinstance(inherited, bool) and value == inherited


@pytest.fixture(scope="module")
def conf_copy(tmp_path_factory):
    """A copy of conf/ whose files a test may rewrite one at a time."""
    root = str(tmp_path_factory.mktemp("conf") / "conf")
    shutil.copytree(CONF, root)
    return root


def restated(conf_copy: str, path: str) -> list[str]:
    """The values of conf/<path> that equal what the composed config holds without them."""
    with open(os.path.join(CONF, path)) as f:
        text = f.read()
    values = OmegaConf.load(os.path.join(CONF, path))
    where = package(path, text)
    keys = leaves(values)
    if not keys:
        return []
    header = "".join(line + "\n" for line in text.splitlines() if re.match(r"^#\s*@package\s", line))
    copy = os.path.join(conf_copy, path)
    inherited = {}
    try:  # the file without its values (its header and defaults list stay)
        with open(copy, "w") as f:
            f.write(header + OmegaConf.to_yaml(OmegaConf.create(skeleton(values))))
        for config_name, overrides in contexts(path, hardware=any((where + list(key))[0] == "trainer" for key in keys)):
            cfg = compose(overrides, config_name=config_name, config_dir=conf_copy, return_hydra_config=True)
            for key in keys:
                inherited.setdefault(key, []).append((lookup(cfg, where + list(key)), f"{config_name}.py {' '.join(overrides)}".strip()))
    finally:
        shutil.copyfile(os.path.join(CONF, path), copy)
    found = []
    for key in keys:
        value = lookup(values, key)
        if all(same(value, parent) for parent, _ in inherited[key]):
            contexts_ = "; ".join(context for _, context in inherited[key])
            found.append(f"conf/{path}: {'.'.join(where + list(key))}: {value!r} is what it inherits ({contexts_})")
    return found


@pytest.mark.parametrize("path", FILES)
def test_a_config_file_sets_no_value_it_would_inherit(conf_copy, path):
    """An experiment over the default, a group option over the schema, a variant over every recipe
    stage: each value must change the composed config (a comment may say what a default is)."""
    found = restated(conf_copy, path)
    assert not found, "values equal to what they inherit (remove them):\n" + "\n".join(found)


# what a trainer= option chooses: the machine and how the run spreads over it, never the schedule
HARDWARE = {"accelerator", "devices", "num_nodes", "strategy", "fsdp", "precision", "cpu_threads", "peak_tflops",
            "plan_check"}


@pytest.mark.parametrize("trainer", TRAINERS)
def test_a_trainer_option_sets_only_the_hardware(trainer):
    values = OmegaConf.load(os.path.join(CONF, "trainer", f"{trainer}.yaml"))
    assert set(values.keys()) <= HARDWARE, f"trainer={trainer} sets {sorted(set(values.keys()) - HARDWARE)}"


@pytest.mark.parametrize("chosen", [[], ["data=json"]] + [[f"experiment={stage}"] for stage in RECIPE_STAGES], ids=str)
def test_the_schedule_does_not_depend_on_the_trainer_choice(chosen):
    """The default (own data, each recipe stage) trains as long, logs, checkpoints and validates as
    often on any trainer= option: the schedule belongs to the data, the stage or the entry config."""
    reference = None
    for trainer in TRAINERS:
        cfg = OmegaConf.to_container(compose(chosen + [f"trainer={trainer}"]), resolve=False, enum_to_str=True)
        schedule = {k: v for k, v in cfg.pop("trainer").items() if k not in HARDWARE}
        if reference is None:
            reference = (trainer, schedule, cfg)
            continue
        assert schedule == reference[1], f"trainer={trainer} vs trainer={reference[0]}"
        assert cfg == reference[2], f"trainer={trainer} vs trainer={reference[0]}"  # everything outside trainer.*
    epochs = 20 if not chosen else 1  # the synthetic default's 20 (conf/data/synthetic.yaml); one epoch of real data
    assert (reference[1]["max_epochs"], reference[1]["max_steps"]) == (epochs, -1)
    assert reference[1]["checkpoint_every_n_steps"] == 500 and reference[1]["log_every_n_steps"] == 10
