"""The command line: a readable --help, refused nonsense, --no-progress, TensorBoard."""

import json
import re

import pytest
import train
from config import CONFIGS


def test_help_lists_each_configuration_once_on_its_own(capsys):
    with pytest.raises(SystemExit) as exit_:
        train.parse_args(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    options, _, listing = text.partition("\nconfigurations (--config NAME")
    options = options.partition("\noptions:")[2]
    for name in CONFIGS:  # listed once, one a line, never inside the options' help
        assert len(re.findall(rf"^  [* ] {re.escape(name)}  ", listing, re.M)) == 1, name
        assert name == "brc" or name not in options, name  # 'brc' is also a --network
    assert "TARGET_UPDATE_EVERY" not in text  # metavars say the type: INT, FLOAT, {choices}
    assert "--target-update {episodes,updates,soft}" in text


@pytest.mark.parametrize(
    "args, message",
    [
        (["--workers", "0"], "--workers 0: at least 1 process"),
        (["--config", "shared-awre"], "unknown configuration(s) shared-awre; known: shared-blind"),
        (["--method", "pc-grad"], "invalid choice: 'pc-grad'"),
    ],
)
def test_nonsense_is_refused_by_the_parser(capsys, args, message):
    with pytest.raises(SystemExit) as exit_:
        train.parse_args(args)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


QUICK = ["--episodes-per-task", "2", "--min-replay-size", "100", "--max-episode-steps", "100"]
QUICK += ["--eval-every", "2", "--eval-episodes", "1", "--final-eval-episodes", "1"]


def test_no_progress_hides_every_bar(tmp_path, capfd):
    args = ["--config", "shared-blind", "shared-aware", "--seed", "0", "--workers", "1"]
    args += ["--runs-dir", str(tmp_path), "--no-tensorboard", "--no-progress", "--no-report"]
    summaries = train.main([*args, *QUICK])
    assert len(summaries) == 2
    err = capfd.readouterr().err
    assert "it/s" not in err and "%|" not in err, err
    assert "finished: 2 runs" in err


def test_without_tensorboard_the_console_says_so_once_and_config_json_is_true(
    tmp_path, capfd, monkeypatch
):
    monkeypatch.setattr(train, "SummaryWriter", None)
    args = ["--config", "shared-blind", "--seed", "0", "--runs-dir", str(tmp_path)]
    train.main([*args, "--no-progress", *QUICK])
    err = capfd.readouterr().err
    assert err.count("TensorBoard is not installed") == 1
    saved = json.loads((tmp_path / "shared-blind" / "seed-0" / "config.json").read_text())
    assert saved["tensorboard"] is False
    assert not (tmp_path / "shared-blind" / "seed-0" / "tensorboard").exists()
