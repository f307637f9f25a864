"""The behavioural-prior Actor: teacher data in the Actor's format, build, cache, corruption."""

from __future__ import annotations

import json
import logging
import os

import jax.numpy as jnp
import numpy as np
import pytest

from sfjax.agents import prior as prior_lib
from sfjax.agents.prompts import parse_output
from sfjax.baselines.llm_agent import prompt_config_for_env
from sfjax.envs.ran import RanSlicingEnv
from sfjax.envs.scenario import RanSlicingConfig
from sfjax.train.sft import SFTConfig

ENV = RanSlicingConfig()
PROMPT = prompt_config_for_env(RanSlicingEnv(ENV), prior_lib.SMOKE_PROMPT)


def _tiny_cfg(cache_dir) -> prior_lib.PriorConfig:
    return prior_lib.PriorConfig(
        data_seeds=(2000, 2001), data_steps=6, hidden_size=32, num_heads=2,
        sft=SFTConfig(steps=3, batch_size=4, prompt_buckets=(512,)), cache_dir=str(cache_dir),
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cfg = _tiny_cfg(tmp_path_factory.mktemp("priors"))
    return cfg, prior_lib.ensure_prior(cfg, ENV, PROMPT)


def test_teacher_pairs_are_the_actors_format_and_the_teacher_has_the_flaw(built):
    from sfjax.tokenizer import load_tokenizer

    cfg, path = built
    pairs, rollouts = prior_lib.teacher_examples(cfg, ENV, PROMPT, load_tokenizer(path))
    assert len(pairs) == 2 * 6
    for prompt, completion in pairs:
        assert "Current state" in prompt and prompt.endswith("<|im_start|>assistant\n"
                                                             "<think>\n\n</think>\n\n")
        assert parse_output(completion, PROMPT).ok
    # deterministic: the same config gives the same data
    again, _ = prior_lib.teacher_examples(cfg, ENV, PROMPT, load_tokenizer(path))
    assert again == pairs
    info = json.loads((path / "prior.json").read_text())
    assert info["label"] == prior_lib.PRIOR_LABEL and "stand" in info["label"]
    assert cfg.teacher.hysteresis_rbg == 0


def test_built_prior_loads_like_any_checkpoint_and_is_reused(built, caplog):
    from sfjax.models import qwen3

    cfg, path = built
    assert prior_lib.check_prior(path, path.name) is None
    model = qwen3.from_pretrained(path, dtype=jnp.float32)
    assert model.config.hidden_size == 32
    with caplog.at_level(logging.INFO, logger=prior_lib.__name__):
        assert prior_lib.ensure_prior(cfg, ENV, PROMPT) == path
    assert "using the cached" in caplog.text


@pytest.mark.parametrize("damage", ["flip_byte", "no_marker", "extra_file", "bad_marker"])
def test_corrupt_or_half_written_prior_is_rebuilt_with_a_message(built, damage, monkeypatch,
                                                                 caplog):
    cfg, path = built
    backup = {p.name: p.read_bytes() for p in path.iterdir()}
    try:
        if damage == "flip_byte":
            f = path / "model.safetensors"
            data = bytearray(f.read_bytes())
            data[-5] ^= 0xFF
            f.write_bytes(bytes(data))
        elif damage == "no_marker":  # killed before the marker was written
            (path / prior_lib.MARKER).unlink()
        elif damage == "extra_file":
            (path / "stray.bin").write_bytes(b"x")
        else:
            (path / prior_lib.MARKER).write_text("{not json")
        assert prior_lib.check_prior(path, path.name) is not None
        calls = []
        monkeypatch.setattr(prior_lib, "build_prior", lambda *a, **k: calls.append(a) or a[-1])
        with caplog.at_level(logging.WARNING, logger=prior_lib.__name__):
            assert prior_lib.ensure_prior(cfg, ENV, PROMPT) == path
        assert len(calls) == 1 and "rebuilding" in caplog.text
    finally:
        for p in list(path.iterdir()):
            p.unlink()
        for name, data in backup.items():
            (path / name).write_bytes(data)
    assert prior_lib.check_prior(path, path.name) is None


def test_bad_prior_values_are_named():
    from sfjax.configcheck import problems

    assert problems(prior_lib.PriorConfig()) == []
    found = problems(prior_lib.PriorConfig(num_layers=0, num_heads=3, data_seeds=()))
    assert found == [
        "--num-layers 0: must be >= 1",
        "--data-seeds (): must be at least one seed",
        "--num-heads 3: must be 1 or an even number that divides --prior.hidden-size (half as "
        "many KV heads; head_dim = hidden / heads)",
    ]
    assert problems(prior_lib.PriorConfig(num_heads=0))[0] == "--num-heads 0: must be >= 1"
    # a negative seed used to reach numpy's generator and end in a traceback
    assert problems(prior_lib.PriorConfig(seed=-1, data_seeds=(2000, -3))) == [
        "--seed -1: must be in [0, 2**32)", "--data-seeds (2000, -3): must be seeds in [0, 2**32)"]
    with pytest.raises(SystemExit):
        prior_lib.main(["--seed", "-1"])
    assert problems(prior_lib.PriorConfig(teacher=prior_lib.TeacherConfig(queue_alarm=0))) == [
        "--teacher.queue-alarm 0: must be > 0"]


def test_a_failed_or_killed_build_leaves_nothing_in_the_cache(tmp_path, monkeypatch):
    """A build that raises removes its ``.building-<pid>`` dir; one whose process died (kill -9)
    is removed by the next build; a live process's build is left alone."""
    out = tmp_path / "abc"
    dead = tmp_path / "abc.building-999999999"  # no such process
    live = tmp_path / f"abc.building-{os.getppid()}"
    for d in (dead, live):
        d.mkdir()

    def fail(tmp, *a):
        tmp.mkdir()
        (tmp / "half.safetensors").write_text("x")
        raise RuntimeError("the build failed")

    monkeypatch.setattr(prior_lib, "_build_into", fail)
    with pytest.raises(RuntimeError, match="the build failed"):
        prior_lib.build_prior(_tiny_cfg(tmp_path), ENV, PROMPT, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name]


def test_config_hash_covers_prompt_env_and_prior():
    cfg = prior_lib.PriorConfig()
    h = prior_lib.config_hash(cfg, ENV, PROMPT)
    import dataclasses

    assert h == prior_lib.config_hash(dataclasses.replace(cfg, cache_dir="/elsewhere"), ENV, PROMPT)
    assert h != prior_lib.config_hash(dataclasses.replace(cfg, seed=1), ENV, PROMPT)
    assert h != prior_lib.config_hash(cfg, ENV, dataclasses.replace(PROMPT, history_window=1))
    assert h == prior_lib.config_hash(cfg, dataclasses.replace(ENV, episode_steps=10), PROMPT)
    assert h != prior_lib.config_hash(cfg, dataclasses.replace(ENV, min_rbg_per_slice=2), PROMPT)
    assert np.all([c in "0123456789abcdef" for c in h])


def test_build_is_deterministic_from_its_seed(built, tmp_path):
    cfg, path = built
    again = prior_lib.build_prior(cfg, ENV, PROMPT, tmp_path / "again")
    assert prior_lib.check_prior(again, path.name) is None
    same = json.loads((again / prior_lib.MARKER).read_text())["files"]["model.safetensors"]
    assert same == json.loads((path / prior_lib.MARKER).read_text())["files"]["model.safetensors"]


def test_fingerprint_names_the_weights_and_the_machine_that_built_them(built):
    cfg, path = built
    fp = prior_lib.fingerprint(path)
    marker = json.loads((path / prior_lib.MARKER).read_text())
    assert fp["weights_sha256"] == marker["files"]["model.safetensors"]
    assert fp["dir"] == str(path) and isinstance(fp["sft_loss_last"], float)
    built_on = fp["built_on"]
    assert set(built_on) == {"cpu", "platform", "jax", "jaxlib", "backend"}
    assert built_on["backend"] == "cpu" and all(built_on.values())
    # a prior cached before the build record existed: the digest alone
    info = json.loads((path / "prior.json").read_text())
    del info["built_on"]
    old = path.parent / "old_prior"
    old.mkdir()
    (old / "prior.json").write_text(json.dumps(info))
    (old / prior_lib.MARKER).write_text((path / prior_lib.MARKER).read_text())
    assert "built_on" not in prior_lib.fingerprint(old)
    assert prior_lib.fingerprint(old)["weights_sha256"] == fp["weights_sha256"]
