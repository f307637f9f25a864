"""The Python (agent) end of the ns3-gym protocol: a ZMQ REP socket bound to loopback.

ns3-gym's ns-3 module opens a ZMQ REQ socket, connects to ``tcp://localhost:<port>`` and
drives the conversation (see ``messages.py`` for the message flow); the agent binds a REP
socket and answers. :class:`Ns3GymBridge` is that agent end. It works with any ns3-gym
scenario (it never looks inside the observation beyond the protocol's containers) and with
ours (``ns3/ran_slicing.cc``).

Driving an unmodified ns3-gym scenario (its ns-3 side is built inside an ns-3 tree with the
opengym module; it takes ``--openGymPort`` and ``--simSeed`` like ours)::

    bridge = Ns3GymBridge()                       # binds 127.0.0.1, free port
    sim = subprocess.Popen(["./ns3", "run", f"opengym --openGymPort={bridge.port}"])
    init = bridge.initialize()                    # -> spaces announced by the scenario
    state = bridge.receive_state()                # first observation, before any action
    while not state.game_over:
        bridge.send_action(init.action_space.sample())
        state = bridge.receive_state()
    bridge.send_stop(); bridge.close()

Every receive has a deadline and polls a ``watchdog`` callable a few times per second, so a
crashed simulator is reported at once with its own error text and a hung one raises
:class:`Ns3TimeoutError` instead of blocking the agent forever.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np
import zmq

from sfjax.envs.ns3gym import messages as pb
from sfjax.envs.ns3gym import spaces


class Ns3Error(RuntimeError):
    """The ns-3 peer failed: it exited, crashed or broke the protocol."""


class Ns3TimeoutError(Ns3Error, TimeoutError):
    """The ns-3 peer sent nothing within the deadline."""


@dataclasses.dataclass(frozen=True)
class SimInit:
    """What the simulator announces in ``SimInitMsg``."""

    observation_space: gym.Space | None
    """Observation space (None when the scenario declares none)."""
    action_space: gym.Space | None
    """Action space (None when the scenario declares none)."""
    sim_pid: int
    """Process id of the simulator (``simProcessId``)."""
    parent_pid: int
    """Process id of its parent (``wafShellProcessId``; the waf/ns3 shell in ns3-gym)."""


@dataclasses.dataclass(frozen=True)
class SimState:
    """One ``EnvStateMsg``: what the simulator reports after a step."""

    obs: Any
    """Observation, decoded from its DataContainer (ndarray for a Box)."""
    reward: float
    """Scalar reward computed by the scenario."""
    game_over: bool
    """True on the last message of an episode."""
    reason: int
    """``messages.REASON_SIMULATION_END`` or ``messages.REASON_GAME_OVER``."""
    info: str
    """Free-form extra info string (our scenario sends JSON)."""


class Ns3GymBridge:
    """REP end of the ns3-gym protocol, bound to ``tcp://<host>:<port>``.

    Args:
      port: TCP port; 0 picks a free one (read it back from ``.port``).
      host: interface to bind; loopback by default so nothing outside the machine can talk
        to the agent.
      watchdog: called while waiting; returns None while the peer is healthy, or an error
        message (e.g. "ns-3 exited with code 1: ...") that is raised as :class:`Ns3Error`.
    """

    def __init__(
        self,
        port: int = 0,
        host: str = "127.0.0.1",
        watchdog: Callable[[], str | None] | None = None,
    ):
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.REP)
        self._sock.setsockopt(zmq.LINGER, 0)
        try:
            if port == 0:
                self.port = self._sock.bind_to_random_port(f"tcp://{host}")
            else:
                self._sock.bind(f"tcp://{host}:{port}")
                self.port = port
        except zmq.ZMQError as err:
            self.close()
            raise Ns3Error(
                f"Cannot bind the ns3-gym socket to tcp://{host}:{port} ({err}); "
                "pass port=0 to pick a free port."
            ) from err
        self._watchdog = watchdog
        self._action_space: gym.Space | None = None
        self._awaiting_reply = False

    @property
    def address(self) -> str:
        """The address a ns-3 scenario connects to (what ``--openGymPort`` names)."""
        return f"tcp://localhost:{self.port}"

    # -- receiving ------------------------------------------------------------------------
    def _recv(self, timeout_s: float, what: str) -> bytes:
        if self._awaiting_reply:
            raise Ns3Error(f"Protocol misuse: reply to the last message before waiting for {what}.")
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Ns3TimeoutError(
                    f"ns-3 sent no {what} within {timeout_s:.0f} s; the simulator is hung or "
                    "too slow (raise the timeout for large scenarios)."
                )
            if self._sock.poll(int(min(remaining, 0.2) * 1000), zmq.POLLIN):
                self._awaiting_reply = True
                return self._sock.recv()
            if self._watchdog is not None:
                error = self._watchdog()
                if error is not None:
                    raise Ns3Error(error)

    def _send(self, msg) -> None:
        if not self._awaiting_reply:
            raise Ns3Error("Protocol misuse: nothing to reply to (ns-3 speaks first).")
        self._sock.send(msg.SerializeToString())
        self._awaiting_reply = False

    def initialize(self, timeout_s: float = 60.0) -> SimInit:
        """Wait for ``SimInitMsg`` and acknowledge it (``SimInitAck{done=true}``)."""
        raw = self._recv(timeout_s, "SimInitMsg")
        msg = pb.SimInitMsg()
        msg.ParseFromString(raw)
        obs_space = spaces.space_from_pb(msg.obsSpace) if msg.HasField("obsSpace") else None
        act_space = spaces.space_from_pb(msg.actSpace) if msg.HasField("actSpace") else None
        self._action_space = act_space
        self._send(pb.SimInitAck(done=True, stopSimReq=False))
        return SimInit(obs_space, act_space, int(msg.simProcessId), int(msg.wafShellProcessId))

    def receive_state(self, timeout_s: float = 60.0) -> SimState:
        """Wait for the next ``EnvStateMsg``; the caller must then act or stop."""
        raw = self._recv(timeout_s, "EnvStateMsg")
        msg = pb.EnvStateMsg()
        msg.ParseFromString(raw)
        obs = spaces.data_from_pb(msg.obsData) if msg.HasField("obsData") else None
        return SimState(
            obs=obs,
            reward=float(msg.reward),
            game_over=bool(msg.isGameOver),
            reason=int(msg.reason),
            info=msg.info,
        )

    # -- replying -------------------------------------------------------------------------
    def send_action(self, action: Any) -> None:
        """Answer the last state with an action of the announced action space."""
        if self._action_space is None:
            raise Ns3Error("The scenario declared no action space; call initialize() first.")
        if not self._action_space.contains(self._coerce(action)):
            raise ValueError(f"Action {action!r} is outside the action space {self._action_space}.")
        msg = pb.EnvActMsg(stopSimReq=False)
        msg.actData.CopyFrom(spaces.data_to_pb(action, self._action_space))
        self._send(msg)

    def _coerce(self, action: Any) -> Any:
        space = self._action_space
        if isinstance(space, gym.spaces.Discrete):
            try:
                return int(action) if int(action) == action else action
            except (TypeError, ValueError):
                return action
        if isinstance(space, gym.spaces.Box):
            return np.asarray(action, dtype=space.dtype).reshape(space.shape)
        return action

    def send_stop(self) -> None:
        """Answer the last state with ``stopSimReq=true``: ns-3 stops and exits."""
        self._send(pb.EnvActMsg(stopSimReq=True))

    @property
    def awaiting_reply(self) -> bool:
        """True between a received message and our reply to it."""
        return self._awaiting_reply

    def close(self) -> None:
        """Close the socket and its context (idempotent)."""
        sock = getattr(self, "_sock", None)
        if sock is not None and not sock.closed:
            sock.close(linger=0)
        ctx = getattr(self, "_ctx", None)
        if ctx is not None and not ctx.closed:
            ctx.term()
