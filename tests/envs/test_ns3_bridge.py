"""The agent end of the ns3-gym protocol and Ns3RanSlicingEnv against fake ns-3 peers (fast).

A fake peer speaks the ns-3 side (ZMQ REQ, connects to localhost, talks first) the way
ns3-gym's OpenGymInterface does. One runs in a thread (bridge tests); another is a small
executable standing in for ``ns3/build/ran_slicing`` (env lifetime tests), so these tests need
neither ns-3 nor a compiler.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import gymnasium as gym
import numpy as np
import pytest
import zmq

from sfjax.envs.ns3 import Ns3Config, Ns3RanSlicingEnv
from sfjax.envs.ns3gym import messages as pb
from sfjax.envs.ns3gym import spaces
from sfjax.envs.ns3gym.bridge import Ns3Error, Ns3GymBridge, Ns3TimeoutError


# ------------------------------------------------------------------- threaded fake peer
def _peer(port: int, n_steps: int, log: list, hang_after: int | None = None) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 5000)
    sock.connect(f"tcp://localhost:{port}")
    try:
        init = pb.SimInitMsg(simProcessId=4242, wafShellProcessId=1)
        init.obsSpace.CopyFrom(spaces.space_to_pb(gym.spaces.Box(0, 10, (3,), np.float32)))
        init.actSpace.CopyFrom(spaces.space_to_pb(gym.spaces.Discrete(6)))
        sock.send(init.SerializeToString())
        ack = pb.SimInitAck()
        ack.ParseFromString(sock.recv())
        log.append(("ack", ack.done, ack.stopSimReq))
        for step in range(n_steps + 1):
            if hang_after is not None and step > hang_after:
                time.sleep(3)
                return
            state = pb.EnvStateMsg(reward=float(step), isGameOver=step == n_steps,
                                   info=json.dumps({"step": step}))
            obs = np.asarray([step, step + 1, step + 2], np.float32)
            state.obsData.CopyFrom(spaces.data_to_pb(obs, gym.spaces.Box(0, 10, (3,))))
            sock.send(state.SerializeToString())
            act = pb.EnvActMsg()
            act.ParseFromString(sock.recv())
            if act.stopSimReq:
                log.append(("stop", step))
                return
            log.append(("action", spaces.data_from_pb(act.actData)))
    finally:
        sock.close()
        ctx.term()


def test_bridge_full_episode_with_threaded_peer():
    bridge = Ns3GymBridge()
    log: list = []
    peer = threading.Thread(target=_peer, args=(bridge.port, 3, log), daemon=True)
    peer.start()
    try:
        init = bridge.initialize(timeout_s=5)
        assert init.sim_pid == 4242
        assert init.action_space == gym.spaces.Discrete(6)
        assert init.observation_space.shape == (3,)
        first = bridge.receive_state(timeout_s=5)
        np.testing.assert_array_equal(first.obs, [0, 1, 2])
        assert not first.game_over
        for action in (5, 0, 2):
            bridge.send_action(action)
            state = bridge.receive_state(timeout_s=5)
        assert state.game_over and state.reward == 3.0
        assert json.loads(state.info) == {"step": 3}
        bridge.send_stop()
        peer.join(timeout=5)
    finally:
        bridge.close()
    assert log == [("ack", True, False), ("action", 5), ("action", 0), ("action", 2),
                   ("stop", 3)]


def test_bridge_rejects_misuse_and_bad_actions():
    bridge = Ns3GymBridge()
    log: list = []
    peer = threading.Thread(target=_peer, args=(bridge.port, 2, log), daemon=True)
    peer.start()
    try:
        with pytest.raises(Ns3Error, match="nothing to reply"):
            bridge.send_stop()
        bridge.initialize(timeout_s=5)
        bridge.receive_state(timeout_s=5)
        with pytest.raises(Ns3Error, match="reply to the last message"):
            bridge.receive_state(timeout_s=1)
        with pytest.raises(ValueError, match="outside the action space"):
            bridge.send_action(6)
        bridge.send_stop()
        peer.join(timeout=5)
    finally:
        bridge.close()


def test_bridge_times_out_on_a_silent_peer():
    bridge = Ns3GymBridge()
    log: list = []
    peer = threading.Thread(target=_peer, args=(bridge.port, 5, log, 1), daemon=True)
    peer.start()
    try:
        bridge.initialize(timeout_s=5)
        bridge.receive_state(timeout_s=5)
        bridge.send_action(1)
        bridge.receive_state(timeout_s=5)
        bridge.send_action(1)
        t0 = time.monotonic()
        with pytest.raises(Ns3TimeoutError, match="hung"):
            bridge.receive_state(timeout_s=0.5)
        assert time.monotonic() - t0 < 2.5
    finally:
        bridge.close()


def test_bridge_reports_watchdog_error_at_once():
    bridge = Ns3GymBridge(watchdog=lambda: "ns-3 exited with code 9: boom")
    try:
        with pytest.raises(Ns3Error, match="boom"):
            bridge.initialize(timeout_s=30)
    finally:
        bridge.close()


def test_bridge_binds_loopback_only():
    bridge = Ns3GymBridge()
    try:
        endpoint = bridge._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        assert endpoint.startswith("tcp://127.0.0.1:")
        assert bridge.address == f"tcp://localhost:{bridge.port}"
        with pytest.raises(Ns3Error, match="Cannot bind"):
            Ns3GymBridge(port=bridge.port)
    finally:
        bridge.close()


# ------------------------------------------------------------- fake scenario executable
FAKE_SCENARIO = textwrap.dedent(
    """
    import json, os, sys, time
    import numpy as np, zmq, gymnasium as gym
    from sfjax.envs.ns3gym import messages as pb, spaces

    args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
    port, steps = int(args["openGymPort"]), int(args["steps"])
    n_prb, rbg = int(args["nPrb"]), int(args["initialRbg"])
    n_rbg = n_prb // 2
    mode = os.environ.get("FAKE_NS3_MODE", "normal")
    log = open(os.environ["FAKE_NS3_LOG"], "a")
    log.write(json.dumps({"pid": os.getpid(), "args": sys.argv[1:]}) + "\\n"); log.flush()
    ctx = zmq.Context(); sock = ctx.socket(zmq.REQ); sock.connect(f"tcp://localhost:{port}")
    init = pb.SimInitMsg(simProcessId=os.getpid(), wafShellProcessId=os.getppid())
    init.obsSpace.CopyFrom(spaces.space_to_pb(gym.spaces.Box(-1, 1, (13,), np.float32)))
    init.actSpace.CopyFrom(spaces.space_to_pb(gym.spaces.Discrete(n_rbg + 1)))
    sock.send(init.SerializeToString()); sock.recv()
    prev = rbg
    for step in range(steps + 1):
        if mode == "hang" and step == 2:
            time.sleep(600)
        if mode == "crash" and step == 2:
            sys.stderr.write("fake ns-3: assertion failed in step 2\\n"); sys.exit(7)
        info = {"step": step, "sim_time_s": 0.1 * (step + 1), "rbg": rbg, "n_rbg": n_rbg}
        for p, r in (("", rbg), ("other_", n_rbg - r if False else n_rbg - rbg)):
            info.update({p + "se": 0.1 * r, p + "violation": float(r < 3),
                         p + "reconfiguration": float(step > 0 and rbg != prev),
                         p + "arrival_rate_bps": 1e6, p + "queue_delta_bytes": -512.0 * r,
                         p + "dropped_bytes": 0.0, p + "delivered_bytes": 1000.0 * r,
                         p + "mean_delay_ms": 5.0, p + "max_delay_ms": 9.0,
                         p + "prbs": 2 * r, p + "queued_bytes": 0.0, p + "delivered_packets": 2,
                         p + "dropped_packets": 0, p + "late_packets": 0, p + "tbs": 10,
                         p + "tb_errors": 1, p + "harq_retx": 1})
        st = pb.EnvStateMsg(reward=0.0, isGameOver=step == steps, info=json.dumps(info))
        st.obsData.CopyFrom(spaces.data_to_pb(np.zeros(13, np.float32),
                                              gym.spaces.Box(-1, 1, (13,), np.float32)))
        sock.send(st.SerializeToString())
        act = pb.EnvActMsg(); act.ParseFromString(sock.recv())
        if act.stopSimReq:
            log.write(json.dumps({"stop": step}) + "\\n"); break
        prev, rbg = rbg, spaces.data_from_pb(act.actData)
        log.write(json.dumps({"action": rbg}) + "\\n"); log.flush()
    """
)


@pytest.fixture()
def fake_binary(tmp_path, monkeypatch):
    path = tmp_path / "fake_ran_slicing"
    path.write_text(f"#!{sys.executable}\n{FAKE_SCENARIO}")
    path.chmod(0o755)
    log = tmp_path / "fake.log"
    monkeypatch.setenv("FAKE_NS3_LOG", str(log))
    return path, log


def _log(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); look at its state
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _config(binary, steps=4, **kw):
    from sfjax.envs.ran import RanSlicingConfig

    return Ns3Config(
        scenario=RanSlicingConfig(episode_steps=steps), binary=str(binary), jax_drop=False,
        fading="none", **kw,
    )


def test_env_episode_against_fake_scenario(fake_binary):
    binary, log = fake_binary
    env = Ns3RanSlicingEnv(_config(binary))
    assert env.action_space == gym.spaces.Discrete(12)
    obs, info = env.reset(seed=3)
    assert obs.shape == (9,) and env.observation_space.contains(obs)  # both slices (default)
    pid = env.pid
    assert _alive(pid)
    actions = [0, 4, 4, 11]
    for k, a in enumerate(actions):
        obs, reward, terminated, truncated, info = env.step(a)
        assert not terminated and truncated == (k == len(actions) - 1)
        rbg = a + 1  # min_rbg_per_slice
        assert info["prbs"] == 2 * rbg and info["se"] == pytest.approx(0.1 * rbg)
        assert info["reconfiguration"] == (k in (0, 1, 3))  # initial action is 5 -> 6 RBGs
        expected = 15 * (0.1 * rbg + 1) - 15 * info["reconfiguration"] - 300 * info["violation"]
        assert reward == pytest.approx(expected) and info["utility"] == reward
        assert info["delivered_bits"] == pytest.approx(8000.0 * rbg)
        assert obs[0] == pytest.approx(2 * rbg / 25)
        for key in ("se", "violation", "reconfiguration", "arrival_rate_bps",
                    "queue_delta_bytes", "dropped_bytes"):
            assert key in info and "other_" + key in info
    assert not _alive(pid)  # episode over: stopped
    entries = _log(log)
    assert entries[0]["pid"] == pid
    assert "--simSeed=4" in entries[0]["args"] and "--initialRbg=6" in entries[0]["args"]
    assert [e["action"] for e in entries if "action" in e] == [1, 5, 5, 12]
    assert entries[-1] == {"stop": 4}
    with pytest.raises(RuntimeError, match="reset"):
        env.step(0)
    env.close()


def test_env_rejects_bad_action_and_close_stops_process(fake_binary):
    binary, _ = fake_binary
    with Ns3RanSlicingEnv(_config(binary, steps=10)) as env:
        env.reset(seed=0)
        pid = env.pid
        with pytest.raises(ValueError, match="action must be"):
            env.step(12)
        with pytest.raises(ValueError, match="action must be"):
            env.step(1.5)
    assert not _alive(pid)


def test_env_reset_restarts_and_exceptions_stop_process(fake_binary):
    binary, log = fake_binary
    env = Ns3RanSlicingEnv(_config(binary, steps=10))
    env.reset(seed=0)
    first = env.pid
    env.step(1)
    env.reset(seed=1)
    assert not _alive(first) and _alive(env.pid)
    second = env.pid
    with pytest.raises(KeyError):
        with env:
            env.step(2)
            raise KeyError("user code failed")
    assert not _alive(second)


def test_env_garbage_collection_stops_process(fake_binary):
    binary, _ = fake_binary
    env = Ns3RanSlicingEnv(_config(binary, steps=10))
    env.reset(seed=0)
    pid = env.pid
    del env
    gc.collect()
    deadline = time.monotonic() + 5
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid)


def test_env_hung_simulator_times_out_and_is_killed(fake_binary, monkeypatch):
    binary, _ = fake_binary
    monkeypatch.setenv("FAKE_NS3_MODE", "hang")
    env = Ns3RanSlicingEnv(_config(binary, steps=10, step_timeout_s=1.0))
    env.reset(seed=0)
    pid = env.pid
    env.step(1)
    with pytest.raises(Ns3TimeoutError, match="no EnvStateMsg within 1 s"):
        env.step(1)
    assert not _alive(pid)


def test_env_crashed_simulator_reports_its_error(fake_binary, monkeypatch):
    binary, _ = fake_binary
    monkeypatch.setenv("FAKE_NS3_MODE", "crash")
    env = Ns3RanSlicingEnv(_config(binary, steps=10, step_timeout_s=60.0))
    env.reset(seed=0)
    env.step(1)
    t0 = time.monotonic()
    with pytest.raises(Ns3Error, match="exited with code 7(.|\n)*assertion failed in step 2"):
        env.step(1)
    assert time.monotonic() - t0 < 10


def test_sigterm_of_the_agent_stops_the_simulator(fake_binary, tmp_path):
    binary, log = fake_binary
    script = tmp_path / "agent.py"
    script.write_text(textwrap.dedent(f"""
        import time
        from sfjax.envs.ns3 import Ns3Config, Ns3RanSlicingEnv
        from sfjax.envs.ran import RanSlicingConfig
        env = Ns3RanSlicingEnv(Ns3Config(scenario=RanSlicingConfig(episode_steps=50),
                               binary={str(binary)!r}, jax_drop=False, fading="none"))
        env.reset(seed=0)
        print(env.pid, flush=True)
        time.sleep(60)
    """))
    agent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                             env=dict(os.environ, JAX_PLATFORMS="cpu"))
    try:
        pid = int(agent.stdout.readline())
        assert _alive(pid)
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=20)
        deadline = time.monotonic() + 5
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(pid)
    finally:
        if agent.poll() is None:
            agent.kill()


def test_missing_build_dependencies_give_a_clear_message(tmp_path, monkeypatch):
    from sfjax.envs.ns3gym import build

    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("bash", "dirname", "mkdir"):
        src = subprocess.run(["bash", "-c", f"command -v {tool}"], capture_output=True,
                             text=True).stdout.strip()
        (bindir / tool).symlink_to(src)
    monkeypatch.setenv("PATH", str(bindir))
    monkeypatch.setenv("SFJAX_NS3_BUILD_DIR", str(tmp_path / "build"))
    with pytest.raises(build.Ns3BuildError, match="(?s)development packages are missing.*g\\+\\+"):
        build.ensure_built(force=True)
