"""Wall time of each RL baseline (rejax DQN / PPO / SAC) for the paper's budget on this machine.

    python benchmarks/bench_rl.py                 # 2 measured rounds per algorithm, 1 seed
    python benchmarks/bench_rl.py --rounds 80     # the full budget, measured (slow on a CPU)

For each algorithm the seed-vmapped training program is compiled ahead of time (compile time
reported separately), then run for ``--rounds`` rounds of the paper's round size (20
trajectories x 300 decisions = 6 000 env samples); the full-budget time is
``compile + 80 x measured time per round`` (an extrapolation unless ``--rounds 80``; printed as
such). The reference, measured in the same run, is the environment alone: a jitted,
vmapped rollout of the same number of samples with uniformly random actions; the ratio
train / env-only says how much the learner adds on top of simulating the RAN.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp

from sfjax.baselines import rl
from sfjax.baselines.wrappers import RejaxEnv
from sfjax.envs.ran import RanSlicingEnv

PAPER = rl.Budget()


def env_only_seconds(env, params, budget: rl.Budget, seed: int = 0) -> float:
    """Time of ``budget.total_steps`` random-action env steps (20 envs in lock-step)."""
    wrapped = RejaxEnv(env)
    n_envs, steps = budget.trajectories_per_round, budget.rounds * budget.steps_per_trajectory
    params = rl.prepare_env_params(env, params, budget)

    def run(key):
        keys = jax.random.split(key, n_envs)
        _, state = jax.vmap(wrapped.reset, in_axes=(0, None))(keys, params)

        def step(state, key):
            k_act, k_env = jax.random.split(key)
            actions = jax.random.randint(k_act, (n_envs,), 0, env.num_actions)
            _, state, reward, _, _ = jax.vmap(wrapped.step, in_axes=(0, 0, 0, None))(
                jax.random.split(k_env, n_envs), state, actions, params
            )
            return state, reward.sum()

        return jax.lax.scan(step, state, jax.random.split(key, steps))[1].sum()

    compiled = jax.jit(run).lower(jax.random.key(seed)).compile()
    t0, c0 = time.perf_counter(), time.process_time()
    jax.block_until_ready(compiled(jax.random.key(seed)))
    return time.perf_counter() - t0, time.process_time() - c0


def train_seconds(name: str, env, params, budget: rl.Budget, seeds: int):
    """(compile s, run wall s, run CPU s) of one seed-vmapped training program."""
    cfg = {"dqn": rl.DQNConfig(), "ppo": rl.PPOConfig(), "sac": rl.SACConfig()}[name]
    algo = rl.make_algo(name, cfg, env, params, budget)
    keys = jnp.stack([jax.random.key(s) for s in range(seeds)])
    t0 = time.perf_counter()
    compiled = jax.jit(jax.vmap(algo.train)).lower(keys).compile()
    t1, c1 = time.perf_counter(), time.process_time()
    jax.block_until_ready(compiled(keys))
    return t1 - t0, time.perf_counter() - t1, time.process_time() - c1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=2, help="rounds actually run per algorithm")
    p.add_argument("--seeds", type=int, default=1, help="vmapped training seeds")
    p.add_argument("--algos", nargs="+", default=list(rl.ALGOS))
    p.add_argument("--json", default="", help="also write the results to this file")
    args = p.parse_args()

    env = RanSlicingEnv()
    params = env.default_params
    budget = rl.Budget(
        rounds=args.rounds,
        trajectories_per_round=PAPER.trajectories_per_round,
        steps_per_trajectory=PAPER.steps_per_trajectory,
    )
    env_s, env_cpu = env_only_seconds(env, params, budget)
    env_round = env_s / args.rounds
    print(
        f"{platform.processor() or platform.machine()}, {jax.device_count()} "
        f"{jax.devices()[0].platform} device(s); measured {args.rounds} round(s) of "
        f"{budget.steps_per_round} samples x {args.seeds} seed(s)"
    )
    print(
        f"env only (reference): {env_round:.2f} s/round wall, "
        f"{env_cpu / args.rounds:.2f} s/round CPU; load average {os.getloadavg()[0]:.1f}"
    )
    extrapolated = args.rounds != PAPER.rounds
    results = {
        "rounds_measured": args.rounds,
        "seeds": args.seeds,
        "env_s_per_round": env_round,
        "env_cpu_s_per_round": env_cpu / args.rounds,
    }
    header = (
        f"{'algo':>5} {'compile s':>10} {'s/round':>8} {'CPU s/round':>11} {'x env':>6} "
        f"{'full budget':>14}"
    )
    print(header)
    for name in args.algos:
        compile_s, run_s, cpu_s = train_seconds(name, env, params, budget, args.seeds)
        per_round = run_s / args.rounds
        full = compile_s + PAPER.rounds * per_round
        results[name] = {
            "compile_s": compile_s,
            "s_per_round": per_round,
            "cpu_s_per_round": cpu_s / args.rounds,
            "ratio_vs_env_only": per_round / env_round,
            "full_budget_s": full,
            "full_budget_is_extrapolated": extrapolated,
        }
        tag = " (extrapolated)" if extrapolated else ""
        print(
            f"{name:>5} {compile_s:>10.1f} {per_round:>8.2f} {cpu_s / args.rounds:>11.2f} "
            f"{per_round / env_round:>6.2f} "
            f"{full / 60:>10.1f} min{tag}"
        )
    print(
        f"full budget = compile + {PAPER.rounds} rounds x {PAPER.steps_per_round} samples "
        f"= {PAPER.total_steps:,} env samples per seed; {args.seeds} seed(s) vmapped"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
