"""Every experiment CLI: presets validate clean, values a script sets itself are refused
instead of silently replaced (issue 19 "CLI"), one line per mistake, no traceback."""

from __future__ import annotations

import pytest
from experiment_scripts import experiment

from sfjax.config_rules import RULES
from sfjax.configcheck import problems


@pytest.mark.parametrize(
    "name", ["sf_ranslicing", "table3", "reflexion_ranslicing", "rl_baselines", "rl_search"]
)
def test_presets_are_valid(name):
    mod = experiment(name)
    for _, preset in mod.PRESETS.values():
        assert problems(preset, rules=RULES) == []


def _table3(capsys, *args):
    mod = experiment("table3")
    import cli_common

    with pytest.raises(SystemExit) as e:
        cli_common.run_cli(cli_common.parse, mod.PRESETS, ["smoke", *args], mod.__doc__)
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    "args,line",
    [
        (["--sf.run-dir", "elsewhere"], "--sf.run-dir 'elsewhere': must be left unset"),
        (["--sf.env.cell.n-prb", "50"], "--sf.env.cell.n-prb 50: must be left unset"),
        (["--reflexion.eval-seed", "3"], "--reflexion.eval-seed 3: must be left unset"),
        (["--sf.loop.keep-checkpoints", "1"], "--sf.loop.keep-checkpoints 1: must be >= 2"),
        (["--sf.resume"], "--sf.resume True: must be left unset: table3's --resume applies"),
        (["--reflexion.resume"], "--reflexion.resume True: must be left unset: table3's --resume"),
        (["--rl.algos", "dqn"], "--rl.algos ('dqn',): must be left unset: --methods chooses"),
        # the SF row's Actor is the behavioural prior: Reflexion runs on it too
        (
            ["--reflexion.checkpoint", "/other"],
            "--reflexion.checkpoint '/other': must be left unset (or --sf.model.checkpoint's "
            "value) with the SF row: both LLM rows use SF's base Actor",
        ),
        # Reflexion's own Actor switches: table3's Reflexion row runs on SF's Actor (the prior
        # in smoke), with or without the SF row
        *(
            (args, f"{given}: must be left unset: the Reflexion row runs on SF's base Actor "
             "(--sf.model.prior, --sf.model.tiny, --sf.prior.*) or, without the SF row, on "
             "--reflexion.checkpoint")
            for args, given in [
                (["--reflexion.prior"], "--reflexion.prior True"),
                (["--reflexion.tiny"], "--reflexion.tiny True"),
                (["--reflexion.prior-config.seed", "3"], "--reflexion.prior-config.seed 3"),
                (["--reflexion.prior-config.cache-dir", "/c"],
                 "--reflexion.prior-config.cache-dir '/c'"),
                (["--methods", "reflexion", "--reflexion.prior"], "--reflexion.prior True"),
            ]
        ),
    ],
)  # fmt: skip
def test_table3_refuses_what_it_would_override(tmp_path, capsys, args, line):
    code, err = _table3(capsys, "--run-dir", str(tmp_path / "t"), *args)
    assert code == 2 and err.startswith(f"error: {line}"), err
    assert err.count("must be") == 1, err  # one line per mistake
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("where", ["missing", "empty", "hub"])
def test_unusable_actor_checkpoint_is_one_line(tmp_path, capsys, monkeypatch, where):
    """A wrong --model.checkpoint (no such path, a directory without config.json, a hub id
    not cached while offline) ended in a ~100-line traceback; now one ``error:`` line, exit 2,
    saying what to pass."""
    mod = experiment("sf_ranslicing")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "empty").mkdir()
    ckpt = {"missing": str(tmp_path / "nowhere"), "empty": str(tmp_path / "empty"),
            "hub": "nobody-here/Qwen3-4B-not-cached"}[where]  # fmt: skip
    argv = ["smoke", "--run-dir", str(tmp_path / "r"), "--model.no-prior",
            "--model.checkpoint", ckpt]  # fmt: skip
    with pytest.raises(SystemExit) as e:
        mod.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and "Traceback" not in err, err
    assert {"missing": "does not exist", "empty": "no config.json",
            "hub": "--model.checkpoint /path/to/Qwen3-4B-not-cached"}[where] in err  # fmt: skip


def test_actor_checkpoint_of_another_architecture_is_one_line(tmp_path, capsys):
    """A local checkpoint whose config.json sfjax cannot run (an empty one: no model_type) or
    cannot read (cut short) is refused with the reason and exit 2, before RUN_DIR is made."""
    mod = experiment("sf_ranslicing")
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "config.json").write_text("{}")
    argv = ["smoke", "--run-dir", str(tmp_path / "r"), "--model.no-prior",
            "--model.checkpoint", str(tmp_path / "ck")]  # fmt: skip
    with pytest.raises(SystemExit) as e:
        mod.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: unsupported model_type None"), err
    assert "Traceback" not in err and not (tmp_path / "r").exists()  # refused before RUN_DIR
    (tmp_path / "ck" / "config.json").write_text('{"model_type": "qwen3",')  # cut short
    with pytest.raises(SystemExit) as e:
        mod.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "the Actor checkpoint's config" in err and "damaged" in err, err
    assert not (tmp_path / "r").exists()


