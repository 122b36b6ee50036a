"""The JSON Schemas of study and comparison files: generated from the models that read the
files, committed in schemas/, named by every shipped study, and in agreement with the loader
on generated files (both accept, or both refuse)."""

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from ganbench.errors import GanbenchError
from ganbench.schema import field_table, json_schema
from ganbench.spec import is_compare, load_compare, load_spec

ROOT = Path(__file__).parent.parent
STUDIES = sorted((ROOT / "studies").glob("*.yaml"))


@pytest.mark.parametrize("kind", ["study", "compare"])
def test_committed_schemas_are_the_generated_ones(kind):
    committed = json.loads((ROOT / "schemas" / f"{kind}.schema.json").read_text())
    assert committed == json_schema(kind), \
        f"regenerate: ganbench schema {kind} > schemas/{kind}.schema.json"
    jsonschema.Draft202012Validator.check_schema(committed)


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.name)
def test_every_shipped_study_names_its_schema_and_passes_it(path):
    raw = yaml.safe_load(path.read_text())
    kind = "compare" if is_compare(raw) else "study"
    assert path.read_text().splitlines()[0] == \
        f"# yaml-language-server: $schema=../schemas/{kind}.schema.json"
    jsonschema.validate(raw, json_schema(kind))


def test_every_field_is_described_in_the_reference():
    """The docs' field reference comes from the same models, and no field is left bare."""
    for kind in ("study", "compare"):
        table = field_table(kind)
        rows = [line for line in table.splitlines() if line.startswith("| `")]
        assert rows and all(not line.endswith("|  |") for line in rows), \
            [line for line in rows if line.endswith("|  |")]


BASE_STUDY = {"name": "s", "target": {"name": "ring"}, "train": {"steps": 40},
              "search": {"lr_g": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}},
              "trials": 3, "tracking": False}
BASE_COMPARE = {"name": "c", "targets": [{"name": "ring"}], "train": {"steps": 40},
                "search": {"lr_g": {"type": "float", "low": 1e-4, "high": 1e-2}},
                "arms": {"plain": {}, "r1": {"tricks": {"r1": {}}}}, "baseline": "plain",
                "budget": 2, "eval_seeds": 2, "tracking": False}


def change(base, path, value):
    """``base`` with the dotted ``path`` set to ``value`` (None: removed)."""
    data = copy.deepcopy(base)
    *parents, last = path.split(".")
    node = data
    for key in parents:
        node = node.setdefault(key, {}) if not key.isdigit() else node[int(key)]
    if value is None:
        node.pop(last, None)
    elif last.isdigit():
        node[int(last)] = value
    else:
        node[last] = value
    return data


# (dotted field, value) pairs: accepted and refused shapes of every kind of field.
STUDY_CASES = [
    ("trials", 5), ("trials", 0), ("trials", "many"), ("trials", 2.5), ("trails", 5),
    ("name", None), ("target", None), ("target.name", "spiral"), ("target.name", "rign"),
    ("target.pool", 1000), ("target.pool", -1), ("train.steps", "long"),
    ("train.optimizer", "rmsprop"), ("train.optimizer", "adamw"), ("model.loss", "hinge"),
    ("model.loss", "bogus"), ("model.activation", "tanh"), ("model.activation", "gelu2"),
    ("model.hidden", [64, 32]), ("model.hidden", "wide"), ("model.widht", 3),
    ("objectives", [{"metric": "modes"}]), ("objectives", [{"metric": "w2"}]),
    ("objectives", []), ("sampler.name", "random"), ("sampler.name", "tpee"),
    ("pruner.name", "hyperband"), ("pruner.name", "never"),
    ("search.lr_g.type", "uniform"), ("search.lr_g.log", "yes"),
    ("search.hidden", {"type": "categorical", "choices": [32, 64]}),
    ("budget", {"g_steps": 100}), ("budget", {"minutes": 3}), ("budget", {"trials": 0}),
    ("tracking", {"uri": "sqlite:///m.db"}), ("tracking", True), ("tracking", {"url": "x"}),
    ("execution", {"mode": "population", "size": 4}), ("execution", {"mode": "batch"}),
    ("heartbeat.interval", -1), ("heartbeat.interval", 5), ("workers", 0), ("seeds", 3),
    ("train.tricks", {"gp": {"weight": 5}}), ("train.tricks", {"magic": {}}),
]
COMPARE_CASES = [
    ("budget", 4), ("budget", {"d_steps": 1000}), ("budget", "lots"), ("budget", 0),
    ("eval_seeds", 1), ("eval_seeds", 3), ("mode", "fixed"), ("mode", "guess"),
    ("arms.plain", {"lr_g": 0.002}), ("arms.plain", {"lr_gg": 0.002}),
    ("arms.r1", {"from": "plain", "tricks": {"r1": {}}}), ("arms.r1.tricks", {"magic": {}}),
    ("targets", []), ("targets.0.name", "grid"), ("targets.0.name", "gird"),
    ("objective", {"metric": "hq"}), ("objective", {"metric": "hqq"}),
    ("correction", {"confirmatory": "bh"}), ("correction", {"confirmatory": "fdr"}),
    ("tuning_replicates", 2), ("tuning_replicates", 0), ("baselin", "plain"),
]


def agree(tmp_path, data, kind):
    path = tmp_path / "f.yaml"
    path.write_text(yaml.safe_dump(data))
    by_schema = jsonschema.Draft202012Validator(json_schema(kind)).is_valid(data)
    try:
        (load_spec if kind == "study" else load_compare)(path)
        by_loader = True
    except GanbenchError:
        by_loader = False
    assert by_schema == by_loader, f"schema {'accepts' if by_schema else 'refuses'}, " \
        f"the loader {'accepts' if by_loader else 'refuses'}"
    return by_loader


@pytest.mark.parametrize("field,value", STUDY_CASES, ids=lambda v: str(v)[:30])
def test_schema_and_loader_agree_on_study_files(tmp_path, field, value):
    agree(tmp_path, change(BASE_STUDY, field, value), "study")


@pytest.mark.parametrize("field,value", COMPARE_CASES, ids=lambda v: str(v)[:30])
def test_schema_and_loader_agree_on_comparison_files(tmp_path, field, value):
    agree(tmp_path, change(BASE_COMPARE, field, value), "compare")


def test_the_cases_include_both_answers(tmp_path):
    """The generated files are not all valid or all invalid: the agreement means something."""
    answers = {agree(tmp_path, change(BASE_STUDY, f, v), "study") for f, v in STUDY_CASES}
    answers |= {agree(tmp_path, change(BASE_COMPARE, f, v), "compare")
                for f, v in COMPARE_CASES}
    assert answers == {True, False}
