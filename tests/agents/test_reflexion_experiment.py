"""experiments/reflexion_ranslicing.py: the smoke preset's Actor is the behavioural prior of
table3's smoke Reflexion row (same model, same prompt), one Actor per run (checkpoint, prior or
tiny random model; the others refused), the outputs say when it is the prior. RUN_DIR: the
same config runs again, another one is refused with the keys named (``--resume`` runs with the
run's own values), options that do not change results may differ; an action range other than
the env's is refused. The trials and the evaluation are replaced by a stand-in or run with a
fake sampler (they are tested in test_reflexion.py); the prior is not built (only its cache
directory is computed: test_prior.py builds one)."""

from __future__ import annotations

import dataclasses
import json

import pytest
from experiment_scripts import experiment

from sfjax.agents import prior as prior_lib
from sfjax.baselines.report import MethodResult


class Stop(Exception):
    """Ends a run once the Actor it would load is known."""


@pytest.fixture
def prior_calls(monkeypatch):
    """``ensure_prior`` answers the cache directory without building: returns its calls."""
    calls = []

    def where(cfg, env_cfg, prompt_cfg):
        calls.append((cfg, env_cfg, prompt_cfg))
        return prior_lib.prior_dir(cfg, env_cfg, prompt_cfg)

    monkeypatch.setattr(prior_lib, "ensure_prior", where)
    return calls


@pytest.fixture
def script(monkeypatch):
    """The script's CLI with ``run`` replaced by a recorder: returns (cli, the configs run)."""
    mod = experiment("reflexion_ranslicing")
    import cli_common

    ran = []

    def fake_run(cfg, env, writer=None):
        assert env.config == cfg.env  # the env of the config that runs
        ran.append(cfg)
        metrics = ("utility", "mean_se", "reconfigurations", "violations")
        row = MethodResult("Reflexion", {k: (1.0, 0.0) for k in metrics}, 10, 20, 1)
        return row, {"provenance": "stand-in", "trial_metrics": []}

    monkeypatch.setattr(mod, "run", fake_run)

    def cli(*args):
        cfg = cli_common.parse(mod.PRESETS, ["smoke", *args], mod.__doc__)
        return cli_common.run_cli(mod.main, cfg)

    return cli, ran


def test_same_config_runs_again(tmp_path, script):
    cli, ran = script
    cli("--run-dir", str(tmp_path / "r"))
    cli("--run-dir", str(tmp_path / "r"))
    assert len(ran) == 2 and ran[0] == ran[1]
    assert json.loads((tmp_path / "r" / "config.json").read_text())["reflexion"]["trials"] == 2


def test_other_config_is_refused_naming_the_key(tmp_path, script, capsys):
    cli, ran = script
    cli("--run-dir", str(tmp_path / "r"))
    with pytest.raises(SystemExit) as e:
        cli("--run-dir", str(tmp_path / "r"), "--reflexion.trials", "3")
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(ran) == 1, err
    assert (
        "holds a Reflexion run with another config: reflexion.trials (2 in the run, 3 now)" in err
    )
    assert "Add --resume" in err and "choose a new --run-dir" in err
    assert json.loads((tmp_path / "r" / "config.json").read_text())["reflexion"]["trials"] == 2


def test_resume_runs_with_the_runs_values(tmp_path, script, capsys):
    cli, ran = script
    cli("--run-dir", str(tmp_path / "r"))
    cli("--run-dir", str(tmp_path / "r"), "--reflexion.trials", "3", "--resume")
    assert ran[1].reflexion.trials == 2 and ran[1].resume
    # every value from the run, the env built from them too
    cli("--run-dir", str(tmp_path / "r"), "--env.cell.n-prb", "50", "--resume")
    assert ran[2].env.cell.n_prb == 25
    assert ran[1].reflexion.trial_seeds == (100,)  # tuples stay tuples
    assert "with its own values for: reflexion.trials" in capsys.readouterr().err


def test_operational_options_may_differ(tmp_path, script):
    cli, ran = script
    cli("--run-dir", str(tmp_path / "r"))
    cli("--run-dir", str(tmp_path / "r"), "--log-level", "WARNING",
        "--reflector.api.max-retries", "20", "--reflector.api.timeout-s", "30")  # fmt: skip
    assert len(ran) == 2 and ran[1].reflector.api.max_retries == 20


