"""Decisions per second of the JAX RAN slicing env for 1, 64 and 1024 parallel envs (CPU).

Each decision is a ``lax.scan`` over 100 TTIs for 24 UEs (the default scenario). The rollout
of ``steps`` decisions with random actions is one jitted function of a key, vmapped over the
envs (how rejax / purejaxrl drive it); compile time is reported separately. The reference is
real time: one decision simulates 100 ms, so ``x real time = decisions/s * 0.1``; decisions
per CPU-second (process time of all threads) is printed too, as it is robust to a shared CPU; when an ns-3
figure is given (``--ns3-ms-per-decision``, from the ns-3 issue's benchmark) the ratio to it
is printed too. ``--rejax`` also times a short rejax PPO run on the env.

    python benchmarks/bench_env.py [--envs 1 64 1024] [--scheduler pf_buffer_aware]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp

from sfjax.envs.ran import RanSlicingConfig, RanSlicingEnv


def make_rollout(env: RanSlicingEnv, n_envs: int, steps: int):
    params = env.default_params

    def one(key):
        k_reset, k_run = jax.random.split(key)
        _, state = env.reset(k_reset, params)

        def body(state, key):
            k_act, k_step = jax.random.split(key)
            action = jax.random.randint(k_act, (), 0, env.num_actions)
            _, state, reward, _, _, info = env.step(k_step, state, action, params)
            return state, (reward, info["se"])

        _, (reward, se) = jax.lax.scan(body, state, jax.random.split(k_run, steps))
        return reward.mean(), se.mean()

    return jax.jit(lambda key: jax.vmap(one)(jax.random.split(key, n_envs)))


def bench(env: RanSlicingEnv, n_envs: int, steps: int, repeats: int = 3) -> dict[str, float]:
    fn = make_rollout(env, n_envs, steps)
    t0 = time.perf_counter()
    jax.block_until_ready(fn(jax.random.key(0)))
    compile_s = time.perf_counter() - t0
    best, best_cpu = float("inf"), float("inf")
    for i in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn(jax.random.key(i + 1)))
        best = min(best, time.perf_counter() - t0)
        best_cpu = min(best_cpu, time.process_time() - c0)
    # CPU seconds (all threads) are robust to other processes sharing the machine
    return {"envs": n_envs, "steps": steps, "compile_s": compile_s,
            "decisions_per_s": n_envs * steps / best,
            "decisions_per_cpu_s": n_envs * steps / best_cpu}


def bench_rejax(env: RanSlicingEnv, timesteps: int = 8192) -> float:
    from rejax import PPO

    from sfjax.baselines.wrappers import RejaxEnv

    # rejax 0.1.3 unpacks gymnax 0.x's five-value step; the env speaks gymnax 1.0's six
    algo = PPO.create(env=RejaxEnv(env), env_params=env.default_params, num_envs=16, num_steps=64,
                      num_epochs=2, num_minibatches=4, total_timesteps=timesteps,
                      eval_freq=timesteps, skip_initial_evaluation=True)
    train = jax.jit(algo.train)
    jax.block_until_ready(train(jax.random.PRNGKey(0)))
    t0 = time.perf_counter()
    _, (lengths, returns) = jax.block_until_ready(train(jax.random.PRNGKey(1)))
    dt = time.perf_counter() - t0
    print(f"rejax PPO: {timesteps} env steps + eval of 128 episodes in {dt:.2f} s, "
          f"eval return {float(jnp.mean(returns)):.1f}", flush=True)
    return dt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", type=int, nargs="+", default=[1, 64, 1024])
    parser.add_argument("--scheduler", default="pf_buffer_aware",
                        choices=["pf_buffer_aware", "pf_ns3"])
    parser.add_argument("--ns3-ms-per-decision", type=float, default=None)
    parser.add_argument("--rejax", action="store_true")
    args = parser.parse_args()
    env = RanSlicingEnv(dataclasses.replace(RanSlicingConfig(), scheduler=args.scheduler))
    print(f"devices: {jax.devices()}  scheduler: {args.scheduler}")
    print(f"{'envs':>6} {'steps':>6} {'compile s':>10} {'decisions/s':>12} {'x real time':>12}"
          f" {'decisions/cpu-s':>16}"
          + ("  vs ns-3" if args.ns3_ms_per_decision else ""))
    for n in args.envs:
        steps = max(4, min(64, 8192 // n))
        r = bench(env, n, steps)
        line = (f"{n:>6} {steps:>6} {r['compile_s']:>10.1f} {r['decisions_per_s']:>12.0f} "
                f"{r['decisions_per_s'] * 0.1:>12.1f} {r['decisions_per_cpu_s']:>16.0f}")
        if args.ns3_ms_per_decision:
            line += f"  {r['decisions_per_s'] * args.ns3_ms_per_decision / 1e3:>7.1f}x"
        print(line, flush=True)
    if args.rejax:
        bench_rejax(env)


if __name__ == "__main__":
    main()
