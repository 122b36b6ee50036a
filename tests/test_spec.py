from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ganbench.errors import SpecError
from ganbench.spec import load_compare, load_spec, validate_spec
from ganbench.study import check_spec

STUDIES = sorted(Path(__file__).parent.parent.joinpath("studies").glob("*.yaml"))

BASE = {
    "name": "t",
    "target": {"name": "ring"},
    "train": {"steps": 20, "eval_every": 10, "eval_samples": 200, "batch_size": 64},
    "search": {"lr_g": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}},
    "trials": 3,
}


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
    (with_("train.batch_size", 0), None, "train.batch_size", "positive integer"),
    (with_("train.lr_g", 0.1), None, "search.lr_g", "not both"),
    (with_("sampler.name", "grid"), None, "search.lr_g", "grid sampler needs categorical"),
    (with_("storage", "mysql://x"), None, "storage", "expected sqlite:///PATH or postgresql"),
    (with_("objectives", [{"metric": "fid"}]), None, "objectives.0.metric",
     "unknown metric 'fid'; choose one of: w1, sliced_w1"),
    (with_("search.d_steps", {"type": "int", "low": 0, "high": 3}), None, "search.d_steps",
     "d_steps must be a positive integer"),
    (with_("sampler.n_startup", 3), None, "sampler", "bad options for sampler 'tpe'"),
    (with_("target.pool", 0), None, "target.pool", "greater than 0"),
    (with_("target.pool", 10), None, "target.pool", "pool must be an integer >= batch_size"),
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
    assert "\n" not in message


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


yaml_scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6),
                         st.floats(allow_nan=True), st.text(max_size=8))
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
        assert str(exc).startswith("fuzz.yaml") and "\n" not in str(exc)


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
            assert str(exc).startswith(str(path)) and "\n" not in str(exc)
