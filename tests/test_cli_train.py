import json

import pytest

from tests.conftest import ganbench


@pytest.mark.slow  # spawns processes
def test_train_writes_metrics_and_scatter(tmp_path):
    out = tmp_path / "demo"
    proc = ganbench("train", "--target", "grid", "--steps", "40", "--eval-every", "20",
                    "--hidden", "32,16", "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    data = json.loads((out / "metrics.json").read_text())
    assert {"w1", "sliced_w1", "modes", "hq", "kl", "status", "steps"} <= set(data)
    assert data["status"] == "completed" and data["steps"] == 40
    assert (out / "samples.png").read_bytes()[:4] == b"\x89PNG"
    assert "final metrics" in proc.stdout and "modes" in proc.stdout


@pytest.mark.slow  # spawns processes
@pytest.mark.parametrize("args,needle", [
    (["--target", "moon"], "unknown target 'moon'; choose one of: grid, mog, ring"),
    (["--loss", "bce"], "unknown loss 'bce'; choose one of: hinge, lsgan, minimax"),
    (["--activation", "swish"], "unknown activation 'swish'"),
    (["--steps", "0"], "steps must be an integer in 1..1000000000"),
    (["--lr-g", "-1"], "lr_g must be a positive number"),
    (["--hidden", "wide"], "--hidden: expected an int"),
    (["-p", "modes=-3"], "modes must be an integer in "),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, args, needle):
    proc = ganbench("train", *args, "--out", str(tmp_path / "x"), cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and needle in proc.stderr
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.slow  # spawns processes
def test_debug_shows_the_traceback(tmp_path):
    proc = ganbench("--debug", "train", "--target", "moon", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" in proc.stderr


@pytest.mark.slow  # spawns processes
def test_help_lists_commands(tmp_path):
    proc = ganbench("--help", cwd=tmp_path)
    assert proc.returncode == 0 and "train" in proc.stdout


def test_help_renders_cleanly_with_an_example_per_command():
    """Every command's help: whole sentences, flags shown as flags, placeholders named for
    what they take, and an example to copy."""
    from typer.testing import CliRunner

    from ganbench.cli import app

    runner = CliRunner()
    top = runner.invoke(app, ["--help"]).output
    commands = ["train", "sweep", "worker", "sample", "status", "repair", "report",
                "verify", "compare", "schema"]
    for line in top.split("Commands:")[1].strip().splitlines():
        if line.startswith("  ") and line.split()[0] in commands:
            assert not line.rstrip().endswith(("...", "(e.g.")), line  # not cut
    for command in commands:
        text = runner.invoke(app, [command, "--help"]).output
        assert f"Example: ganbench {command}" in text, command
        for raw in ("<bool>", "<list[str]>", "{spec_path}", "spec_path"):
            assert raw not in text, (command, raw)


def test_train_takes_every_trainer_field_and_retrains_a_studys_trial(tmp_path, monkeypatch):
    """`train --set` reaches every trainer field (tricks included); `--from SPEC --trial N`
    retrains that trial's configuration, reproducing its metrics exactly."""
    import json
    import math

    from typer.testing import CliRunner

    from ganbench import worker
    from ganbench.cli import app
    from ganbench.spec import load_spec
    from ganbench.study import open_study
    from tests.conftest import write_spec

    monkeypatch.chdir(tmp_path)
    spec_path = write_spec(tmp_path, trials=1)
    spec = load_spec(spec_path)
    worker.worker_loop(spec, "cpu", 1)
    stored = open_study(spec, create=False).get_trials()[0]
    runner = CliRunner()
    again = runner.invoke(app, ["train", "--from", str(spec_path), "--trial", "0",
                                "--out", "again"])
    assert again.exit_code == 0, again.output
    metrics = json.loads((tmp_path / "again" / "metrics.json").read_text())
    # JSON writes an infinite KL (no high-quality sample) as null
    assert {k: math.inf if metrics[k] is None else metrics[k]
            for k in stored.user_attrs["metrics"]} == stored.user_attrs["metrics"]
    tricked = runner.invoke(app, ["train", "--steps", "40", "--eval-every", "20",
                                  "--set", "tricks.r1.gamma=0.5", "--set", "lr_schedule=cosine",
                                  "--out", "tricked"])
    assert tricked.exit_code == 0, tricked.output
    plain = runner.invoke(app, ["train", "--steps", "40", "--eval-every", "20",
                                "--out", "plain"])
    assert plain.exit_code == 0, plain.output
    assert json.loads((tmp_path / "tricked" / "metrics.json").read_text())["w1"] != \
        json.loads((tmp_path / "plain" / "metrics.json").read_text())["w1"]
    bad = runner.invoke(app, ["train", "--set", "lr_gg=1"])
    assert bad.exit_code != 0 and "did you mean `lr_g`" in str(bad.exception or bad.output)
