"""Algorithm 1's loop under two ``jax.distributed`` processes equals one process (issue 10).

Two processes on localhost, 4 fake CPU devices each, started through the launcher on the mesh
``data=1 x fsdp=4 x tp=2``: ``fsdp`` spans both processes, so every LoRA matrix and its AdamW
moments are sharded over devices of *both* hosts (no host holds a whole one; ``np.asarray`` of
one fails). Each process runs :class:`~sfjax.agents.loop.SelfFinetuningLoop` with the real
sharded KTO fine-tuner on a tiny Qwen3 (+ LoRA), the ``rule`` Reflector and light fakes for the
Actor and env (the Actor's action preferences are a sharded reduction of the LoRA weights, so
what it does after a resume depends on the restored shards); the loop is killed after its first
KTO phase, the in-memory LoRA is zeroed, and the run resumes from the orbax checkpoint to the
end; then the experiment's adapter export runs. Checked against the same run in one process on
one device, uninterrupted, in the pytest process:

* trajectories, reflections and KTO datasets identical; the summary equal (KTO metrics to 1e-4
  relative); the final PEFT adapter equal to 2e-5 -- so the collective checkpoint saved and
  restored the cross-host shards (a lost restore would change the Actor's actions, hence the
  trajectories, and the adapter by O(0.1));
* the Reflector and the (``host_side``) env ran on process 0 only -- on process 1 they raise if
  called -- and their results reached process 1, which built the same KTO data;
* process 1 never wrote a JSON artefact (its ``save_json`` raises if called; process 0's
  counts its writes, so the loop still writes through that name);
* the last checkpoint, written by two processes as cross-host shards, restores in the pytest
  process onto one device and equals the one-process run's final state;
* a Reflector failure on process 0 raises on both processes (none hangs in a collective), and a
  reply that differs between processes is process 0's on both; a host-side Reflector is built
  on process 0 only (process 1 holds a stand-in of the same name), a failed build raises on
  both;
* a run directory that is not shared by the two processes is rejected on both.

Tolerances: sharding reorders float32 partial sums only (``test_parallel_devices.py``: 1e-6
after one KTO step). Over ~10 AdamW steps at lr 5e-3 that stays ~1e-6 on most entries, but
Adam's normalisation amplifies it on the few whose gradient is a near-cancelling sum: measured
4e-5 and 5e-5 on 1 of 256 entries (two kernel formulations of the same maths, 2026-11-24). The
adapter is compared to 1e-4 (2 % of one step's update; a wrong shard or a missing reduction
moves entries by a whole step, 5e-3) and KTO metrics to 1e-4 relative.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from experiment_scripts import experiment  # tests/experiment_scripts.py
from multihost_launch import launch_two  # tests/multihost_launch.py

MESH = ("--data", "1", "--fsdp", "4", "--tp", "2")
STATE_ATOL = 1e-4  # adapter / optimizer state after the loop (see the module docstring)


def _experiment():
    return experiment("sf_ranslicing")


# ------------------------------------------------------------------------------- the run
def kto_config():
    from sfjax.train.kto import KTOConfig

    return KTOConfig(learning_rate=5e-3, micro_batch_size=4, max_prompt_length=32,
                     max_completion_length=40, buckets=(32,), completion_buckets=(40,),
                     warmup_ratio=0.0, lr_schedule="constant", shuffle=False, progress=False)  # fmt: skip


class FakeActor:
    """Samples actions from softmax(preferences); the preferences are a jitted (sharded)
    reduction of the LoRA weights, so they change with KTO and with a restore."""

    def __init__(self, model):
        import jax
        import jax.numpy as jnp

        from sfjax import parallel
        from sfjax.models import lora as lora_lib

        self.model = model

        @jax.jit
        def prefs(lora):
            s = sum(jnp.sum(x * x) for x in jax.tree.leaves(lora))
            return jnp.sin(s * jnp.arange(1, 9, dtype=jnp.float32))

        # a replicated result, fetched to the host: the same numbers on every process
        self._prefs = lambda: parallel.to_host(prefs(lora_lib.lora_state(model)))

    def _draw(self, key, n):
        import jax

        logits = self._prefs() * 4.0
        return [int(a) + 1 for a in jax.random.categorical(key, logits, shape=(n,))]

    def act(self, states, histories, step, key):
        from sfjax.agents.actor import ActorDecision
        from sfjax.agents.prompts import format_output

        out = []
        for s, h, a in zip(states, histories, self._draw(key, len(states))):
            prompt = f"t={step} prev={s['prev_action']} hist={len(h)}"
            out.append(ActorDecision(prompt, format_output("ok", a, "fine", PCFG), "ok", a,
                                     "fine", True, None))  # fmt: skip
        return out

    def sample(self, prompts, n, keys):  # one key per prompt (rfr.SampleFn)
        from sfjax.agents.prompts import format_output

        assert len(keys) == len(prompts)
        return [[format_output("r", a, "a", PCFG) for a in self._draw(k, n)] for k in keys]


class FakeEnv:
    """Demand drifts; fewer resources than demand -> violation. ``host_side``: in a multi-host
    run the loop steps it on process 0 only (on another process it raises)."""

    action_lo, action_hi = 1, 8
    host_side = True

    def _check(self):
        import jax

        assert jax.process_index() == 0, "a host_side env must be stepped on process 0 only"

    def reset(self, key, num_envs):
        import jax

        self._check()
        self.demand = np.asarray(jax.random.uniform(key, (num_envs,), minval=2, maxval=6))
        self.prev = np.full(num_envs, 4)
        return [self._state(e, 0.0) for e in range(num_envs)]

    def _state(self, e, se):
        return {"prev_action": int(self.prev[e]), "se": se,
                "arrival_rate_bps": float(self.demand[e] * 1e6), "queue_delta_bytes": 0.0,
                "dropped_bytes": 0.0}  # fmt: skip

    def step(self, actions, key):
        import jax

        self._check()
        noise = np.asarray(jax.random.normal(key, self.demand.shape)) * 0.3
        states, fbs = [], []
        for e, a in enumerate(actions):
            se = np.float32(min(self.demand[e], a) / a * 6.0)  # numpy scalars travel too
            fbs.append({"se": se, "violation": float(a < self.demand[e]),
                        "reconfiguration": float(a != self.prev[e]),
                        "arrival_rate_bps": float(self.demand[e] * 1e6),
                        "queue_delta_bytes": 0.0, "dropped_bytes": 0.0})  # fmt: skip
            self.prev[e] = a
            states.append(self._state(e, float(se)))
        self.demand = np.clip(self.demand + noise, 1, 7)
        return states, fbs


PCFG = None  # set by _components (needs sfjax imports)


def _components(ckpt: str):
    """Model (+ LoRA, on the default mesh if one is set), fine-tuner, Actor, env, Reflector."""
    import jax.numpy as jnp

    from sfjax.agents import prompts
    from sfjax.agents.finetune import KTOFineTuner
    from sfjax.agents.reflector import ReflectorConfig, make_reflector
    from sfjax.models import qwen3
    from sfjax.models.lora import LoRAConfig
    from sfjax.tokenizer import load_tokenizer

    global PCFG
    PCFG = prompts.PromptConfig(action_lo=1, action_hi=8, history_window=2)
    model = qwen3.from_pretrained(ckpt, dtype=jnp.float32)
    finetuner = KTOFineTuner(model, load_tokenizer(ckpt), kto_config(), LoRAConfig(rank=4, alpha=8.0))
    reflector = make_reflector(ReflectorConfig(backend="rule"), PCFG)
    return finetuner, FakeActor(model), FakeEnv(), reflector


def make_loop(ckpt: str, run_dir: Path, reflector_wrapper=None, on_phase_end=None):
    from sfjax.agents.loop import LoopConfig, SelfFinetuningLoop
    from sfjax.agents.rfr import RfRConfig

    finetuner, actor, env, reflector = _components(ckpt)
    if reflector_wrapper is not None:
        reflector = reflector_wrapper(reflector)
    loop = SelfFinetuningLoop(
        LoopConfig(sf_iterations=1, num_envs=2, trajectory_steps=5, seed=1),
        RfRConfig(kto_iterations=2, num_rollouts=2, tau=0.5), PCFG, actor, env, reflector,
        finetuner, run_dir, progress=False, on_phase_end=on_phase_end,
    )  # fmt: skip
    return loop


# ------------------------------------------------------------------------------- worker side
def _broadcast_checks() -> None:
    """Reflector broadcast without a model: process-dependent replies, failure on process 0."""
    import jax

    from sfjax.agents.reflector import ReflectorError, reflect_on_all_processes
    from sfjax.agents.reflectors.broadcast import build_on_process_0
    from sfjax.agents.trajectory import Reflection, StepLabel

    me = jax.process_index()

    class PerProcess:  # an "API" whose reply differs between hosts
        name = "per-process"

        def reflect(self, trajectories, key=None):
            return [Reflection(0, [StepLabel(0, "effective", 3 + me, f"p{me}")], "s", self.name)]

    got = reflect_on_all_processes(PerProcess(), [])
    assert got[0].labels[0].improved_action == 3 and got[0].labels[0].reason == "p0", got

    class Failing:
        name = "failing"

        def reflect(self, trajectories, key=None):
            raise ReflectorError("gave up after 3 retries")

    try:
        reflect_on_all_processes(Failing(), [])
    except ReflectorError as e:
        assert "gave up after 3 retries" in str(e), e
    else:
        raise AssertionError("a Reflector failure on process 0 must raise on every process")

    # Host-side backends are built on process 0 only (the API key need exist there alone).
    def factory():
        assert me == 0, "a host-side Reflector must be built on process 0 only"
        return PerProcess()

    built = build_on_process_0(factory)
    assert built.name == "per-process" and isinstance(built, PerProcess) == (me == 0)
    assert reflect_on_all_processes(built, [])[0].labels[0].reason == "p0"

    def no_key():
        assert me == 0
        raise ReflectorError("set the environment variable DEEPSEEK_API_KEY")

    try:
        build_on_process_0(no_key)
    except ReflectorError as e:
        assert "DEEPSEEK_API_KEY" in str(e), e
    else:
        raise AssertionError("a failed build on process 0 must raise on every process")


def _shared_directory_checks(out: Path) -> None:
    """A run dir both hosts see passes; one path per host (two local disks) fails on both."""
    import jax

    from sfjax import parallel

    parallel.check_shared_directory(out)
    try:
        parallel.check_shared_directory(out / f"local_to_process_{jax.process_index()}")
    except RuntimeError as e:
        assert "not shared by all 2 processes" in str(e), e
    else:
        raise AssertionError("per-host directories must be rejected on every process")


def worker(ckpt: str, out_dir: str) -> None:
    import jax

    import sfjax.agents.loop as loop_mod
    from sfjax import parallel

    assert jax.process_count() == 2 and jax.device_count() == 8
    assert dict(parallel.default_mesh().shape) == {"data": 1, "fsdp": 4, "tp": 2}
    me = jax.process_index()
    out = Path(out_dir)
    _broadcast_checks()
    _shared_directory_checks(out)

    calls = {"reflect": 0}

    def only_on_process_0(inner):
        class Checked:
            name = inner.name

            def reflect(self, trajectories, key=None):
                assert me == 0, "the Reflector must be queried on process 0 only"
                calls["reflect"] += 1
                return inner.reflect(trajectories, key)

        return Checked()

    # The loop writes every JSON file through loop_mod.save_json: process 0 counts its writes
    # (so the name is still in use: replacing it on process 1 checks something), process 1's
    # raise.
    real_save_json, json_writes = loop_mod.save_json, []

    def counted(path, obj):
        json_writes.append(path)
        return real_save_json(path, obj)

    def no_files(path, obj):
        raise AssertionError(f"process {me} wrote {path}")

    loop_mod.save_json = counted if me == 0 else no_files

    class Killed(Exception):
        pass

    def kill(phase):
        if phase.kind == "kto":
            # what the checkpoint just saved: LoRA / AdamW shards on devices of both hosts
            leaves = jax.tree.leaves(loop.finetuner.arrays()["lora"])
            assert leaves and all(not x.is_fully_addressable for x in leaves)
            assert any("fsdp" in str(x.sharding.spec) for x in leaves)
            raise Killed

    loop = make_loop(ckpt, out / "run", only_on_process_0, kill)
    try:
        loop.run()
        raise AssertionError("not killed")
    except Killed:
        pass
    # "restart": the in-memory state is lost; only the checkpoint remains
    arrays = loop.finetuner.arrays()
    loop.finetuner.load_arrays(jax.tree.map(lambda x: x * 0, arrays))
    resumed = type(loop)(loop.cfg, loop.rfr_cfg, loop.prompt_cfg, loop.actor, loop.env,
                         loop.reflector, loop.finetuner, loop.run_dir, progress=False)  # fmt: skip
    summary = resumed.run(resume=True)
    _experiment()._save_adapter(loop.finetuner, out / "run" / "adapter")
    if parallel.is_main_process():
        assert any(Path(p).name == "summary.json" for p in json_writes), json_writes
        (out / "worker.json").write_text(
            json.dumps({"summary": summary, "reflect_calls": calls["reflect"]})
        )
    parallel.sync("written")
    jax.distributed.shutdown()


# ------------------------------------------------------------------------------- pytest side
def _strip(summary):
    s = json.loads(json.dumps(summary))
    s.pop("timings_s")
    s.pop("actor", None)
    for r in s["iterations"]:
        r.pop("wall_s", None)
    return s


def _adapter(run_dir: Path):
    from safetensors.numpy import load_file

    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def _assert_close_tree(got, want, rtol, path=""):
    if isinstance(want, dict):
        assert set(got) == set(want), (path, set(got) ^ set(want))
        for k in want:
            ops = (k.replace("margins", "chosen"), k.replace("margins", "rejected"))
            if k.endswith("margins") and set(ops) <= set(want):
                # chosen - rejected: its rounding is relative to the operands, not to the
                # (possibly near-zero) difference
                scale = abs(want[ops[0]]) + abs(want[ops[1]])
                np.testing.assert_allclose(got[k], want[k], rtol=0, atol=rtol * scale + 1e-7,
                                           err_msg=f"{path}/{k}")
                continue
            _assert_close_tree(got[k], want[k], rtol, f"{path}/{k}")
    elif isinstance(want, list):
        assert len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want)):
            _assert_close_tree(g, w, rtol, f"{path}[{i}]")
    elif isinstance(want, float):
        np.testing.assert_allclose(got, want, rtol=rtol, atol=1e-7, err_msg=path)
    else:
        assert got == want, (path, got, want)


def test_two_process_loop_with_resume_matches_one_process(tmp_path):
    import jax

    from sfjax import testing
    from sfjax.agents.checkpoint import LoopCheckpointer

    # One layer: depth adds compile time, not multi-host coverage.
    ckpt = testing.write_tiny_checkpoint(tmp_path / "actor", {"num_hidden_layers": 1}, seed=0)
    two = tmp_path / "two"
    two.mkdir()
    launch_two(__file__, [str(ckpt), str(two)], MESH)
    worker_out = json.loads((two / "worker.json").read_text())
    assert worker_out["reflect_calls"] == 1  # once per reflect phase, on process 0 only

    one = tmp_path / "one"
    loop = make_loop(str(ckpt), one)
    want = loop.run()
    _experiment()._save_adapter(loop.finetuner, one / "adapter")
    _assert_close_tree(_strip(worker_out["summary"]), _strip(want), rtol=1e-4)
    assert want["iterations"][0]["n_desirable"] and want["iterations"][0]["n_undesirable"]
    for sub in ("trajectories", "reflections", "datasets"):
        names = sorted(p.name for p in (one / sub).iterdir())
        assert names and names == sorted(p.name for p in (two / "run" / sub).iterdir()), sub
        for name in names:
            a = json.loads((one / sub / name).read_text())
            b = json.loads((two / "run" / sub / name).read_text())
            assert a == b, f"{sub}/{name} differs between one and two processes"
    a, b = _adapter(one), _adapter(two / "run")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(b[k], a[k], atol=STATE_ATOL, err_msg=k)
    assert any(np.abs(v).max() > 0 for k, v in a.items() if "lora_B" in k)

    # The two-process checkpoint (cross-host shards) restores onto this process's one device.
    ckpt_mgr = LoopCheckpointer(two / "run" / "checkpoints")
    final = loop.finetuner.arrays()
    like = {"finetuner": final, "root_key": jax.random.key_data(jax.random.key(0))}
    restored, meta = ckpt_mgr.restore(ckpt_mgr.latest_step(), like)
    ckpt_mgr.close()
    assert meta["phase"] == "iter1/collect"
    flat_want, tree_want = jax.tree.flatten(final)
    flat_got, tree_got = jax.tree.flatten(restored["finetuner"])
    assert tree_got == tree_want and len(flat_want) > 4
    for g, w in zip(flat_got, flat_want):
        assert isinstance(g, np.ndarray) or g.sharding == w.sharding
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=STATE_ATOL)


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2])
