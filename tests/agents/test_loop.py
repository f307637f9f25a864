"""Algorithm 1 driver with light fakes: phase plan, persistence, summary, kill-and-resume."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sfjax.agents.actor import ActorDecision
from sfjax.agents.loop import SelfFinetuningLoop, format_table, phase_plan
from sfjax.agents.loop_config import LoopConfig
from sfjax.agents.prompts import PromptConfig, format_output, parse_output
from sfjax.agents.reflector import ReflectorConfig, make_reflector
from sfjax.agents.rfr import RfRConfig

PCFG = PromptConfig(action_lo=1, action_hi=8, history_window=2)


class FakeFineTuner:
    """'KTO' that moves per-action preferences w towards desirable actions."""

    def __init__(self):
        self.w = jnp.zeros(8)
        self.opt_count = jnp.zeros((), jnp.int32)

    def train(self, examples, key, step_offset):
        delta = np.zeros(8)
        for e in examples:
            p = parse_output(e.completion, PCFG)
            if p.ok:
                delta[p.action - 1] += 1.0 if e.desirable else -1.0
        noise = 0.01 * jax.random.normal(key, (8,))
        self.w = self.w + 0.5 * jnp.asarray(delta) / max(len(examples), 1) + noise
        self.opt_count = self.opt_count + 1
        return {"loss": float(-delta.sum()), "num_steps": 2}

    def arrays(self):
        return {"w": self.w, "opt_count": self.opt_count}

    def load_arrays(self, a):
        self.w = jnp.asarray(a["w"])
        self.opt_count = jnp.asarray(a["opt_count"])


class FakeActor:
    """Samples actions from softmax(w); its output text follows the real format."""

    def __init__(self, ft):
        self.ft = ft

    def _draw(self, key, n):
        return [int(a) + 1 for a in jax.random.categorical(key, self.ft.w * 3, shape=(n,))]

    def act(self, states, histories, step, key):
        acts = self._draw(key, len(states))
        out = []
        for s, h, a in zip(states, histories, acts):
            prompt = f"t={step} prev={s['prev_action']} hist={len(h)}"
            text = format_output("ok", a, "fine", PCFG)
            out.append(ActorDecision(prompt, text, "ok", a, "fine", True, None))
        return out

    def sample(self, prompts, n, keys):  # one key per prompt (rfr.SampleFn)
        assert len(keys) == len(prompts)
        return [[format_output("r", a, "a", PCFG) for a in self._draw(k, n)] for k in keys]


class FakeEnv:
    """Demand drifts; fewer resources than demand -> violation; SE = load / allocation."""

    action_lo, action_hi = 1, 8

    def reset(self, key, num_envs):
        self.demand = np.asarray(jax.random.uniform(key, (num_envs,), minval=2, maxval=6))
        self.prev = np.full(num_envs, 4)
        return [self._state(e, 0.0) for e in range(num_envs)]

    def _state(self, e, se):
        return {
            "prev_action": int(self.prev[e]),
            "se": se,
            "arrival_rate_bps": float(self.demand[e] * 1e6),
            "queue_delta_bytes": 0.0,
            "dropped_bytes": 0.0,
        }

    def step(self, actions, key):
        noise = np.asarray(jax.random.normal(key, self.demand.shape)) * 0.3
        states, fbs = [], []
        for e, a in enumerate(actions):
            se = min(self.demand[e], a) / a * 6.0
            fbs.append({
                "se": se,
                "violation": float(a < self.demand[e]),
                "reconfiguration": float(a != self.prev[e]),
                "arrival_rate_bps": float(self.demand[e] * 1e6),
                "queue_delta_bytes": 0.0,
                "dropped_bytes": 0.0,
            })  # fmt: skip
            self.prev[e] = a
            states.append(self._state(e, se))
        self.demand = np.clip(self.demand + noise, 1, 7)
        return states, fbs


def _loop(run_dir, on_phase_end=None, reflector=None, kto_iterations=2, rfr=(), **kw):
    ft = FakeFineTuner()
    cfg = LoopConfig(**{"sf_iterations": 2, "num_envs": 3, "trajectory_steps": 12, "seed": 1,
                        **kw})  # fmt: skip
    rfr_cfg = RfRConfig(kto_iterations=kto_iterations, num_rollouts=3, tau=0.5, **dict(rfr))
    return SelfFinetuningLoop(
        cfg, rfr_cfg, PCFG, FakeActor(ft), FakeEnv(),
        reflector or make_reflector(ReflectorConfig(backend="rule"), PCFG), ft, run_dir,
        progress=False, on_phase_end=on_phase_end,
    )  # fmt: skip


def test_phase_plan():
    names = [p.name for p in phase_plan(2, 2)]
    assert names == [
        "iter0/collect", "iter0/reflect", "iter0/kto_0", "iter0/kto_1",
        "iter1/collect", "iter1/reflect", "iter1/kto_0", "iter1/kto_1",
        "iter2/collect",
    ]  # fmt: skip
    assert [p.index for p in phase_plan(2, 2)] == list(range(9))


def _strip(summary):
    s = json.loads(json.dumps(summary))
    s.pop("timings_s")
    for r in s["iterations"]:
        r.pop("wall_s", None)
    return s


def test_loop_runs_persists_and_resumes_exactly(tmp_path):
    full = _loop(tmp_path / "full")
    summary = full.run()
    its = summary["iterations"]
    assert [r["iteration"] for r in its] == [0, 1, 2]
    for r in its[:2]:
        assert r["n_desirable"] + r["n_undesirable"] > 0
        assert len(r["kto_iterations"]) == 2
        assert "rule" in r["reflector"]
    assert its[2]["n_desirable"] is None  # the last collect is evaluation only
    for k in ("avg_se", "reconfigurations", "violations", "utility", "parse_failures"):
        assert all(k in r for r in its)
    # persisted artefacts
    assert len(list((tmp_path / "full" / "trajectories").glob("iter_*.json"))) == 3
    assert len(list((tmp_path / "full" / "reflections").glob("iter_*.json"))) == 2
    assert json.loads((tmp_path / "full" / "summary.json").read_text())["iterations"] == its
    table = format_table(summary)
    assert len(table.splitlines()) == 2 + 3 and table.splitlines()[-1].rstrip().endswith("-")

    # kill after phase 5 (iteration 1's reflect), then resume in a fresh process-like object
    class Killed(Exception):
        pass

    def kill_after(phase):
        if phase.index == 5:
            raise Killed

    first = _loop(tmp_path / "resumed", on_phase_end=kill_after)
    with pytest.raises(Killed):
        first.run()
    with pytest.raises(FileExistsError, match="--resume"):
        _loop(tmp_path / "resumed").run()
    second = _loop(tmp_path / "resumed")
    resumed = second.run(resume=True)
    assert _strip(resumed) == _strip(summary)
    np.testing.assert_array_equal(np.asarray(second.finetuner.w), np.asarray(full.finetuner.w))
    assert int(second.finetuner.opt_count) == int(full.finetuner.opt_count) == 4


def test_improved_examples_reach_every_kto_dataset(tmp_path):
    """RfRConfig.improved_examples: each KTO iteration's recorded dataset holds, after the
    base and rollout examples, a desirable copy per suboptimal step at its improved action."""
    summary = _loop(tmp_path / "on", rfr={"improved_examples": True}).run()
    run = tmp_path / "on"
    for it in (0, 1):
        labels = {(r["env_index"], lab["step"]): lab
                  for r in json.loads((run / f"reflections/iter_{it}.json").read_text())
                  for lab in r["labels"]}  # fmt: skip
        for k in (0, 1):
            ds = json.loads((run / f"datasets/iter_{it}_kto_{k}.json").read_text())
            copies = [e for e in ds if e["source"] == "improved"]
            assert copies and ds[-len(copies):] == copies
            for e in copies:
                lab = labels[(e["env_index"], e["step"])]
                assert e["desirable"] and lab["label"] == "suboptimal"
                assert parse_output(e["completion"], PCFG).action == lab["improved_action"]
            entry = summary["iterations"][it]["kto_iterations"][k]
            assert entry["n_improved"] == len(copies)
            assert entry["n_desirable"] == sum(e["desirable"] for e in ds)


def test_different_seed_differs(tmp_path):
    a = _loop(tmp_path / "a").run()
    b = _loop(tmp_path / "b", env_seed=5).run()
    assert _strip(a) != _strip(b)


def test_api_key_never_in_logs_events_or_checkpoints(tmp_path, monkeypatch, caplog):
    """The whole loop with the api Reflector (fake hostile server), TensorBoard and orbax."""
    import logging

    from fake_openai import FakeOpenAI
    from reflector_inputs import KEY_ENV, SECRET
    from tensorboardX import SummaryWriter
    from test_reflector import HOSTILE_FAULTS, _api_cfg

    monkeypatch.setenv(KEY_ENV, SECRET)
    caplog.set_level(logging.DEBUG)
    run_dir = tmp_path / "run"
    with FakeOpenAI(fault_rate=0.5, faults=HOSTILE_FAULTS, seed=1, hang_s=0.6) as server:
        ft = FakeFineTuner()
        writer = SummaryWriter(str(run_dir / "tb"))
        loop = SelfFinetuningLoop(
            LoopConfig(sf_iterations=1, num_envs=2, trajectory_steps=6, seed=3),
            RfRConfig(kto_iterations=1, num_rollouts=2), PCFG, FakeActor(ft), FakeEnv(),
            make_reflector(_api_cfg(server.url, context_tokens=2500, max_tokens=500), PCFG,
                           run_dir / "cache"),
            ft, run_dir, writer=writer, progress=False,
        )  # fmt: skip
        summary = loop.run()
        writer.close()
        assert server.auth == {f"Bearer {SECRET}"}
    assert "fake-r1" in summary["reflector"]
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any("checkpoints" in str(p) for p in files) and any("tb" in str(p) for p in files)
    assert any("cache" in str(p) for p in files)
    for p in files:
        assert SECRET.encode() not in p.read_bytes(), p
    assert SECRET not in caplog.text


# ------------------------------------------------------------------------------- multi-host
@pytest.mark.parametrize("host_gather", [True, False])
def test_checkpoint_keeps_shardings_keys_and_host_values(tmp_path, host_gather):
    """Arrays come back as jax.Arrays in the target's sharding, whether saved from a host copy
    or shard by shard (what arrays spanning processes always get: the two-process version is
    tests/test_parallel_multihost_loop.py); typed PRNG keys and host values round-trip."""
    import optax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from sfjax.agents.checkpoint import LoopCheckpointer

    mesh = jax.make_mesh((1,), ("fsdp",))
    sharding = NamedSharding(mesh, P("fsdp", None))
    w = jax.device_put(jnp.arange(12.0).reshape(4, 3), sharding)
    tree = {"w": w, "opt": optax.adam(1e-3).init({"w": w}), "key": jax.random.key(7),
            "step": np.int64(5), "lr": 0.5}  # fmt: skip
    ckpt = LoopCheckpointer(tmp_path / "ck", host_gather=host_gather)
    ckpt.save(0, tree, {"phase": "p"})
    zeros = jax.tree.map(lambda x: x * 0, {k: v for k, v in tree.items() if k != "key"})
    got, meta = ckpt.restore(0, {**zeros, "key": jax.random.key(0)})
    ckpt.close()
    assert meta == {"phase": "p"}
    assert isinstance(got["w"], jax.Array) and got["w"].sharding == sharding
    np.testing.assert_array_equal(np.asarray(got["w"]), np.asarray(w))
    np.testing.assert_array_equal(np.asarray(got["opt"][0].mu["w"]), 0.0)
    assert got["opt"][0].mu["w"].sharding == sharding
    assert jax.dtypes.issubdtype(got["key"].dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(jax.random.key_data(got["key"]),
                                  jax.random.key_data(jax.random.key(7)))  # fmt: skip
    assert int(got["step"]) == 5 and float(got["lr"]) == 0.5


def test_only_process_0_writes_files(tmp_path, monkeypatch):
    """As process 1 of a multi-host run: no JSON, no events; checkpoints (collective) and the
    returned summary as on process 0, and resuming works from the shared checkpoints."""
    import sfjax.parallel as parallel

    class NoWriter:
        def __getattr__(self, name):
            raise AssertionError("only process 0 may write TensorBoard events")

    want = _loop(tmp_path / "p0").run()
    monkeypatch.setattr(parallel, "is_main_process", lambda: False)

    def kill_after(phase):
        if phase.index == 3:
            raise RuntimeError("killed")

    first = _loop(tmp_path / "p1", on_phase_end=kill_after)
    # the same loop as built with a writer: off process 0 the writer is dropped
    gated = SelfFinetuningLoop(first.cfg, first.rfr_cfg, PCFG, first.actor, first.env,
                               first.reflector, first.finetuner, tmp_path / "p1",
                               writer=NoWriter(), on_phase_end=kill_after)  # fmt: skip
    assert gated.writer is None and gated.progress is False
    with pytest.raises(RuntimeError, match="killed"):
        gated.run()
    got = _loop(tmp_path / "p1").run(resume=True)
    assert _strip(got) == _strip(want)
    written = {p.relative_to(tmp_path / "p1").parts[0]
               for p in (tmp_path / "p1").rglob("*") if p.is_file()}  # fmt: skip
    assert written == {"checkpoints"}, written
