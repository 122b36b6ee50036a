"""The population engine trains what `train` trains: member by member, to rounding."""

import dataclasses
import logging
import math
import threading

import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient
from optuna.storages.journal import JournalFileBackend

from ganbench import population
from ganbench.population import BATCHED_TRICKS, train_population, unbatchable
from ganbench.train import TrainConfig, train
from ganbench.tricks import TRICKS
from tests.conftest import ganbench, write_spec


def members(steps=100, **common):
    """Four members of different widths, noise dims (2 and 3 share a bucket, padded),
    learning rates and D:G ratios."""
    base = dict(steps=steps, eval_every=50, eval_samples=500, batch_size=64,
                dtype="float64") | common
    return [TrainConfig(hidden=h, noise_dim=nz, lr_g=lr, lr_d=2 * lr, d_steps=k, seed=s,
                        **base)
            for h, nz, lr, k, s in [(32, 2, 1e-3, 1, 0), (64, 4, 2e-3, 3, 1),
                                    (32, 3, 5e-4, 2, 2), (64, 4, 1e-3, 1, 3)]]


def assert_same(alone, together, tol=1e-10):
    assert together.status == alone.status and together.steps == alone.steps
    assert len(together.history) == len(alone.history) > 0
    for a, b in zip(alone.history, together.history):
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], abs=tol, rel=0), key
    assert together.metrics.keys() == alone.metrics.keys()
    assert torch.allclose(together.samples, alone.samples, atol=tol, rtol=0)


def test_population_equals_separate_runs_in_float64():
    configs = members()
    together = train_population(configs, streams="member")
    for config, result in zip(configs, together):
        alone = train(config)
        assert alone.history[-1]["step"] == 100 and "w1" in alone.metrics
        assert_same(alone, result)


def test_lanes_train_shards_side_by_side_and_change_nothing():
    """Eight members of one shape are cut into two shards that train on two lane threads
    of one intra-op thread each; every member still equals its own `train` run, callbacks
    run on the caller's thread, and the caller's thread count is unchanged."""
    configs = [c for c in members(steps=40, eval_every=20) if c.hidden == 32] * 4
    configs = [dataclasses.replace(c, seed=i) for i, c in enumerate(configs)]
    built = [population._member(i, c) for i, c in enumerate(configs)]
    assert [len(s) for s in population.shard_groups([built], lanes=2)] == [4, 4]
    assert [len(s) for s in population.shard_groups([built], lanes=1)] == [8]
    threads, callers = torch.get_num_threads(), set()

    def on_eval(member, step, row):
        callers.add(threading.current_thread().name)

    together = train_population(configs, on_eval=on_eval, streams="member", lanes=2)
    assert callers == {threading.current_thread().name}
    assert torch.get_num_threads() == threads
    for config, result in zip(configs, together):
        assert_same(train(config), result)


def test_lane_threads_run_one_intra_op_thread_each():
    threads = torch.get_num_threads()
    pool = population._lane_pool(2)
    try:
        seen = list(pool.map(lambda _: (threading.current_thread().name,
                                        torch.get_num_threads()), range(8)))
    finally:
        pool.shutdown()
    assert {n for n, _ in seen} <= {"ganbench-lane_0", "ganbench-lane_1"}
    assert {k for _, k in seen} == {1}
    assert torch.get_num_threads() == threads


def test_a_big_bucket_is_cut_so_that_lanes_balance():
    """A wide bucket beside narrow ones is cut into shards; a lone or small bucket is not."""
    wide = [TrainConfig(hidden=256, seed=i) for i in range(12)]
    narrow = [TrainConfig(hidden=32, seed=i) for i in range(12)]
    groups = [[population._member(i, c) for i, c in enumerate(g)] for g in (wide, narrow)]
    sizes = [len(s) for s in population.shard_groups(groups, lanes=2)]
    assert sizes[-1] == 12 and len(sizes) >= 3 and sum(sizes) == 24
    assert all(n >= population.MIN_SHARD for n in sizes)
    lone = [[population._member(0, wide[0])]]
    assert [len(s) for s in population.shard_groups(lone, lanes=2)] == [1]


