from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ganbench.errors import MAX_MESSAGE, SpecError
from ganbench.spec import MAX_PROBLEMS, load_compare, load_spec, validate_spec
from ganbench.study import check_spec

STUDIES = sorted(Path(__file__).parent.parent.joinpath("studies").glob("*.yaml"))

BASE = {
    "name": "t",
    "target": {"name": "ring"},
    "train": {"steps": 20, "eval_every": 10, "eval_samples": 200, "batch_size": 64},
    "search": {"lr_g": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}},
    "trials": 3,
}



def assert_error_lines(exc, path: str) -> None:
    """Every problem of a file on a line of its own, naming the file, none too long, and
    never more than MAX_PROBLEMS lines."""
    lines = str(exc).split("\n")
    assert 1 <= len(lines) <= MAX_PROBLEMS and len(lines) == len(exc.problems)
    assert all(line.startswith(path) and len(line) <= MAX_MESSAGE for line in lines), lines

def load(tmp_path, data=None, text=None, overrides=None):
    path = tmp_path / "s.yaml"
    path.write_text(text if text is not None else yaml.safe_dump(data))
    spec = load_spec(path, overrides)
    check_spec(spec, str(path))
    return spec


def with_(path: str, value):
    data = yaml.safe_load(yaml.safe_dump(BASE))
    node = data
    keys = path.split(".")
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value
    return data


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.stem)
def test_shipped_studies_are_valid(path):
    if "arms" in yaml.safe_load(path.read_text()):  # a comparison (ganbench compare)
        spec = load_compare(path)
        check_spec(spec.arm_study(spec.targets[0], spec.baseline), str(path))
    else:
        spec = load_spec(path)
        check_spec(spec, str(path))
    assert spec.name == path.stem


def test_valid_spec_and_overrides(tmp_path):
    spec = load(tmp_path, BASE, overrides=["train.steps=50", "model.hidden=[32, 16]",
                                           "trials=7", "target.modes=4"])
    config = spec.trial_config({"lr_g": 0.01}, seed=3)
    assert (config.steps, config.hidden, config.lr_g, config.seed) == (50, [32, 16], 0.01, 3)
    assert spec.trials == 7 and config.target_params == {"modes": 4}
    assert spec.directions == ["minimize"]


@pytest.mark.parametrize("data,text,field,needle", [
    (None, "name: [unclosed", "", "invalid YAML at line 1"),
    (None, "", "", "empty file"),
    (None, "- a\n- b\n", "", "expected a mapping"),
    (with_("colour", "red"), None, "colour", "unknown key"),
    (with_("train.stepz", 5), None, "train.stepz", "unknown key"),
    (with_("trials", "many"), None, "trials", "valid integer"),
    (with_("target.name", "moon"), None, "target", "choose one of: grid, mog, ring"),
    (with_("model.loss", "bce"), None, "model.loss", "choose one of: hinge, lsgan, minimax"),
    (with_("sampler.name", "bayes"), None, "sampler.name",
     "unknown sampler 'bayes'; choose one of: tpe, random, grid"),
    (with_("pruner.name", "early"), None, "pruner.name",
     "unknown pruner 'early'; choose one of: none, median"),
    (with_("search.lr_g.low", 1.0), None, "search.lr_g", "low (1) must be <= high (0.01)"),
    (with_("search.lr_g.low", 0.0), None, "search.lr_g", "log scale needs low > 0"),
    (with_("search.hidden", {"type": "categorical", "choices": []}), None, "search.hidden",
     "non-empty 'choices'"),
    (with_("search.steps_per_day", {"type": "int", "low": 1, "high": 2}), None,
     "search.steps_per_day", "not a searchable field"),
    (with_("trials", 0), None, "trials", "greater than 0"),
    (with_("train.batch_size", 0), None, "train.batch_size", "an integer in 1.."),
    (with_("train.lr_g", 0.1), None, "search.lr_g", "not both"),
    (with_("sampler.name", "grid"), None, "search.lr_g", "grid sampler needs categorical"),
    (with_("storage", "mysql://x"), None, "storage", "expected sqlite:///PATH or postgresql"),
    (with_("objectives", [{"metric": "fid"}]), None, "objectives.0.metric",
     "unknown metric 'fid'; choose one of: w1, sliced_w1"),
    (with_("search.d_steps", {"type": "int", "low": 0, "high": 3}), None, "search.d_steps",
     "d_steps must be an integer in 1..100"),
    (with_("sampler.n_startup", 3), None, "sampler", "bad options for sampler 'tpe'"),
    (with_("target.pool", 0), None, "target.pool", "greater than 0"),
    (with_("target.pool", 10), None, "target.pool", "pool must be an integer in batch_size"),
    (with_("model.g_norm", "layer"), None, "model.g_norm", "unknown g_norm 'layer'"),
    (with_("train.update", "both"), None, "train.update", "unknown update 'both'"),
    (with_("search.lr_schedule", {"type": "categorical", "choices": ["constant", "step"]}),
     None, "search.lr_schedule", "unknown lr_schedule 'step'"),
])
def test_spec_errors_name_file_and_field(tmp_path, data, text, field, needle):
    with pytest.raises(SpecError) as info:
        load(tmp_path, data, text)
    message = str(info.value)
    assert message.startswith(str(tmp_path / "s.yaml"))
    assert info.value.field == field and needle in message
    assert message.count("\n") == len(info.value.problems) - 1  # a line per problem