def test_damaged_config_is_named(tmp_path, script, capsys):
    cli, ran = script
    cli("--run-dir", str(tmp_path / "r"))
    (tmp_path / "r" / "config.json").write_text('{"run_dir": "x", "lo')
    with pytest.raises(SystemExit):
        cli("--run-dir", str(tmp_path / "r"))
    assert "config.json is damaged" in capsys.readouterr().err and len(ran) == 1
    cli("--run-dir", str(tmp_path / "r"), "--resume")
    assert len(ran) == 2 and json.loads((tmp_path / "r" / "config.json").read_text())["reflexion"]


def test_evaluation_seeds_are_not_trial_seeds(tmp_path, script):
    from sfjax.configcheck import ConfigError

    cli, ran = script
    with pytest.raises(ConfigError, match=r"^--protocol\.seeds \(0, 100\): must be disjoint from "
                       r"--reflexion\.trial-seeds: both hold \[100\]"):
        cli("--run-dir", str(tmp_path / "r"), "--protocol.seeds", "0", "100")
    assert not ran and not (tmp_path / "r").exists()


@pytest.mark.parametrize("hi", ["9", "13"])
def test_action_range_is_the_envs(tmp_path, script, capsys, hi):
    """A given range other than the env's is refused, 13 included: the PromptConfig default
    (which means "from the env") is the default env's own top action, 12, so an explicit 13 on
    the default env is no longer taken for "unset" and replaced."""
    cli, ran = script
    with pytest.raises(SystemExit) as e:
        cli("--run-dir", str(tmp_path / "r"), "--actor.prompt.action-hi", hi)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(
        f"error: --actor.prompt.action-hi {hi}: must be left unset; the action range comes from "
        "the env: [1, 12] with --env.cell.n-prb 25"), err  # fmt: skip
    assert not ran and not (tmp_path / "r").exists()
    cli("--run-dir", str(tmp_path / "r"), "--actor.prompt.action-hi", "12")  # the env's: fine
    assert len(ran) == 1


def _loaded_actor(monkeypatch, mod, tmp_path, cfg):
    """The checkpoint ``mod.run(cfg, ...)`` loads its Actor from (the run stops there)."""
    from sfjax.envs.ran import RanSlicingEnv

    loaded = []

    def load_actor(checkpoint, actor_cfg, **kw):
        loaded.append((checkpoint, actor_cfg))
        raise Stop

    monkeypatch.setattr(mod, "load_actor", load_actor)
    with pytest.raises(Stop):
        mod.run(dataclasses.replace(cfg, run_dir=tmp_path / "r"), RanSlicingEnv(cfg.env))
    return loaded[0]


def test_smoke_actor_is_the_prior_of_table3s_smoke_row(tmp_path, monkeypatch, prior_calls):
    """Before, the standalone smoke ran a tiny random Actor with another prompt, table3's smoke
    Reflexion row the behavioural prior: two runs of one name that meant different things."""
    mod = experiment("reflexion_ranslicing")
    table3 = experiment("table3")
    sf = experiment("sf_ranslicing")
    assert mod.SMOKE.prior and not mod.SMOKE.tiny and mod.SMOKE.checkpoint == ""
    assert mod.SMOKE.actor == sf.SMOKE.actor == table3.SMOKE.reflexion.actor  # the prompt too
    checkpoint, actor_cfg = _loaded_actor(monkeypatch, mod, tmp_path, mod.SMOKE)
    # the env-derived prompt of the run is the one the prior is built for
    assert prior_calls == [(mod.SMOKE.prior_config, mod.SMOKE.env, actor_cfg.prompt)]
    t3 = table3.reflexion_checkpoint(dataclasses.replace(table3.SMOKE, run_dir=tmp_path / "t"))
    assert checkpoint == t3 == str(prior_lib.prior_dir(*prior_calls[0]))
    assert checkpoint.startswith(str(prior_lib.prior_dir(sf.SMOKE.prior, sf.SMOKE.env,
                                                         actor_cfg.prompt)))  # fmt: skip
    # and table3's smoke Reflexion row is the standalone smoke run otherwise (what table3 sets
    # itself aside)
    ours = ("run_dir", "checkpoint", "prior", "tiny", "prior_config", "protocol")
    assert {f.name for f in dataclasses.fields(mod.Config)
            if getattr(mod.SMOKE, f.name) != getattr(table3.SMOKE.reflexion, f.name)} <= set(ours)
    assert mod.SMOKE.protocol == table3.SMOKE.protocol


