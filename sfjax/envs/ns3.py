"""The paper's RAN slicing scenario in ns-3, as a gymnasium-style environment.

:class:`Ns3RanSlicingEnv` runs ``ns3/ran_slicing.cc`` (built on first use against the system
ns-3, see :mod:`sfjax.envs.ns3gym.build`) and talks to it over the ns3-gym wire protocol
(:mod:`sfjax.envs.ns3gym`): ns-3 connects a ZMQ REQ socket to our REP socket on loopback,
announces its spaces, then every 100 ms of simulated time reports the feedback of both slices
and waits for the next allocation.

It mirrors :class:`sfjax.envs.ran.RanSlicingEnv` so that either can stand behind an agent:

* the same :class:`~sfjax.envs.ran.RanSlicingConfig` describes the cell, slices, buffers,
  action table and episode length, and is translated into the scenario's command line;
* ``action`` is the same index: the controlled slice gets ``action + min_rbg_per_slice`` RBGs
  (the lowest-frequency ones), i.e. ``config.prbs_per_action[action]`` PRBs;
* ``info`` has the same keys (``se``, ``violation``, ``reconfiguration``, ``arrival_rate_bps``,
  ``queue_delta_bytes``, ``dropped_bytes``, ``prbs``, ``delivered_bits``, ``queued_bytes``,
  ``delivered_packets``, ``dropped_packets``, ``late_packets``, ``mean_delay_ms``,
  ``max_delay_ms`` and their ``other_`` twins, ``utility``; not ``utilization``/``link_se``)
  plus ns-3's ``tbs``/``tb_errors``/``harq_retx``, and the observation is the same scaled
  eq. 14 vector. ns-3 reports eq. 1's SE only (``se`` = ``se_allocated``; there is no
  ``se_scheduled``): the JAX env's default ``se_definition="allocated"`` reports the same
  quantity; with ``"scheduled"`` the two ``se`` differ in meaning (a warning says so);
* ``reward`` is the eq. 15 utility ``w_se (SE + offset) - w_c c - w_v v`` of the step;
* the intra-slice scheduler is always ns-3's ``PfFfMacScheduler`` (the JAX env's
  ``scheduler="pf_ns3"``; ``RanSlicingConfig.scheduler`` is not used here);
* by default the large-scale channel is the JAX env's fixed drop (positions, LOS state,
  shadowing from ``config.geometry_seed``) and the fading trace is the project's own
  (:mod:`sfjax.envs.fading`), so differences come from ns-3's LTE stack, not from the draw.

Lifetime: the ns-3 process never outlives the env. ``close()`` (also via ``with``), garbage
collection (``weakref.finalize``), interpreter exit and SIGTERM stop it, and the scenario
itself exits when its parent dies (``PR_SET_PDEATHSIG``) or when the agent stays silent for
``agent_timeout_s``. A simulator that stays silent for ``step_timeout_s`` raises
:class:`~sfjax.envs.ns3gym.bridge.Ns3TimeoutError`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import signal
import subprocess
import tempfile
import threading
import time
import warnings
import weakref
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from sfjax.envs.ns3gym import build
from sfjax.envs.ns3gym.bridge import Ns3Error, Ns3GymBridge, Ns3TimeoutError
from sfjax.metrics import UtilityWeights, step_utility

__all__ = ["Ns3Config", "Ns3RanSlicingEnv", "Ns3Error", "Ns3TimeoutError"]

_FEEDBACK = ("se", "violation", "reconfiguration", "arrival_rate_bps", "queue_delta_bytes",
             "dropped_bytes")


@dataclasses.dataclass(frozen=True)
class Ns3Config:
    """How to run the ns-3 scenario; the scenario itself is ``ran``'s RanSlicingConfig."""

    scenario: Any = None
    """A ``sfjax.envs.ran.RanSlicingConfig``; None: its defaults (the paper's scenario)."""
    binary: str | None = None
    """Scenario executable; None: ``ns3/build/ran_slicing``, built on first use."""
    jax_drop: bool = True
    """Use the JAX env's drop (positions, LOS state, shadowing): the fixed one from
    ``geometry_seed``, or a fresh one per reset seed with ``randomize_drop``. False: ns-3
    draws its own (UMa channel-condition model and shadowing, positions from ``simSeed``)."""
    fading: str = "per_ue"
    """Fast fading from the project's traces (:mod:`sfjax.envs.fading`): ``per_ue`` gives each
    UE a trace of its slice's model at a random offset, read once per ms with wrap-around (as
    the JAX env); ``shared_trace`` uses ns-3's own TraceFadingLossModel with the controlled
    slice's first trace for every link (random offsets re-drawn every 0.5 s); ``none``."""
    weights: UtilityWeights = UtilityWeights()
    """eq. 15 weights of ``reward`` (also sent to the scenario for ns3-gym clients)."""
    step_timeout_s: float = 120.0
    """Longest wait for one decision's report before the simulator counts as hung."""
    startup_timeout_s: float = 120.0
    """Longest wait for the scenario to connect after launch."""
    agent_timeout_s: float = 3600.0
    """The scenario exits if the agent does not answer within this (s)."""
    extra_args: tuple[str, ...] = ()
    """More ``--name=value`` arguments for the scenario (see ``ran_slicing --help``)."""