def test_run_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    mod = experiment("sf_ranslicing")
    (tmp_path / "f").write_text("not a directory")
    with pytest.raises(SystemExit) as e:
        mod.main(["smoke", "--run-dir", str(tmp_path / "f" / "run")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(
        f"error: RUN_DIR {tmp_path / 'f' / 'run'}: {tmp_path / 'f'} is a file, not a directory"
    ), err


@pytest.mark.parametrize("args, line", [
    (["--prior.num-layers", "0"], "--prior.num-layers 0: must be >= 1"),
    (["--prior.data-seeds"], "--prior.data-seeds (): must be at least one seed"),
    (["--prior.seed", "-1"], "--prior.seed -1: must be in [0, 2**32)"),
    (["--heldout.seeds", "4294967296"], "--heldout.seeds (4294967296,): must be seeds in [0, 2**32)"),
    (["--heldout.seeds", "3", "3"], "--heldout.seeds (3, 3): must be distinct seeds"),
    (["--loop.env-seed", "-1"], "--loop.env-seed -1: must be in [0, 2**32)"),
    (["--model.tiny-seed", "-1"], "--model.tiny-seed -1: must be in [0, 2**32)"),
])  # fmt: skip
def test_sf_values_checked_by_the_config_walk_are_one_line(tmp_path, capsys, args, line):
    mod = experiment("sf_ranslicing")
    import cli_common

    with pytest.raises(SystemExit) as e:
        cli_common.run_cli(cli_common.parse, mod.PRESETS,
                           ["smoke", "--run-dir", str(tmp_path / "r"), *args], mod.__doc__)  # fmt: skip
    err = capsys.readouterr().err
    assert e.value.code == 2 and err == f"error: {line}\n", err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("args, words", [
    (["--kto.beta", "0"], "Error parsing --kto: beta must be a finite value > 0"),
    (["--lora.alpha", "0"], "Error parsing --lora: LoRA alpha must be a finite value > 0"),
    (["--env.cell.carrier-hz", "0"], "Error parsing --env.cell: carrier_hz must be in"),
    (["--env.geometry-seed", "-3"], "Error parsing --env: geometry_seed must be in [0, 2**32)"),
])  # fmt: skip
def test_sf_values_checked_when_parsed_exit_2(tmp_path, capsys, args, words):
    """Configs that check themselves when made (KTOConfig, LoRAConfig, the env's) are refused by
    the parser: its message under the option group the user typed (not tyro's internal wrapper
    name), exit 2, nothing written."""
    mod = experiment("sf_ranslicing")
    with pytest.raises(SystemExit) as e:
        mod.main(["smoke", "--run-dir", str(tmp_path / "r"), *args])
    err = " ".join(capsys.readouterr().err.replace("│", " ").split())  # the box's line breaks
    assert e.value.code == 2 and words in err and "Traceback" not in err, err
    assert "dummy" not in err, err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("script, args, words", [
    ("rl_baselines", ["--rl.seeds", "0", "0"], "RLRunConfig.seeds (0, 0): must be distinct seeds"),
    ("rl_baselines", ["--rl.seeds", "-2"], "RLRunConfig.seeds (-2,): must be seeds in [0, 2**32)"),
    ("table3", ["--reference.train-seeds", "100", "-100"],
     "error: --reference.train-seeds (100, -100): must be seeds in [0, 2**32)"),
    ("table3", ["--protocol.seeds", "-1"], "EvalProtocol.seeds (-1,): must be seeds in [0, 2**32)"),
    ("table3", ["--eval-seed", "4294967296"], "error: --eval-seed 4294967296: must be in [0, 2**32)"),
    ("reflexion_ranslicing", ["--reflexion.trial-seeds", "100", "100"],
     "error: --reflexion.trial-seeds (100, 100): must be distinct seeds"),
    ("reflexion_ranslicing", ["--eval-seed", "-1"], "error: --eval-seed -1: must be in [0, 2**32)"),
])  # fmt: skip
def test_seeds_out_of_range_or_repeated_are_refused_before_the_run(tmp_path, capsys, script,
                                                                   args, words):  # fmt: skip
    """Seeds are in [0, 2**32) (JAX folds them into uint32 keys: out of range failed deep in a
    run after config.json was written, or aliased another seed) and distinct (RL training seeds
    0 0 trained one network twice and reported the pair as independent): exit 2, one message,
    nothing written."""
    mod = experiment(script)
    import cli_common

    with pytest.raises(SystemExit) as e:
        cli_common.run_cli(mod.main, cli_common.run_cli(
            cli_common.parse, mod.PRESETS, ["smoke", "--run-dir", str(tmp_path / "r"), *args],
            mod.__doc__))  # fmt: skip
    err = " ".join(capsys.readouterr().err.replace("│", " ").split())
    assert e.value.code == 2 and words in err and "Traceback" not in err, err
    assert not (tmp_path / "r").exists()


def test_ctrl_c_says_how_to_continue_and_releases_the_run_dir(tmp_path, capsys):
    """Ctrl-C in a run: exit 130 with one line on how to continue (no traceback), and the run
    dir it locked is free for that rerun."""
    from sfjax import runlock

    cli_common = experiment("cli_common")

    def run():
        cli_common.make_run_dir(tmp_path / "r")
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as e:
        cli_common.run_cli(run)
    err = capsys.readouterr().err
    assert e.value.code == 130 and err == f"\ninterrupted: {cli_common.INTERRUPTED}\n"
    assert runlock.held() == []


def test_a_users_error_met_on_process_0_is_one_line_on_the_others_too(capsys):
    """On a process other than 0, ``on_main_process`` raises MainProcessError for process 0's
    error: one ``error:`` line and status 2 when it was a user's mistake (what process 0
    prints), the error itself otherwise."""
    from sfjax.parallel import MainProcessError

    cli_common = experiment("cli_common")

    def refused():
        raise MainProcessError("RunDirTaken", "runs/x holds a run with another config: loop.seed")

    with pytest.raises(SystemExit) as e:
        cli_common.run_cli(refused)
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: runs/x holds a run with another config: loop.seed\n"

    def bug():
        raise MainProcessError("KeyError", "'missing'")

    with pytest.raises(MainProcessError, match="on process 0: KeyError: 'missing'"):
        cli_common.run_cli(bug)