def test_tiny_and_checkpoint_actors(tmp_path, monkeypatch, prior_calls):
    mod = experiment("reflexion_ranslicing")
    tiny = dataclasses.replace(mod.SMOKE, prior=False, tiny=True)
    checkpoint, _ = _loaded_actor(monkeypatch, mod, tmp_path, tiny)
    assert checkpoint == str(tmp_path / "r" / "tiny_actor")
    assert (tmp_path / "r" / "tiny_actor" / "config.json").exists()
    given = dataclasses.replace(mod.SMOKE, prior=False, checkpoint="/models/Qwen3-4B")
    assert _loaded_actor(monkeypatch, mod, tmp_path, given)[0] == "/models/Qwen3-4B"
    assert not prior_calls


@pytest.mark.parametrize(
    "args,line",
    [
        (["--checkpoint", "/x"], "--checkpoint '/x': must be '' with --prior (one Actor): add "
         "--no-prior to load this checkpoint, or --checkpoint '' for the prior"),
        (["--tiny"], "--tiny True: must be left unset with --prior (one Actor)"),
        (["--no-prior", "--tiny", "--checkpoint", "/x"], "--checkpoint '/x': must be '' with "
         "--tiny (one Actor): add --no-tiny to load this checkpoint"),
        (["--no-prior"], "--checkpoint '': must be a checkpoint path or hub id (or --prior or "
         "--tiny; in table3.py: unset, for SF's base Actor --sf.model.*)"),
    ],
)  # fmt: skip
def test_one_actor(tmp_path, script, args, line):
    from sfjax.configcheck import ConfigError

    cli, ran = script
    with pytest.raises(ConfigError) as e:
        cli("--run-dir", str(tmp_path / "r"), *args)
    assert str(e.value).startswith(line) and str(e.value).count("must be") == 1, e.value
    assert not ran and not (tmp_path / "r").exists()
    # the paper preset: the prior instead of its checkpoint
    for ok in (["--no-prior", "--checkpoint", "/x"], ["--no-prior", "--tiny"]):
        cli("--run-dir", str(tmp_path / "_".join(ok)), *ok)
    assert len(ran) == 2 and ran[0].checkpoint == "/x" and ran[1].tiny


def test_smoke_summary_says_the_actor_is_the_prior(tmp_path, script, capsys):
    mod = experiment("reflexion_ranslicing")
    cli, ran = script
    cli("--run-dir", str(tmp_path / "r"))
    out = capsys.readouterr().out
    assert prior_lib.PRIOR_LABEL in out and mod.REFLEXION_WITH_PRIOR in out
    cli("--run-dir", str(tmp_path / "t"), "--no-prior", "--tiny")
    out = capsys.readouterr().out
    assert "tiny randomly initialised" in out and mod.REFLEXION_WITH_PRIOR not in out