def _scenario_config(cfg):
    if cfg is None:
        from sfjax.envs.ran import RanSlicingConfig

        return RanSlicingConfig()
    return cfg


def scenario_args(scenario) -> list[str]:
    """Command-line arguments of ``ran_slicing`` for a RanSlicingConfig (except the drop)."""
    s0, s1 = scenario.slices
    for name in ("mean_on_s", "mean_off_s", "packet_bytes"):
        if getattr(s0, name) != getattr(s1, name):
            raise ValueError(
                f"The ns-3 scenario uses one {name} for both slices; got "
                f"{getattr(s0, name)} and {getattr(s1, name)}."
            )
    cell = scenario.cell
    if cell.interference_margin_db != 0.0 or cell.downtilt_deg != 0.0:
        raise ValueError("The ns-3 scenario has no interference margin or downtilt; set them to 0.")
    min_rbg = scenario.min_rbg_per_slice
    return [
        f"--nPrb={cell.n_prb}",
        f"--nGbr={s0.n_ues}",
        f"--nNonGbr={s1.n_ues}",
        f"--controlledSlice={scenario.controlled_slice}",
        f"--initialRbg={scenario.initial_action + min_rbg}",
        f"--gbrRate={s0.bit_rate_bps}",
        f"--nonGbrRate={s1.bit_rate_bps}",
        f"--gbrBudgetMs={s0.delay_budget_ms}",
        f"--nonGbrBudgetMs={s1.delay_budget_ms}",
        f"--packetSize={s0.packet_bytes}",
        f"--onMean={s0.mean_on_s}",
        f"--offMean={s0.mean_off_s}",
        f"--txPower={cell.tx_power_dbm}",
        f"--noiseFigure={cell.noise_figure_db}",
        f"--bsHeight={cell.bs_height_m}",
        f"--utHeight={cell.ue_height_m}",
        f"--minDistance={cell.min_distance_m}",
        f"--cellRadius={cell.max_distance_m}",
        f"--sectorDeg={2 * cell.sector_half_width_deg}",
        f"--antennaPeakGain={cell.antenna_max_gain_db}",
        f"--rlcBuffer={scenario.buffer_bytes}",
        f"--onOffStart={scenario.onoff_start}",
        f"--stepMs={scenario.ttis_per_step}",
        f"--steps={scenario.episode_steps}",
    ]


def _trace_files(scenario) -> list[list[Path]]:
    """Write (once) every slice's fading traces in ns-3's format; [slice][trace] -> path."""
    from sfjax.envs.fading import prb_gain_traces, write_ns3_fad

    out = []
    for sl in scenario.slices:
        fading = sl.fading
        if not fading.enabled:
            out.append([])
            continue
        key = repr((fading, scenario.cell.carrier_hz, scenario.cell.n_prb)).encode()
        stem = f"{fading.profile}_{hashlib.sha256(key).hexdigest()[:16]}"
        paths = [build.build_dir() / "traces" / f"{stem}_{n}.fad" for n in range(fading.n_traces)]
        if not all(p.exists() for p in paths):
            gains_NLP = prb_gain_traces(fading, scenario.cell.carrier_hz, scenario.cell.n_prb)
            for path, gains_LP in zip(paths, gains_NLP, strict=True):
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                write_ns3_fad(tmp, gains_LP)
                os.replace(tmp, path)
        out.append(paths)
    return out