TRICK_PARAMS = {"clip": {"c": 0.05}, "gradclip": {"max_norm": 0.5}, "sn": {"g": 1},
                "ema": {"decay": 0.9}, "r1": {"gamma": 2.0}, "unrolled": {"k": 2},
                "noise": {"std": 0.2, "anneal": 0.5}, "smooth": {"real": 0.8}}


@pytest.mark.parametrize("trick", sorted(TRICKS))
def test_every_trick_is_batched_exactly(trick, caplog):
    """Each trick's batched form (beside its train hooks in tricks.py) trains a member
    exactly as train does, to 1e-10 in float64: members of different widths, D:G ratios and
    learning rates, with two values of the trick's first parameter in one batch."""
    loss = "wasserstein" if trick == "clip" else "nonsaturating"
    configs = members(steps=30, tricks={trick: TRICK_PARAMS.get(trick, {})}, loss=loss,
                      eval_every=15)
    first = next(iter(TRICKS[trick].params), None)
    if first and first not in TRICKS[trick].bucket_params:  # per-member values in a batch
        p = TRICKS[trick].params[first]
        value = (p.low + p.high) / 2 if not p.integer else int(p.low)
        configs[2].tricks = {trick: {**TRICK_PARAMS.get(trick, {}), first: value}}
    assert trick in BATCHED_TRICKS and unbatchable(configs[0]) is None
    with caplog.at_level(logging.WARNING, logger="ganbench.population"):
        together = train_population(configs, streams="member")
    assert not [r for r in caplog.records if "one at a time" in r.getMessage()]
    for config, result in zip(configs, together):
        assert_same(train(config), result)


def test_what_cannot_be_batched_trains_through_train_and_is_said_once(caplog):
    configs = members(steps=20, eval_every=10, optimizer="sgd")[:3]
    with caplog.at_level(logging.WARNING, logger="ganbench.population"):
        together = train_population(configs, streams="member")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "3 member(s) (0, 1, 2) train one at a time" in lines[0]
    assert "optimizer 'sgd' has no batched form" in lines[0]
    for config, result in zip(configs, together):
        assert_same(train(config), result)


# PacGAN's protocol options (Lin et al. 2018), alone and together, with tricks that touch
# the same layers (EMA copies batch-norm statistics, spectral norm meets a BN generator).
PROTOCOL = {
    "batch-norm G": dict(g_norm="batch"),
    "maxout D": dict(pieces=5),
    "N(0, 0.02) init": dict(init_std=0.02),
    "simultaneous": dict(update="simultaneous"),
    "fixed pool": dict(pool=640),
    "cosine schedule": dict(lr_schedule="cosine", warmup=5, lr_floor=0.1),
    "linear schedule": dict(lr_schedule="linear", lr_floor=0.5),
    "PacGAN's all": dict(g_norm="batch", pieces=5, init_std=0.02, update="simultaneous",
                         pool=640, beta1=0.8, tricks={"pack": {"m": 2}}),
    "with ema, gp": dict(g_norm="batch", pieces=3, update="simultaneous",
                         tricks={"ema": {"decay": 0.9}, "gp": {}}),
    "with sn of G": dict(g_norm="batch", update="simultaneous", tricks={"sn": {"g": 1}}),
}


@pytest.mark.parametrize("options", PROTOCOL.values(), ids=PROTOCOL.keys())
def test_protocol_options_are_batched_exactly(options):
    """Every member equals its own `train` run to 1e-10 in float64 (members of different
    widths, noise dims, learning rates and D:G ratios, so simultaneous updates meet
    members whose earlier D steps differ)."""
    configs = members(steps=40, eval_every=20, **options)
    assert all(unbatchable(c) is None for c in configs)
    for config, result in zip(configs, train_population(configs, streams="member")):
        assert_same(train(config), result)