@pytest.mark.parametrize("prior", [True, False])
def test_run_names_the_prior_in_its_row_and_summary(tmp_path, monkeypatch, prior_calls,
                                                     tiny_checkpoint, prior):  # fmt: skip
    """The real run (trials, evaluation) with a stand-in sampler on a small env."""
    from test_reflexion import FakeSampler

    from sfjax.agents.reflexion import ReflexionConfig
    from sfjax.baselines.evaluation import EvalProtocol
    from sfjax.envs.ran import RanSlicingConfig, RanSlicingEnv
    from sfjax.tokenizer import load_tokenizer

    mod = experiment("reflexion_ranslicing")
    tokenizer = load_tokenizer(tiny_checkpoint)
    loaded = []

    def load_actor(checkpoint, actor_cfg, *, dtype, actor_cls):
        loaded.append(checkpoint)
        return actor_cls(FakeSampler(6), tokenizer, actor_cfg)

    monkeypatch.setattr(mod, "load_actor", load_actor)
    env_cfg = RanSlicingConfig(ttis_per_step=10, episode_steps=4, onoff_start="stationary")
    cfg = dataclasses.replace(
        mod.SMOKE if prior else dataclasses.replace(mod.SMOKE, prior=False, checkpoint="/m"),
        run_dir=tmp_path / "r", env=env_cfg,
        reflexion=ReflexionConfig(trials=1, trial_seeds=(100,), trial_steps=2, memory_size=1),
        protocol=EvalProtocol(seeds=(0,), num_steps=2),
    )  # fmt: skip
    row, summary = mod.run(cfg, RanSlicingEnv(env_cfg))
    assert (prior_calls[0][1] == env_cfg) if prior else not prior_calls
    assert loaded == [str(prior_lib.prior_dir(*prior_calls[0])) if prior else "/m"]
    said = f"actor {loaded[0]} (the behavioural prior), evaluator/self-reflection rule"
    assert (said in row.note and said in summary["provenance"]) == prior, row.note
    assert summary.get("actor_prior") == (prior_lib.PRIOR_LABEL if prior else None)
    saved = json.loads((tmp_path / "r" / "reflexion" / "summary.json").read_text())
    assert saved["provenance"] == summary["provenance"]


def test_final_evaluation_is_loaded_for_the_same_memory(tmp_path, monkeypatch, tiny_checkpoint,
                                                        caplog):  # fmt: skip
    """A rerun loads the final evaluation saved for the run's memory (the Actor does not run
    again) and reports the same row; a saved one of another memory, or a damaged one, is
    measured again."""
    from test_reflexion import FakeSampler

    from sfjax.agents.reflexion import ReflexionConfig
    from sfjax.baselines.evaluation import EvalProtocol
    from sfjax.envs.ran import RanSlicingConfig, RanSlicingEnv
    from sfjax.tokenizer import load_tokenizer

    mod = experiment("reflexion_ranslicing")
    tokenizer = load_tokenizer(tiny_checkpoint)
    monkeypatch.setattr(mod, "load_actor", lambda checkpoint, actor_cfg, *, dtype, actor_cls:
                        actor_cls(FakeSampler(6), tokenizer, actor_cfg))
    evaluated = []
    real_evaluate = mod.evaluate_agent

    def evaluate_agent(*args):
        evaluated.append(1)
        return real_evaluate(*args)

    monkeypatch.setattr(mod, "evaluate_agent", evaluate_agent)
    env_cfg = RanSlicingConfig(ttis_per_step=10, episode_steps=4, onoff_start="stationary")
    cfg = dataclasses.replace(
        mod.SMOKE, prior=False, checkpoint="/m", run_dir=tmp_path / "r", env=env_cfg,
        reflexion=ReflexionConfig(trials=1, trial_seeds=(100,), trial_steps=2, memory_size=1),
        protocol=EvalProtocol(seeds=(0, 1), num_steps=3),
    )  # fmt: skip
    out = tmp_path / "r" / "reflexion"
    row, summary = mod.run(cfg, RanSlicingEnv(env_cfg))
    first = (out / "eval_rollouts.npz").read_bytes()
    assert len(evaluated) == 1 and json.loads((out / "eval_state.json").read_text())["memory"] \
        == summary["memory"]

    again, _ = mod.run(cfg, RanSlicingEnv(env_cfg))
    assert len(evaluated) == 1 and again == row  # loaded, the same row
    assert (out / "eval_rollouts.npz").read_bytes() == first

    state = json.loads((out / "eval_state.json").read_text())
    (out / "eval_state.json").write_text(json.dumps({**state, "memory": ["another"]}))
    caplog.clear()
    remeasured, _ = mod.run(cfg, RanSlicingEnv(env_cfg))
    assert len(evaluated) == 2 and remeasured == row  # the same Actor and seeds: the same row
    assert "made with another memory" in caplog.text
    assert json.loads((out / "eval_state.json").read_text()) == state

    (out / "eval_rollouts.npz").write_bytes(first[: len(first) // 2])  # cut short
    caplog.clear()
    remeasured, _ = mod.run(cfg, RanSlicingEnv(env_cfg))
    assert len(evaluated) == 3 and remeasured == row
    assert "cannot be read" in caplog.text
    assert (out / "eval_rollouts.npz").read_bytes() == first