def _fading_args(scenario, mode: str, seed: int, work: Path) -> list[str]:
    """Scenario arguments for the fading mode (see ``Ns3Config.fading``)."""
    if mode == "none":
        return []
    if mode not in ("per_ue", "shared_trace"):
        raise ValueError(f"fading must be 'per_ue', 'shared_trace' or 'none', not {mode!r}")
    files = _trace_files(scenario)
    lengths = {sl.fading.duration_ms for sl in scenario.slices if sl.fading.enabled}
    if not lengths:
        return []
    if mode == "shared_trace":
        ctrl = scenario.controlled_slice
        if not files[ctrl]:
            return []
        length = scenario.slices[ctrl].fading.duration_ms
        return [f"--fadingTrace={files[ctrl][0]}", f"--fadingTraceLength={length / 1000}",
                f"--fadingSamples={length}"]
    if len(lengths) != 1 or any(not f for f in files):
        raise ValueError("per_ue fading needs every slice's fading enabled with one duration_ms")
    (length,) = lengths
    rng = np.random.default_rng([seed, 0x5FA])
    flat = [p for paths in files for p in paths]
    first = np.cumsum([0] + [len(p) for p in files])[:-1]
    lines = [f"{len(flat)} {length} {scenario.cell.n_prb}", *map(str, flat)]
    for s, sl in enumerate(scenario.slices):  # the scenario's UE order: slice 0 first
        for _ in range(sl.n_ues):
            trace = first[s] + rng.integers(len(files[s]))
            lines.append(f"{trace} {rng.integers(length)}")
    spec = work / "fading.txt"
    spec.write_text("\n".join(lines) + "\n")
    return [f"--fadingSpec={spec}"]


def _drop_rows(scenario, seed: int):
    """The JAX env's drop in the scenario's UE order (slice 0 first): the fixed one from
    ``geometry_seed``, or with ``randomize_drop`` a fresh one from the reset seed."""
    import jax

    from sfjax.envs import channel

    d2d, az, los, sf = (np.asarray(x) for x in jax.device_get(
        channel.sample_drop(
            jax.random.key(seed if scenario.randomize_drop else scenario.geometry_seed),
            scenario.n_ues, scenario.cell,
        )
    ))
    n_ctrl = scenario.ordered_slices[0].n_ues
    order = np.arange(scenario.n_ues)
    if scenario.controlled_slice == 1:  # JAX orders UEs controlled-slice first
        order = np.concatenate([np.arange(n_ctrl, scenario.n_ues), np.arange(n_ctrl)])
    rad = np.radians(az)
    return (d2d * np.cos(rad))[order], (d2d * np.sin(rad))[order], los[order], sf[order]


def _stop_process(proc: subprocess.Popen | None, bridge: Ns3GymBridge | None, workdir) -> None:
    """Stop ns-3 (politely first when it waits for us), close the socket, remove temp files."""
    try:
        if bridge is not None:
            if proc is not None and proc.poll() is None and bridge.awaiting_reply:
                try:
                    bridge.send_stop()
                    proc.wait(timeout=2.0)
                except Exception:  # noqa: BLE001 - best effort; we kill below anyway
                    pass
            bridge.close()
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=3.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=3.0)
        if workdir is not None:
            workdir.cleanup()


def _process_error(holder: dict) -> str | None:
    """Bridge watchdog: the exit code and log tail of a dead scenario, else None.

    Holds no reference to the env, so the env can still be garbage-collected.
    """
    proc = holder.get("proc")
    if proc is None or proc.poll() is None:
        return None
    try:
        text = Path(holder["log"]).read_text(errors="replace")
        log = "\n".join(text.strip().splitlines()[-20:])
    except OSError:
        log = ""
    return f"The ns-3 scenario exited with code {proc.returncode}:\n{log}"


_SIGTERM_INSTALLED = False


def _install_sigterm_handler() -> None:
    """Turn SIGTERM into SystemExit so finalizers (and so ns-3 shutdown) run."""
    global _SIGTERM_INSTALLED
    if _SIGTERM_INSTALLED or threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _exit_on_signal)
    _SIGTERM_INSTALLED = True


def _exit_on_signal(signum, frame) -> None:
    raise SystemExit(128 + signum)