# float32 configurations whose products include the one-wide (D's output) and one-tall
# (spectral norm's power iteration) shapes that torch computes by another kernel for a
# batch of one.
GROUPING = {
    "plain": dict(),
    "hinge + sn": dict(loss="hinge", tricks={"sn": {"g": 1}}),
    "PacGAN's all": PROTOCOL["PacGAN's all"],
    "gp + ema": dict(tricks={"gp": {}, "ema": {"decay": 0.9}}, d_steps=2),
}


@pytest.mark.parametrize("options", GROUPING.values(), ids=GROUPING.keys())
def test_a_members_run_is_bit_identical_alone_and_in_any_group(options):
    """In float32, member seed 7's losses, metrics, samples and final generator are the
    same bits trained alone, in groups of 2, 3 and 5, and in a group of 10 cut into two
    shards on two lanes."""
    def config(seed):
        return TrainConfig(hidden=32, noise_dim=2, lr_g=2e-3, lr_d=1e-3, seed=seed, steps=60,
                           eval_every=20, eval_samples=400, batch_size=64, dtype="float32",
                           **options)

    runs = {}
    for k, lanes in ((1, 1), (2, 1), (3, 1), (5, 1), (10, 2)):
        configs = [config(7)] + [config(100 + i) for i in range(k - 1)]
        runs[k] = train_population(configs, streams="member", lanes=lanes)[0]
    alone = runs[1]
    assert alone.status == "completed" and len(alone.history) == 3
    for k, run in runs.items():
        assert run.history == alone.history, k
        assert run.metrics == alone.metrics, k
        assert torch.equal(run.samples, alone.samples), k
        assert run.generator.keys() == alone.generator.keys()
        assert all(torch.equal(run.generator[key], alone.generator[key])
                   for key in alone.generator), k


def test_fixed_pools_with_shared_streams_are_seeded_per_member():
    configs = [TrainConfig(hidden=32, steps=30, eval_every=15, eval_samples=256,
                           batch_size=64, pool=256, seed=s) for s in (0, 1)]
    first, again = (train_population(configs, streams="shared") for _ in range(2))
    assert [r.metrics for r in first] == [r.metrics for r in again]
    assert first[0].metrics["sliced_w1"] != first[1].metrics["sliced_w1"]


def test_a_stopped_member_leaves_and_the_others_do_not_notice():
    configs = members(steps=100)
    seen = []

    def on_eval(member, step, row):
        seen.append((member, step))
        return member == 1 and step == 50

    results = train_population(configs, on_eval=on_eval, streams="member")
    assert results[1].status == "stopped" and results[1].steps == 50
    assert (1, 100) not in seen and (0, 100) in seen
    assert [r.status for r in results] == ["completed", "stopped", "completed", "completed"]
    assert_same(train(configs[2]), results[2])


def test_a_diverging_member_fails_alone():
    configs = members(steps=60)
    configs[2].lr_g = configs[2].lr_d = 1e30
    configs[2].dtype = configs[0].dtype = "float32"
    results = train_population(configs)
    alone = train(configs[2])
    assert alone.status == results[2].status == "diverged"
    assert results[2].reason == alone.reason and "diverged at step" in results[2].reason
    assert math.isinf(results[2].metrics["w1"])
    assert [r.status for r in results if r is not results[2]] == ["completed"] * 3


def test_shared_streams_are_seeded_and_independent_per_member():
    configs = [TrainConfig(hidden=32, noise_dim=2, steps=40, eval_every=20,
                           eval_samples=256, batch_size=64, seed=s) for s in (0, 0)]
    first = train_population(configs, streams="shared")
    again = train_population(configs, streams="shared")
    assert first[0].metrics == again[0].metrics and first[1].metrics == again[1].metrics
    # Same seed, same init, but each member draws its own slice of the bucket's stream.
    assert first[0].metrics["sliced_w1"] != first[1].metrics["sliced_w1"]