def test_target_pool_is_a_trainer_option_not_a_target_parameter(tmp_path):
    spec = load(tmp_path, with_("target.pool", 5000))
    config = spec.trial_config({})
    assert config.pool == 5000 and "pool" not in config.target_params
    assert load(tmp_path, BASE).trial_config({}).pool is None


def test_missing_file(tmp_path):
    with pytest.raises(SpecError, match="file not found"):
        load_spec(tmp_path / "nope.yaml")


def test_mode_metric_needs_a_target_with_modes(tmp_path):
    data = with_("target.name", "spiral")
    data["objectives"] = [{"metric": "modes"}]
    with pytest.raises(SpecError, match="needs a target with modes"):
        load(tmp_path, data)


yaml_scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.integers(),
                         st.floats(allow_nan=True), st.text(max_size=8),
                         st.text(max_size=3000), st.sampled_from(["1e400", "-.inf", "a\n"]))
yaml_docs = st.recursive(
    yaml_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                          st.dictionaries(st.text(max_size=8), inner,
                                                          max_size=4)), max_leaves=20)
shipped = [yaml.safe_load(p.read_text()) for p in STUDIES]
KEYS = ["name", "target", "train", "model", "search", "objectives", "sampler", "pruner",
        "trials", "seeds", "storage", "tracking", "timeout", "steps", "low", "high", "choices"]


def mutate(doc, key, value, depth):
    """Replace or add ``key`` at some depth of a shipped study."""
    if depth == 0 or not isinstance(doc, dict) or not doc:
        return {**doc, key: value} if isinstance(doc, dict) else value
    k = sorted(doc)[depth % len(doc)]
    return {**doc, k: mutate(doc[k], key, value, depth - 1)}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=st.one_of(yaml_docs, st.builds(
    mutate, st.sampled_from(shipped), st.sampled_from(KEYS), yaml_docs, st.integers(0, 3))))
def test_any_document_is_a_spec_or_a_spec_error(doc):
    try:
        spec = validate_spec(doc, "fuzz.yaml")
        check_spec(spec, "fuzz.yaml")
    except SpecError as exc:
        assert_error_lines(exc, "fuzz.yaml")


COMPARES = [d for d in shipped if isinstance(d, dict) and "arms" in d]
COMPARE_KEYS = ["arms", "baseline", "targets", "mode", "budget", "eval_seeds",
                "heldout_eval_seed", "objective", "search", "train", "model", "name",
                "heartbeat", "execution", "pool", "pack", "tricks"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=st.one_of(yaml_docs, st.builds(
    mutate, st.sampled_from(COMPARES), st.sampled_from(COMPARE_KEYS), yaml_docs,
    st.integers(0, 3))))
def test_any_document_is_a_comparison_or_one_spec_error(doc):
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzz.yaml"
        path.write_text(yaml.safe_dump(doc))
        try:
            load_compare(path)
        except SpecError as exc:
            assert_error_lines(exc, str(path))