class Ns3RanSlicingEnv(gym.Env):
    """gymnasium-style env backed by an ns-3 process (see the module docstring).

    ``reset(seed=...) -> (obs, info)``; ``step(action) -> (obs, reward, terminated, truncated,
    info)``; ``close()``. The episode ends with ``truncated=True`` after
    ``scenario.episode_steps`` decisions. Each reset starts a fresh ns-3 run (run number
    ``seed + 1``).
    """

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(self, config: Ns3Config | None = None):
        self.config = config if config is not None else Ns3Config()
        self.scenario = _scenario_config(self.config.scenario)
        sc = self.scenario
        self._min_rbg = sc.min_rbg_per_slice
        self._prbs_A = np.asarray(sc.prbs_per_action)
        self.action_space = gym.spaces.Discrete(sc.num_actions)
        # the JAX env's bounds (RanSlicingEnv.observation_space)
        dim = 9 if sc.observe_other_slice else 5
        low, high = np.zeros(dim, np.float32), np.ones(dim, np.float32)
        low[3], high[2] = -1.0, 2.0  # packets quantise a step's arrival rate: > peak is possible
        if sc.observe_other_slice:
            low[7], high[6] = -1.0, 2.0
        self.observation_space = gym.spaces.Box(low, high, (dim,), np.float32)
        ctrl, other = sc.ordered_slices
        self._peak_rate_S = np.asarray([ctrl.peak_rate_bps, other.peak_rate_bps], np.float64)
        self._slice_buffer_S = np.asarray(
            [ctrl.n_ues * sc.buffer_bytes, other.n_ues * sc.buffer_bytes], np.float64
        )
        self._args = scenario_args(sc)  # validates early
        if getattr(sc, "se_definition", "allocated") != "allocated":
            warnings.warn(
                "ns-3 reports eq. 1's SE (delivered bits / allocated bandwidth) as info['se'], "
                f"not the JAX env's se_definition={sc.se_definition!r}; "
                "use se_definition='allocated' to compare the two.", stacklevel=2,
            )
        if self.config.fading not in ("per_ue", "shared_trace", "none"):
            raise ValueError(
                f"Ns3Config.fading must be 'per_ue', 'shared_trace' or 'none', "
                f"not {self.config.fading!r}"
            )
        self._proc: subprocess.Popen | None = None
        self._bridge: Ns3GymBridge | None = None
        self._workdir: tempfile.TemporaryDirectory | None = None
        self._finalizer: weakref.finalize | None = None
        self._steps = 0
        self._done = True
        self.decision_wall_s: list[float] = []
        """Wall time of every decision of the current episode (ns-3 simulating 100 ms)."""
        _install_sigterm_handler()

    # ------------------------------------------------------------------ process lifetime
    def _binary(self) -> Path:
        if self.config.binary is not None:
            path = Path(self.config.binary)
            if not path.is_file():
                raise Ns3Error(f"ns-3 scenario binary {path} does not exist.")
            return path
        return build.ensure_built()

    def _launch(self, seed: int) -> None:
        self._shutdown()
        binary = self._binary()
        self._workdir = tempfile.TemporaryDirectory(prefix="sfjax-ns3-")
        work = Path(self._workdir.name)
        w = self.config.weights
        args = [str(binary), *self._args, f"--simSeed={seed + 1}",
                f"--agentTimeout={self.config.agent_timeout_s}", f"--alpha={w.se_weight}",
                f"--offset={w.se_offset}", f"--beta={w.reconfig_penalty}",
                f"--gamma={w.violation_penalty}"]
        if self.config.jax_drop:
            drop_path = work / "drop.txt"
            build.write_drop_file(drop_path, *_drop_rows(self.scenario, seed))
            args.append(f"--dropFile={drop_path}")
        args += _fading_args(self.scenario, self.config.fading, seed, work)
        args += list(self.config.extra_args)
        holder: dict = {"proc": None, "log": work / "ns3.log"}
        self._bridge = Ns3GymBridge(watchdog=functools.partial(_process_error, holder))
        args.append(f"--openGymPort={self._bridge.port}")
        log = open(work / "ns3.log", "wb")
        try:
            self._proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=work
            )
        finally:
            log.close()
        holder["proc"] = self._proc
        self._finalizer = weakref.finalize(
            self, _stop_process, self._proc, self._bridge, self._workdir
        )
        init = self._bridge.initialize(self.config.startup_timeout_s)
        n = getattr(init.action_space, "n", None)
        if n is None or n - 1 < self._min_rbg:
            raise Ns3Error(f"The scenario offers {init.action_space} RBG counts; expected more.")
        self._n_rbg_ns3 = int(n) - 1

    def _shutdown(self) -> None:
        if self._finalizer is not None:
            self._finalizer()  # idempotent; runs _stop_process once
        self._finalizer = None
        self._proc = None
        self._bridge = None
        self._workdir = None

    def close(self) -> None:
        """Stop the ns-3 process (idempotent)."""
        self._shutdown()
        self._done = True

    def __enter__(self) -> Ns3RanSlicingEnv:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def pid(self) -> int | None:
        """Process id of the running ns-3 scenario (None when none runs)."""
        return None if self._proc is None else self._proc.pid

    # ------------------------------------------------------------------------ gym API
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """Start a new ns-3 run and return its state before the first decision."""
        super().reset(seed=seed)
        if seed is None:
            seed = int(self.np_random.integers(0, 2**31 - 2))
        try:
            self._launch(int(seed))
            state = self._bridge.receive_state(self.config.step_timeout_s)
        except BaseException:
            self.close()
            raise
        self._steps = 0
        self._done = False
        self.decision_wall_s = []
        info = self._info(state)
        return self._obs(info), info

    def step(self, action):
        """Apply ``action`` for one decision interval and return its feedback."""
        if self._done or self._bridge is None:
            raise RuntimeError("Call reset() before step() (the episode is over or not started).")
        if not self.action_space.contains(int(action)) or int(action) != action:
            raise ValueError(f"action must be an integer in [0, {self.action_space.n}), got {action!r}")
        rbg = min(int(action) + self._min_rbg, self._n_rbg_ns3)
        t0 = time.perf_counter()
        try:
            self._bridge.send_action(rbg)
            state = self._bridge.receive_state(self.config.step_timeout_s)
        except BaseException:
            self.close()
            raise
        self.decision_wall_s.append(time.perf_counter() - t0)
        self._steps += 1
        info = self._info(state)
        reward = self.utility(info)
        info["utility"] = reward
        truncated = bool(state.game_over) or self._steps >= self.scenario.episode_steps
        if truncated:
            self.close()  # ns-3 is waiting for the stop reply; close() sends it
        return self._obs(info), reward, False, truncated, info

    # ---------------------------------------------------------------------- feedback
    def utility(self, info: dict[str, float]) -> float:
        """eq. 15 per step (``sfjax.metrics.step_utility``): the controlled slice's SE, and
        eq. 2 over the packets ``violation_scope`` names (the cell by default)."""
        return float(
            step_utility(info["se"], info["reconfiguration"], info["violation"],
                         self.config.weights)
        )

    def _info(self, state) -> dict[str, float]:
        try:
            raw = json.loads(state.info)
        except json.JSONDecodeError as err:
            raise Ns3Error(f"The scenario sent an unreadable info string: {state.info!r}") from err
        info: dict[str, float] = {}
        for prefix in ("", "other_"):
            for key in _FEEDBACK:
                info[prefix + key] = float(raw[prefix + key])
            info[prefix + "se_allocated"] = info[prefix + "se"]  # eq. 1 is all ns-3 reports
            info[prefix + "prbs"] = int(raw[prefix + "prbs"])
            info[prefix + "delivered_bits"] = 8.0 * float(raw[prefix + "delivered_bytes"])
            info[prefix + "mean_delay_ms"] = float(raw[prefix + "mean_delay_ms"])
            info[prefix + "max_delay_ms"] = float(raw[prefix + "max_delay_ms"])
            info[prefix + "queued_bytes"] = float(raw[prefix + "queued_bytes"])
            for key in ("delivered_packets", "dropped_packets", "late_packets",
                        # ns-3 only: DL transport blocks, decoding failures, HARQ retx
                        "tbs", "tb_errors", "harq_retx"):
                info[prefix + key] = int(raw[prefix + key])
        info["slice_violation"] = bool(info["violation"])
        info["other_violation"] = bool(info["other_violation"])
        # eq. 2 under the scenario's violation_scope, as the JAX env's info["violation"]
        info["violation"] = info["slice_violation"] or (
            self.scenario.violation_scope == "cell" and info["other_violation"]
        )
        info["reconfiguration"] = bool(info["reconfiguration"])
        info["other_reconfiguration"] = bool(info["other_reconfiguration"])
        info["ns3_reward"] = float(state.reward)
        info["sim_time_s"] = float(raw["sim_time_s"])
        info["step"] = int(raw["step"])
        info["attached_ues"] = int(raw.get("attached_ues", -1))
        return info

    def _obs(self, info: dict[str, float]) -> np.ndarray:
        """The JAX env's scaled eq. 14 observation (``RanSlicingEnv.get_obs``)."""
        from sfjax.envs.channel import CQI_EFFICIENCY_K

        sc = self.scenario
        scale_S = self._peak_rate_S * sc.step_s / 8.0

        def feats(s: int, prefix: str) -> list[float]:
            return [
                info[prefix + "se"] / float(CQI_EFFICIENCY_K[-1]),
                info[prefix + "arrival_rate_bps"] / self._peak_rate_S[s],
                float(np.clip(info[prefix + "queue_delta_bytes"] / self._slice_buffer_S[s], -1, 1)),
                float(np.clip(info[prefix + "dropped_bytes"] / scale_S[s], 0, 1)),
            ]

        parts = [info["prbs"] / sc.cell.n_prb] + feats(0, "")
        if sc.observe_other_slice:
            parts += feats(1, "other_")
        return np.asarray(parts, np.float32)

    def prbs_for_action(self, action: int) -> int:
        """PRBs the controlled slice gets for an action (same table as the JAX env)."""
        return int(self._prbs_A[action])