def test_bad_streams_value_is_refused():
    from ganbench.errors import GanbenchError

    with pytest.raises(GanbenchError, match="streams must be one of"):
        train_population(members(steps=2)[:1], streams="fast")


@pytest.mark.slow
def test_population_sweep_logs_each_member_as_sequential_mode_does(tmp_path, mlflow_server):
    """A sweep with --population: seed repeats are members, each trial has its MLflow run."""
    spec_path = write_spec(tmp_path, name="pop", trials=5, seeds=2,
                           tracking={"uri": mlflow_server.url},
                           pruner={"name": "median", "n_startup_trials": 1,
                                   "n_warmup_steps": 0})
    proc = ganbench("sweep", str(spec_path), "--population", "4", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "populations of 4 member(s)" in proc.stdout
    journal = JournalFileBackend(str(tmp_path / "runs/pop/optuna.log"))
    study = optuna.load_study(study_name="pop", storage=optuna.storages.JournalStorage(journal))
    trials = study.get_trials()
    assert len(trials) == 5 and all(t.user_attrs["execution"] == "population" for t in trials)
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert complete
    for t in complete:  # the mean of two seeds, each as `train` would give it
        seeds = t.user_attrs["seed_metrics"]
        assert len(seeds) == 2
        assert t.values[0] == pytest.approx((seeds[0]["w1"] + seeds[1]["w1"]) / 2)
    client = MlflowClient(mlflow_server.url)
    exp = client.get_experiment_by_name("pop")
    runs = client.search_runs([exp.experiment_id])
    children = {r.info.run_id: r for r in runs if r.data.tags.get("ganbench.role") == "trial"}
    assert len(children) == 5
    for t in trials:
        run = children[t.user_attrs["mlflow_run_id"]]
        assert run.data.tags["state"] == t.state.name
        assert run.info.status == {"COMPLETE": "FINISHED", "PRUNED": "KILLED"}[t.state.name]
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id,
                                                                   "sliced_w1"))
        # Seed 1's curve follows seed 0's, as in sequential mode (unless pruned).
        assert steps == [20, 40, 60, 80] if t.state.name == "COMPLETE" else steps[0] == 20


def test_members_with_different_evaluation_samples_train_together():
    """eval_samples is part of the bucket key: members evaluated on 300 and 500 samples
    used to crash the stacking of their evaluation noise."""
    configs = members(steps=20, eval_every=10)[:2]
    configs[1].eval_samples = 300
    for config, result in zip(configs, train_population(configs, streams="member")):
        assert_same(train(config), result)


def test_a_members_own_error_fails_that_member_alone():
    configs = members(steps=40, eval_every=20)

    def on_eval(member, step, row):
        if member == 1 and step == 20:
            raise ConnectionError("tracking server went away")

    results = train_population(configs, on_eval=on_eval, streams="member")
    assert results[1].status == "error" and isinstance(results[1].error, ConnectionError)
    assert "tracking server went away" in results[1].reason
    assert [r.status for i, r in enumerate(results) if i != 1] == ["completed"] * 3
    assert_same(train(configs[2]), results[2])


def test_a_shard_that_fails_after_its_step_fails_only_its_own_members(monkeypatch):
    """Saving a finished member's generator raises in the 64-wide bucket only (a fault
    injected there): its members end with status "error", the 32-wide ones complete."""
    keep = population._Bucket.generator_state

    def failing(self, pos, net):
        if self.c.hidden == 64:
            raise RuntimeError("disk full")
        return keep(self, pos, net)

    monkeypatch.setattr(population._Bucket, "generator_state", failing)
    configs = members(steps=20, eval_every=10)
    results = train_population(configs, streams="member", lanes=2)
    assert [r.status for r in results] == ["completed", "error", "completed", "error"]
    assert all("disk full" in results[i].reason for i in (1, 3))
    assert_same(train(configs[2]), results[2])