OVERRIDE_KEYS = ["name", "trials", "target.modes", "target.radius", "target.std",
                 "train.steps", "train.eval_samples", "model.depth", "model.hidden",
                 "seeds", "sampler.seed", "train.lr_g", "search.lr_g.high", "timeout"]
override_values = st.one_of(
    st.integers().map(str), st.floats().map(repr), st.text(max_size=300),
    st.sampled_from([".inf", "-.nan", "1e400", "[1, 2]", "{a: 1}", "&a [*a]", "'x\ny'"]))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.sampled_from(OVERRIDE_KEYS), value=override_values)
def test_any_override_is_a_spec_or_one_spec_error(tmp_path_factory, key, value):
    """``--set KEY=VALUE`` with any value: a valid study, or one SpecError line of bounded
    length that names the file."""
    folder = tmp_path_factory.mktemp("set")
    try:
        load(folder, BASE, overrides=[f"{key}={value}"])
    except SpecError as exc:
        assert_error_lines(exc, str(folder / "s.yaml"))


def test_a_key_given_twice_is_refused_with_its_line(tmp_path):
    text = yaml.safe_dump(BASE) + "trials: 5\n"
    with pytest.raises(SpecError, match=r"line \d+: key 'trials' given twice"):
        load(tmp_path, text=text)
    nested = "name: t\ntarget: {name: ring, modes: 4, modes: 8}\n"
    with pytest.raises(SpecError, match="key 'modes' given twice"):
        load(tmp_path, text=nested)
    # A merge key's values may be overridden: that is what merging is for.
    merged = "name: t\ntarget: {<<: {name: ring, modes: 4}, modes: 8}\ntrials: 2\n"
    assert load(tmp_path, text=merged).target.params() == {"modes": 8}


@pytest.mark.parametrize("where", ["name", "train.steps", "search.lr_g.choices",
                                   "target.extra"])
def test_alias_expansion_is_bounded_wherever_it_lands(tmp_path, where):
    """A 'billion laughs' document is refused before anything walks its expansion."""
    lines = ['x0: &x0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"x{i}: &x{i} [{', '.join([f'*x{i - 1}'] * 9)}]" for i in range(1, 9)]
    doc = yaml.safe_dump(BASE)
    head, _, leaf = where.rpartition(".")
    if not head:
        doc = "\n".join(lines) + "\n" + doc.replace("name: t\n", "name: *x8\n", 1)
    else:
        doc = "\n".join(lines) + "\n" + doc + f"{where.split('.')[0]}_bomb: *x8\n"
    with pytest.raises(SpecError, match="aliases expand to more than"):
        load(tmp_path, text=doc)


def test_a_self_referencing_alias_is_refused(tmp_path):
    with pytest.raises(SpecError, match="aliases expand"):
        load(tmp_path, text="name: &a [*a]\n")


def test_a_file_larger_than_a_study_is_refused_before_reading(tmp_path):
    from ganbench.spec import MAX_SPEC_BYTES

    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(BASE) + "#" * MAX_SPEC_BYTES + "\n")
    with pytest.raises(SpecError, match="a study file is at most"):
        load_spec(path)


@pytest.mark.parametrize("field, value, needle", [
    ("target.modes", float("inf"), "target.modes: expected a finite number"),
    ("target.modes", 10**20, "target.modes: expected a number below 2**63"),
    ("target.modes", 10**9, "target.modes: target parameter modes must be an integer in"),
    ("target.radius", float("inf"), "target.radius: expected a finite number"),
    ("target.std", float("nan"), "target.std: expected a finite number"),
    ("model.depth", 10**20, "model.depth: expected a number below 2**63"),
    ("model.depth", 10**6, "model.depth: depth must be an integer in 1..64"),
    ("model.hidden", 10**9, "model.hidden: hidden widths must be integers in 1..65536"),
    ("train.eval_samples", 10**10, "eval_samples must be an integer in 1..1000000"),
    ("train.steps", 10**12, "steps must be an integer in 1..1000000000"),
    ("train.eval_seed", -1, "eval_seed must be an integer in 0..2**63-1"),
    ("timeout", float("inf"), "timeout: expected a finite number"),
])
def test_numbers_are_finite_and_sized_for_the_trainer(tmp_path, field, value, needle):
    with pytest.raises(SpecError) as info:
        load(tmp_path, with_(field, value))
    assert needle in str(info.value), str(info.value)


