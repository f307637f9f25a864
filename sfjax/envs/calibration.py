"""Static-allocation sweep: how the default geometry was calibrated (paper section V-C range).

Runs every static action for a few episodes (vmapped) and prints, per PRB allocation of the
controlled slice, the Table III statistics of a 300-step trajectory: mean SE, PQoS violation
steps, reconfigurations (0 for a static policy) and the eq. 15 utility. The default cell radius
(``CellConfig.max_distance_m``) was chosen so that the best static allocation by utility lands
in the paper's SE range (about 5.2-5.7 bit/s/Hz); rerun with

    python -m sfjax.envs.calibration --episodes 8 [--max-distance-m 120]

Shape legend: A = actions, E = episodes, T = decisions.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from sfjax.envs.ran import RanSlicingConfig, RanSlicingEnv


def static_sweep(env: RanSlicingEnv, n_episodes: int = 4, n_steps: int | None = None,
                 seed: int = 0, params=None) -> dict[str, np.ndarray]:
    """Mean per-episode statistics of every static action; arrays over actions [A]."""
    params = params if params is not None else env.default_params
    n_steps = n_steps or env.config.episode_steps
    n_actions = env.num_actions

    def episode(key, action):
        k_reset, k_steps = jax.random.split(key)
        _, state = env.reset_env(k_reset, params)

        def body(state, key):
            _, state, reward, _, info = env.step_env(key, state, action, params)
            return state, (info["se"], info["violation"], info["reconfiguration"], reward,
                           info["other_violation"], info["late_packets"], info["link_se"],
                           info["utilization"])

        _, out = jax.lax.scan(body, state, jax.random.split(k_steps, n_steps))
        return out

    keys_E = jax.random.split(jax.random.key(seed), n_episodes)
    actions_A = jnp.arange(n_actions)
    run = jax.jit(jax.vmap(jax.vmap(episode, in_axes=(0, None)), in_axes=(None, 0)))
    se, vio, rec, rew, other_vio, late, link, util = jax.device_get(run(keys_E, actions_A))
    return {
        "prbs": np.asarray(env.config.prbs_per_action),
        "mean_se": se.mean(axis=(1, 2)),
        "violations": vio.sum(-1).mean(-1),
        "reconfigurations": rec.sum(-1).mean(-1),
        "utility": rew.sum(-1).mean(-1),
        "other_violations": other_vio.sum(-1).mean(-1),
        "late_packets": late.sum(-1).mean(-1),
        "link_se": link.mean(axis=(1, 2)),
        "utilization": util.mean(axis=(1, 2)),
    }


def format_sweep(sweep: dict[str, np.ndarray]) -> str:
    cols = ["prbs", "mean_se", "violations", "reconfigurations", "utility", "other_violations",
            "late_packets", "link_se", "utilization"]
    lines = [" ".join(f"{c[:12]:>12}" for c in cols)]
    for i in range(len(sweep["prbs"])):
        lines.append(" ".join(f"{float(sweep[c][i]):12.3f}" for c in cols))
    best = int(np.argmax(sweep["utility"]))
    lines.append(
        f"best static by utility: {int(sweep['prbs'][best])} PRB, mean SE "
        f"{sweep['mean_se'][best]:.3f}, link SE {sweep['link_se'][best]:.3f}, violations {sweep['violations'][best]:.1f}, "
        f"utility {sweep['utility'][best]:.1f}"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=4)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-distance-m", type=float, default=None)
    parser.add_argument("--randomize-drop", action="store_true")
    args = parser.parse_args()
    config = RanSlicingConfig(randomize_drop=args.randomize_drop)
    if args.max_distance_m is not None:
        config = dataclasses.replace(
            config, cell=dataclasses.replace(config.cell, max_distance_m=args.max_distance_m)
        )
    env = RanSlicingEnv(config)
    t0 = time.perf_counter()
    sweep = static_sweep(env, args.episodes, args.steps, args.seed)
    print(format_sweep(sweep))
    print(f"({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