@pytest.mark.parametrize("options", [{}, {"g_norm": "batch", "update": "simultaneous"},
                                     {"tricks": {"ema": {"decay": 0.9}, "sn": {"g": 1}}}],
                         ids=["plain", "batch norm", "ema and sn"])
def test_a_members_final_generator_is_the_one_train_returns(options):
    configs = members(steps=30, eval_every=15, **options)
    for config, result in zip(configs, train_population(configs, streams="member")):
        alone = train(config)
        assert result.generator.keys() == alone.generator.keys()
        for key, value in alone.generator.items():
            assert torch.allclose(result.generator[key].double(), value.double(),
                                  atol=1e-10, rtol=0), key
        assert (result.online is None) == (alone.online is None) == ("tricks" not in options)


COMPILED = {
    "plain": {},
    "PacGAN's all, EMA, SN of G": dict(PROTOCOL["PacGAN's all"], tricks={
        "pack": {"m": 2}, "ema": {"decay": 0.9}, "sn": {"g": 1}}),
}


@pytest.mark.parametrize("options", COMPILED.values(), ids=COMPILED.keys())
def test_compiled_buckets_train_what_train_trains(options, caplog):
    """With compile=True the training forwards run as compiled graphs (their backwards
    compiled too), on two lanes, and every member still equals its own `train` run to
    1e-10 in float64 (relative to its samples' scale where they grew beyond 1): members of
    different widths, noise dims and D:G ratios, so members leave D steps (the batch
    shrinks) and graphs are reused across shapes."""
    from torch._dynamo.utils import counters

    configs = members(steps=40, eval_every=20, **options)
    graphs = counters["stats"]["unique_graphs"]
    with caplog.at_level(logging.WARNING, logger="ganbench.population"):
        together = train_population(configs, streams="member", compile=True, lanes=2)
    assert counters["stats"]["unique_graphs"] > graphs  # it did compile
    assert "eagerly" not in caplog.text
    for config, result in zip(configs, together):
        alone = train(config)  # fused kernels round differently: 1e-10 of the samples' scale
        assert_same(alone, result, tol=1e-10 * max(1.0, alone.samples.abs().max().item()))


def test_penalties_on_input_gradients_train_eagerly_and_say_so(caplog):
    """A compiled graph's backward cannot be differentiated again: buckets with gp train
    eagerly, say so once, and still equal `train`."""
    configs = members(steps=20, eval_every=10, tricks={"gp": {}})
    with caplog.at_level(logging.WARNING, logger="ganbench.population"):
        together = train_population(configs, streams="member", compile=True)
    said = [r.getMessage() for r in caplog.records if "eagerly" in r.getMessage()]
    assert said == ["buckets with gp train eagerly: a compiled graph's backward cannot be "
                    "differentiated again"]
    for config, result in zip(configs, together):
        assert_same(train(config), result)