@pytest.mark.parametrize("name, needle", [
    (123, 'YAML read 123 as a number: quote it, e.g. name: "123"'),
    ("a" * 201, "at most 200"),
    ("run\n", "expected a name"),
    ("../x", "expected a name"),
])
def test_a_bad_study_name_says_what_a_name_is(tmp_path, name, needle):
    with pytest.raises(SpecError) as info:
        load(tmp_path, with_("name", name))
    assert "name: " in str(info.value) and needle in str(info.value)
    assert len(str(info.value)) <= MAX_MESSAGE


COMPARE = {"name": "c", "targets": [{"name": "ring"}],
           "train": {"steps": 20, "eval_every": 10, "eval_samples": 200, "batch_size": 64},
           "arms": {"a": {}, "b": {"lr_g": 0.002}}, "baseline": "a", "mode": "fixed"}


@pytest.mark.parametrize("change, field, needle", [
    ({"targets": [{"name": "ring"}, {"name": "ring", "modes": 4}]}, "targets.1",
     "listed twice"),
    ({"arms": {"a": {}, "b\n": {}}}, "arms.", "an arm name is"),
    ({"arms": {"a": {}, "b" * 65: {}}}, "arms.", "at most 64"),
    ({"name": 7}, "name", "quote it"),
    ({"name": "c" * 65}, "name", "at most 64"),
])
def test_comparison_names_and_targets_are_refused_in_one_line(tmp_path, change, field,
                                                               needle):
    """(A comparison's and an arm's names are at most 64 characters: joined with a target's
    into an arm study's name, at most 200, which a study file may also use.)"""
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(COMPARE | change))
    with pytest.raises(SpecError) as info:
        load_compare(path)
    assert f"c.yaml: {field}" in str(info.value) and needle in str(info.value)
    assert_error_lines(info.value, str(path))


def test_an_arm_given_twice_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(COMPARE) + "arms: {a: {}}\n")
    with pytest.raises(SpecError, match="key 'arms' given twice"):
        load_compare(path)
    path.write_text(yaml.safe_dump(COMPARE).replace("  b:", "  a: {}\n  b:"))
    with pytest.raises(SpecError, match="key 'a' given twice"):
        load_compare(path)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.sampled_from(OVERRIDE_KEYS + ["storage", "tracking.uri"]), value=override_values)
def test_the_cli_answers_any_set_value_in_one_line_and_writes_nothing(tmp_path_factory, key,
                                                                     value):
    """``ganbench status SPEC --set KEY=VALUE`` (status of a study that has not run): whatever
    the value, one line on stderr, exit 2, and no file or folder created."""
    import contextlib
    import io
    import os

    from ganbench.cli import main

    folder = tmp_path_factory.mktemp("cli")
    (folder / "s.yaml").write_text(yaml.safe_dump(BASE | {"tracking": False}))
    before = sorted(folder.rglob("*"))
    err = io.StringIO()
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), \
                pytest.raises(SystemExit) as code:
            main(["status", "s.yaml", "--set", f"{key}={value}"])
    finally:
        os.chdir(cwd)
    assert code.value.code == 2, err.getvalue()
    assert err.getvalue().startswith("error: ") and err.getvalue().count("\n") == 1
    assert len(err.getvalue()) <= MAX_MESSAGE + 10
    assert sorted(folder.rglob("*")) == before


def test_the_longest_names_make_arm_studies_that_fit(tmp_path):
    from ganbench.spec import MAX_STUDY_NAME

    arm = "a" * 64
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(COMPARE | {"name": "c" * 64, "arms": {arm: {}, "b": {}},
                                              "baseline": arm, "tuning_replicates": 10}))
    spec = load_compare(path)
    name = spec.arm_study(spec.targets[0], arm, 9).name
    assert len(name) <= MAX_STUDY_NAME and len((name + "/optuna.log.cut-x").encode()) < 255