def test_without_a_working_compiler_populations_train_eagerly(monkeypatch, caplog):
    """No C++ compiler (a real compile attempt with a missing one): one line says so and
    the population trains eagerly, exactly as `train`."""
    import torch._inductor.config as inductor

    monkeypatch.setattr(population, "_compile_broken", None)
    monkeypatch.setattr(inductor.cpp, "cxx", ("/nonexistent/c++",))
    monkeypatch.setattr(inductor, "fx_graph_cache", False)  # a cached graph needs no compiler
    torch._dynamo.reset()  # nor does a graph compiled earlier in this process
    configs = [dataclasses.replace(c, hidden=c.hidden + 16)
               for c in members(steps=20, eval_every=10)]
    with caplog.at_level(logging.WARNING, logger="ganbench.population"):
        together = train_population(configs, streams="member", compile=True)
    said = [r.getMessage() for r in caplog.records if "eagerly" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("torch.compile failed here (") \
        and "/nonexistent/c++" in said[0] and said[0].endswith("populations train eagerly")
    for config, result in zip(configs, together):
        assert_same(train(config), result)


@pytest.mark.slow  # spawns processes
def test_compile_flag_compiles_a_sweeps_populations(tmp_path):
    """`--compile` turns on execution.compile: the sweep says so and completes every trial;
    without a population it says that it does not apply."""
    spec_path = write_spec(tmp_path, name="cmp")
    proc = ganbench("sweep", str(spec_path), "--population", "4", "--compile", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "populations of 4 member(s), compiled" in proc.stdout
    assert "eagerly" not in proc.stdout + proc.stderr
    journal = JournalFileBackend(str(tmp_path / "runs/cmp/optuna.log"))
    study = optuna.load_study(study_name="cmp", storage=optuna.storages.JournalStorage(journal))
    assert [t.state.name for t in study.get_trials()] == ["COMPLETE"] * 4
    proc = ganbench("sweep", str(write_spec(tmp_path, name="plain", trials=1)), "--compile",
                    cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "one trial at a time (execution.compile applies to populations: these train " \
           "eagerly)" in " ".join(proc.stdout.split())


@pytest.mark.parametrize("target, params", [("ring", {}), ("mog", {"dim": 64, "modes": 10})],
                         ids=["2-d", "64-d"])
def test_step_flops_counts_the_data_dimension(target, params):
    """The cost that balances lanes is the FLOPs of one training iteration: checked against
    torch's own count of the matrix products of real training steps (the difference between
    2 steps and 1), within 15% (the estimate leaves out biases and elementwise work)."""
    from torch.utils.flop_counter import FlopCounterMode

    from ganbench.population import built_config, step_flops
    from ganbench.train import train

    counted = []
    for steps in (1, 2):
        config = TrainConfig(target=target, target_params=params, steps=steps, eval_every=1000,
                             eval_samples=100, batch_size=64, hidden=32, depth=2, device="cpu")
        with FlopCounterMode(display=False) as counter:
            train(config)
        counted.append(counter.get_total_flops())
    estimate = step_flops(built_config(config))
    assert estimate == pytest.approx(counted[1] - counted[0], rel=0.15)


def test_a_lane_choice_keeps_the_layout_measured_faster():
    slow_lanes = population.LaneChoice(2)
    order = []
    for seconds_2, seconds_1 in [(0.03, 0.02)] * population.PROBE_ROUNDS:
        for _ in range(2):
            layout = slow_lanes.next_layout()
            order.append(layout)
            slow_lanes.record(layout, seconds_2 if layout == 2 else seconds_1)
    assert order[:4] == [2, 1, 2, 1]  # alternating, so drift hits both alike
    assert slow_lanes.kept == 1 and slow_lanes.next_layout() == 1
    fast_lanes = population.LaneChoice(2)
    while fast_lanes.kept is None:
        layout = fast_lanes.next_layout()
        fast_lanes.record(layout, 0.01 if layout == 2 else 0.02)
    assert fast_lanes.kept == 2


def test_lanes_chosen_by_measurement_change_no_number():
    """With two intra-op threads the engine times both layouts on this host and keeps one;
    every member is the same bits as with either layout fixed (and as its `train` run)."""
    configs = [dataclasses.replace(c, seed=i) for i, c in
               enumerate([c for c in members(steps=40, eval_every=20) if c.hidden == 32] * 4)]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        chosen = train_population(configs, streams="member")
        choice = population.last_choice
        fixed = {n: train_population(configs, streams="member", lanes=n) for n in (1, 2)}
    finally:
        torch.set_num_threads(threads)
    assert choice is not None and choice.kept in (1, 2)
    assert len(choice.side_by_side) == len(choice.one_lane) == population.PROBE_ROUNDS
    for runs in fixed.values():
        for a, b in zip(chosen, runs):
            assert_same(a, b)
    for config, result in zip(configs, chosen):
        assert_same(train(config), result)
