"""Validate the pure-JAX RAN slicing simulator against the ns-3 scenario, side by side.

Both environments are driven with the same allocation sequences (action indices, so the same
PRB count for the controlled slice) from the same configuration (``RanSlicingConfig``): the
same cell, the same fixed UE drop (positions, LOS state, shadowing from ``geometry_seed``),
the same fading-trace generator, the same traffic model and buffers. Per sequence and per
traffic setting the script reports, for each slice, the mean SE, violation rate, offered load
(arrival rate), delivered throughput, dropped bytes per step and mean packet delay, and the
wall time per decision of each simulator (ns-3: one 100 ms decision of the real LTE stack,
including the ZMQ round trip; JAX: one step of a jitted ``lax.scan`` rollout, compile
excluded) with their ratio.

Traffic settings: ``onoff`` is the paper's (Exp(15 s) on/off; the two simulators draw
different on/off realisations, so offered loads only agree statistically); ``full`` keeps
every flow on, which removes traffic randomness and isolates the radio/MAC differences.

Allocation sequences: ``staircase`` (each action held for an equal share of the episode,
low to high), ``random`` (a new uniformly random action every 10 decisions) and ``fixed``
(the middle action throughout).

``--static``: instead, every static allocation of the default scenario (the paper's on/off
traffic, UEs starting OFF as ns-3's OnOffApplication) for whole episodes in both simulators:
per allocation the controlled slice's eq. 1 SE, each slice's violation rate, the cell-wide
violation count (eq. 2 as scored) and the eq. 15 utility, and which static allocation each
simulator ranks best. JAX runs both schedulers (``pf_ns3`` and the default buffer-aware PF)
on ``--jax-seeds`` seeds; ns-3 on ``--seeds`` (its own on/off and fading realisations).
``--ns3-from FILE ...`` re-measures only the JAX side: ns-3's columns come from earlier
``--static --out`` files (pooled, one file per ns-3 seed as below), which must match this run's
allocations, episode length and ns-3 scenario (:func:`load_ns3`).

Usage (reproduces benchmarks/RESULTS.md)::

    .venv/bin/python benchmarks/ns3_vs_jax.py --steps 100 --seeds 2 --out runs/ns3_vs_jax.json
    .venv/bin/python benchmarks/ns3_vs_jax.py --static --steps 300 --seeds 2 --jax-seeds 32 \
        --out runs/ns3_static.json
    .venv/bin/python benchmarks/ns3_vs_jax.py --static --steps 300 --jax-seeds 16 \
        --ns3-from runs/ns3_static_0.json runs/ns3_static_1.json --out runs/ns3_static_jax.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from sfjax.envs.ns3 import Ns3Config, Ns3RanSlicingEnv, scenario_args
from sfjax.envs.ran import GBR_SLICE, NON_GBR_SLICE, RanSlicingConfig, RanSlicingEnv

METRICS = ("se", "slice_violation", "violation", "arrival_rate_bps", "delivered_bits", "dropped_bytes",
           "mean_delay_ms", "prbs", "se_allocated", "se_scheduled")


def scenario_for(traffic: str, steps: int) -> RanSlicingConfig:
    """The default scenario with ns-3 3.37's RBG set (12 RBGs of 2 PRB at 25 PRB), so both
    simulators give each slice the same PRBs for every action."""
    base = RanSlicingConfig()
    cell = dataclasses.replace(base.cell, rbg_count="ns3")
    if traffic == "full":
        on = {"mean_on_s": 1e4, "mean_off_s": 1e-3}
        slices = (dataclasses.replace(GBR_SLICE, **on), dataclasses.replace(NON_GBR_SLICE, **on))
        return RanSlicingConfig(cell=cell, slices=slices, episode_steps=steps)
    return RanSlicingConfig(cell=cell, episode_steps=steps)


def action_sequence(kind: str, num_actions: int, steps: int, seed: int) -> np.ndarray:
    if kind == "staircase":
        return np.minimum(np.arange(steps) * num_actions // steps, num_actions - 1)
    if kind == "random":
        rng = np.random.default_rng(1000 + seed)
        return np.repeat(rng.integers(0, num_actions, -(-steps // 10)), 10)[:steps]
    if kind == "fixed":
        return np.full(steps, (num_actions - 1) // 2)
    raise ValueError(f"unknown sequence {kind!r}")


def run_jax(cfg: RanSlicingConfig, actions_NT: np.ndarray, seeds: list[int]):
    """Roll out every (seed, sequence) with one jitted scan; per-step infos as numpy."""
    env = RanSlicingEnv(cfg)
    params = env.default_params

    def rollout(key, actions_T):
        key, k_reset = jax.random.split(key)
        _, state = env.reset(k_reset, params)

        def body(carry, action):
            key, state = carry
            key, sub = jax.random.split(key)
            _, state, _, _, info = env.step_env(sub, state, action, params)
            return (key, state), info

        return jax.lax.scan(body, (key, state), actions_T)[1]

    batched = jax.jit(jax.vmap(rollout))
    keys = jnp.stack([jax.random.key(s) for s in seeds])
    actions = jnp.asarray(actions_NT, jnp.int32)
    t0 = time.perf_counter()
    jax.block_until_ready(batched(keys, actions))
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    infos = jax.block_until_ready(batched(keys, actions))
    run_s = time.perf_counter() - t0
    infos = {k: np.asarray(v) for k, v in infos.items()}
    return infos, compile_s, run_s / actions_NT.size


def run_ns3(cfg: RanSlicingConfig, actions_T: np.ndarray, seed: int):
    with Ns3RanSlicingEnv(Ns3Config(scenario=cfg)) as env:
        env.reset(seed=seed)
        rows = []
        for a in actions_T:
            rows.append(env.step(int(a))[4])
        wall = list(env.decision_wall_s)
    infos = {k: np.asarray([r[k] for r in rows], np.float64) for k in rows[0]
             if isinstance(rows[0][k], (bool, int, float))}
    return infos, float(np.mean(wall))


def summarise(infos: dict[str, np.ndarray]) -> dict[str, float]:
    out = {}
    for prefix in ("", "other_"):
        for m in METRICS:
            if prefix + m not in infos:  # ns-3 reports eq. 1 as "se" only
                continue
            v = np.asarray(infos[prefix + m], np.float64)
            if m == "mean_delay_ms":  # average over steps that delivered something
                d = np.asarray(infos[prefix + "delivered_bits"], np.float64) > 0
                out[prefix + m] = float(v[d].mean()) if d.any() else float("nan")
            else:
                out[prefix + m] = float(v.mean())
    return out


def per_level(infos: dict[str, np.ndarray], actions_T: np.ndarray) -> dict[int, dict]:
    """Means per controlled-slice PRB level, skipping the first step after each change."""
    prbs_T = np.asarray(infos["prbs"])
    settled_T = np.concatenate([[False], actions_T[1:] == actions_T[:-1]])
    out = {}
    for level in np.unique(prbs_T):
        m = (prbs_T == level) & settled_T
        if m.any():
            out[int(level)] = {k: float(np.asarray(infos[k], np.float64)[m].mean()) for k in (
                "se", "slice_violation", "delivered_bits", "other_se", "other_violation",
                "other_delivered_bits", "other_prbs", "se_allocated", "other_se_allocated")
                if k in infos}
    return out


STATIC_KEYS = ("se_allocated", "slice_violation", "other_violation", "violation", "utility",
               "arrival_rate_bps", "other_arrival_rate_bps")


def static_config(steps: int) -> RanSlicingConfig:
    """The default scenario with ns-3's RBG set, ``steps`` decisions per episode."""
    return dataclasses.replace(
        RanSlicingConfig(episode_steps=steps),
        cell=dataclasses.replace(RanSlicingConfig().cell, rbg_count="ns3"),
    )


def ns3_scenario(cfg: RanSlicingConfig) -> dict:
    """What ns-3's side of ``--static`` depends on besides its seeds: the scenario's command
    line, the drop, the fading traces and the eq. 15 weights (stored with the results)."""
    ns3 = Ns3Config(scenario=cfg)
    return {"args": scenario_args(cfg), "geometry_seed": cfg.geometry_seed,
            "randomize_drop": cfg.randomize_drop, "jax_drop": ns3.jax_drop,
            "fading_mode": ns3.fading, "fading": repr([s.fading for s in cfg.slices]),
            "carrier_hz": cfg.cell.carrier_hz, "weights": dataclasses.asdict(ns3.weights)}


def load_ns3(paths: list[Path], cfg: RanSlicingConfig) -> dict:
    """ns-3's columns from earlier ``--static --out`` files (``--ns3-from``), pooled as equal
    numbers of episodes per file (mean; the std of cell violations pooled exactly). Raises
    ValueError unless every file has ``cfg``'s allocations, episode length and ns-3 scenario;
    files written before the scenario was recorded are checked on the first two only."""
    want = {"prbs": list(cfg.prbs_per_action), "steps": cfg.episode_steps,
            "ns3_scenario": json.loads(json.dumps(ns3_scenario(cfg)))}
    runs, seeds, unchecked = [], [], []
    for path in paths:
        res = json.loads(Path(path).read_text())
        if "ns3" not in res:
            raise ValueError(f"--ns3-from {path}: no ns-3 results (not a --static --out file)")
        if "ns3_scenario" not in res:
            unchecked.append(str(path))
            print(f"note: {path} records no ns-3 scenario (written before --ns3-from); "
                  "checked its prbs and steps only", flush=True)
        for key, value in want.items():
            got = res.get(key, value if key == "ns3_scenario" else None)
            if got != value:
                got, value = _differing(got, value)
                raise ValueError(f"--ns3-from {path}: ns-3 ran with {key} {got}, this run has "
                                 f"{value}; re-run ns-3 (drop --ns3-from)")
        seeds.append(res.get("ns3_seeds"))
        runs.append(res["ns3"])
    if len({len(s) for s in seeds if s is not None}) > 1:
        raise ValueError(f"--ns3-from: the files hold {[len(s) for s in seeds if s is not None]} ns-3 seeds; "
                         "pooling needs equal numbers")
    known = [s for ss in seeds if ss is not None for s in ss]
    if len(known) != len(set(known)):
        raise ValueError(f"--ns3-from: ns-3 seeds {known} repeat across the files")
    pooled = {k: np.mean([r[k] for r in runs], 0).tolist() for k in runs[0]}
    second = np.mean([np.square(r["cell_violations_std"]) + np.square(r["cell_violations"])
                      for r in runs], 0)
    pooled["cell_violations_std"] = np.sqrt(
        np.maximum(second - np.square(pooled["cell_violations"]), 0.0)).tolist()
    return {"ns3": pooled, "ns3_runs": runs, "ns3_from": [str(p) for p in paths],
            "ns3_seeds": known if None not in seeds else None, "ns3_scenario_unchecked": unchecked}


def _differing(got, want):
    """The parts of two JSON values that differ (for load_ns3's message)."""
    if isinstance(got, dict) and isinstance(want, dict):
        keys = [k for k in {**want, **got} if got.get(k) != want.get(k)]
        pairs = {k: _differing(got.get(k), want.get(k)) for k in keys}
        return {k: g for k, (g, _) in pairs.items()}, {k: w for k, (_, w) in pairs.items()}
    if isinstance(got, list) and isinstance(want, list) and len(got) == len(want):
        pairs = [(g, w) for g, w in zip(got, want, strict=True) if g != w]
        return [g for g, _ in pairs], [w for _, w in pairs]
    return got, want


def static_table(steps: int, ns3_seeds: list[int], jax_seeds: list[int],
                 ns3: dict | None = None) -> dict:
    """Every static allocation in ns-3 and in JAX (both schedulers); per-episode means.
    ``ns3``: ns-3's columns already measured (:func:`load_ns3`); only JAX runs."""
    cfg = static_config(steps)
    n_act = cfg.num_actions
    out = {"prbs": list(cfg.prbs_per_action), "steps": steps, "jax_seeds": jax_seeds,
           "ns3_scenario": ns3_scenario(cfg)}
    for sched in ("pf_ns3", "pf_buffer_aware"):
        acts = np.repeat(np.arange(n_act), len(jax_seeds))[:, None].repeat(steps, 1)
        seeds = [s for _ in range(n_act) for s in jax_seeds]
        infos, _, _ = run_jax(dataclasses.replace(cfg, scheduler=sched), acts, seeds)
        per = {k: np.asarray(infos["se_allocated" if k == "se" else k], np.float64)
               .reshape(n_act, len(jax_seeds), steps) for k in STATIC_KEYS}
        out["jax_" + sched] = _static_rows(per)
        print(f"jax {sched}: " + json.dumps(out["jax_" + sched]), flush=True)
    if ns3 is not None:
        return out | ns3
    rows = {k: [] for k in STATIC_KEYS}
    for a in range(n_act):
        eps = []
        for seed in ns3_seeds:
            infos, _ = run_ns3(cfg, np.full(steps, a), seed)
            infos["se_allocated"] = infos["se"]
            eps.append(infos)
        for k in STATIC_KEYS:
            rows[k].append([e[k] for e in eps])
        print(f"ns3 action {a} ({cfg.prbs_per_action[a]} PRB) done", flush=True)
    out["ns3"] = _static_rows({k: np.asarray(v, np.float64) for k, v in rows.items()})
    out["ns3_seeds"] = ns3_seeds
    return out


def _static_rows(per: dict[str, np.ndarray]) -> dict[str, list[float]]:
    """[A, E, T] per-step arrays -> per allocation: means over episodes (counts per episode)."""
    return {
        "se": per["se_allocated"].mean((1, 2)).tolist(),
        "ctrl_viol_rate": per["slice_violation"].mean((1, 2)).tolist(),
        "other_viol_rate": per["other_violation"].mean((1, 2)).tolist(),
        "cell_violations": per["violation"].sum(2).mean(1).tolist(),
        "cell_violations_std": per["violation"].sum(2).std(1).tolist(),
        "utility": per["utility"].sum(2).mean(1).tolist(),
        "offered_mbps": (per["arrival_rate_bps"].mean((1, 2)) / 1e6).tolist(),
        "other_offered_mbps": (per["other_arrival_rate_bps"].mean((1, 2)) / 1e6).tolist(),
    }


def print_static(res: dict) -> None:
    print("| PRB ctrl | SE eq. 1 ns-3 / pf_ns3 / BA | ctrl viol. rate ns-3 / pf_ns3 / BA "
          "| other viol. rate ns-3 / pf_ns3 / BA | cell violations per episode ns-3 / pf_ns3 / "
          "BA | utility ns-3 / pf_ns3 / BA |")
    print("|---|---|---|---|---|---|")
    n, p, b = res["ns3"], res["jax_pf_ns3"], res["jax_pf_buffer_aware"]
    for i, prb in enumerate(res["prbs"]):
        print(f"| {prb} | {n['se'][i]:.2f} / {p['se'][i]:.2f} / {b['se'][i]:.2f} "
              f"| {n['ctrl_viol_rate'][i]:.2f} / {p['ctrl_viol_rate'][i]:.2f} / "
              f"{b['ctrl_viol_rate'][i]:.2f} "
              f"| {n['other_viol_rate'][i]:.2f} / {p['other_viol_rate'][i]:.2f} / "
              f"{b['other_viol_rate'][i]:.2f} "
              f"| {n['cell_violations'][i]:.0f} / {p['cell_violations'][i]:.0f} / "
              f"{b['cell_violations'][i]:.0f} "
              f"| {n['utility'][i]:.0f} / {p['utility'][i]:.0f} / {b['utility'][i]:.0f} |")
    for name, r in (("ns-3", n), ("JAX pf_ns3", p), ("JAX buffer-aware", b)):
        best = int(np.argmax(r["utility"]))
        print(f"best static ({name}): {res['prbs'][best]} PRB, utility {r['utility'][best]:.0f}, "
              f"cell violations {r['cell_violations'][best]:.1f}; offered Mb/s ctrl "
              f"{np.mean(r['offered_mbps']):.2f}, other {np.mean(r['other_offered_mbps']):.2f}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=120, help="decisions per episode")
    ap.add_argument("--seeds", type=int, default=2, help="episodes per (traffic, sequence)")
    ap.add_argument("--traffic", nargs="+", default=["full", "onoff"])
    ap.add_argument("--sequences", nargs="+", default=["staircase", "random", "fixed"])
    ap.add_argument("--pipeline-ms", type=float, default=4.5,
                    help="pipeline delay of the third JAX variant (ns-3's measured floor)")
    ap.add_argument("--out", type=Path, default=None, help="write all numbers as JSON here")
    ap.add_argument("--static", action="store_true",
                    help="every static allocation in both simulators (see the docstring)")
    ap.add_argument("--jax-seeds", type=int, default=32, help="JAX episodes with --static")
    ap.add_argument("--seed-offset", type=int, default=0, help="first ns-3 seed with --static")
    ap.add_argument("--ns3-from", type=Path, nargs="+", default=None, metavar="FILE",
                    help="with --static: take ns-3's columns from these earlier --out files "
                         "(one per ns-3 seed) and run only JAX (--seeds, --seed-offset unused)")
    args = ap.parse_args(argv)
    if args.ns3_from is not None and not args.static:
        ap.error("--ns3-from needs --static")
    if args.static:
        ns3 = None
        if args.ns3_from is not None:
            try:
                ns3 = load_ns3(args.ns3_from, static_config(args.steps))
            except ValueError as e:
                ap.error(str(e))
        res = static_table(args.steps, list(range(args.seed_offset, args.seed_offset + args.seeds)),
                           list(range(args.jax_seeds)), ns3)
        if ns3 is not None:
            print(f"ns-3 columns from {', '.join(ns3['ns3_from'])} (not re-run)")
        print_static(res)
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(res, indent=1))
        return

    seeds = list(range(args.seeds))
    results = []
    for traffic in args.traffic:
        cfg = scenario_for(traffic, args.steps)
        for kind in args.sequences:
            actions_NT = np.stack(
                [action_sequence(kind, cfg.num_actions, args.steps, s) for s in seeds]
            )
            # The JAX env with ns-3's scheduler semantics ("pf_ns3": PfFfMacScheduler
            # verbatim, which the ns-3 scenario runs), with its default buffer-aware PF, and
            # the default plus ns-3's delay floor (--pipeline-ms).
            variants = {
                "jax": dataclasses.replace(cfg, scheduler="pf_ns3"),
                "jax_buffer_aware": dataclasses.replace(cfg, scheduler="pf_buffer_aware"),
                "jax_pipeline": dataclasses.replace(
                    cfg, scheduler="pf_buffer_aware", pipeline_delay_ms=args.pipeline_ms
                ),
            }
            jax_out = {}
            for name, vcfg in variants.items():
                jax_out[name], compile_s, step_s = run_jax(vcfg, actions_NT, seeds)
                if name == "jax":
                    jax_compile_s, jax_step_s = compile_s, step_s
            rows = {name: [] for name in [*variants, "ns3"]}
            ns3_wall, levels = [], []
            for i, seed in enumerate(seeds):
                for name, infos in jax_out.items():
                    rows[name].append(summarise({k: v[i] for k, v in infos.items()}))
                ns3_infos, wall = run_ns3(cfg, actions_NT[i], seed)
                rows["ns3"].append(summarise(ns3_infos))
                ns3_wall.append(wall)
                levels.append({"jax": per_level({k: v[i] for k, v in jax_out["jax"].items()},
                                                actions_NT[i]),
                               "ns3": per_level(ns3_infos, actions_NT[i])})
            row = {"traffic": traffic, "sequence": kind}
            for name, rs in rows.items():
                row[name] = {k: float(np.mean([r[k] for r in rs])) for k in rs[0]}
            row.update({"jax_step_s": jax_step_s, "jax_compile_s": jax_compile_s,
                        "ns3_step_s": float(np.mean(ns3_wall)), "per_level": levels})
            results.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "per_level"}), flush=True)

    print()
    print("JAX = pf_ns3 scheduler (ns-3 PfFfMacScheduler semantics); [JAX buffer-aware PF]; "
          f"{{buffer-aware + {args.pipeline_ms} ms pipeline}}. SE = eq. 1 (allocated) for both; "
          "the JAX env's scheduled-PRB SE (se_scheduled) in the last column.")
    print("| traffic | sequence | slice | SE eq. 1 JAX / ns-3 [BA] | viol. rate JAX / ns-3 [BA] {pipe} "
          "| offered Mb/s JAX / ns-3 | delivered Mb/s JAX / ns-3 [BA] "
          "| drops kB/step JAX / ns-3 [BA] | mean delay ms JAX / ns-3 [BA] {pipe} "
          "| SE scheduled [BA] |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        for name, p in (("controlled", ""), ("other", "other_")):
            j, n, b, q = r["jax"], r["ns3"], r["jax_buffer_aware"], r["jax_pipeline"]
            se = p + "se_allocated"
            v = p + "violation" if p else "slice_violation"
            print(
                f"| {r['traffic']} | {r['sequence']} | {name} "
                f"| {j[se]:.2f} / {n[p + 'se']:.2f} [{b[se]:.2f}] "
                f"| {j[v]:.2f} / {n[v]:.2f} [{b[v]:.2f}] {{{q[v]:.2f}}} "
                f"| {j[p + 'arrival_rate_bps'] / 1e6:.2f} / {n[p + 'arrival_rate_bps'] / 1e6:.2f} "
                f"| {j[p + 'delivered_bits'] / 1e5:.2f} / {n[p + 'delivered_bits'] / 1e5:.2f} "
                f"[{b[p + 'delivered_bits'] / 1e5:.2f}] "
                f"| {j[p + 'dropped_bytes'] / 1e3:.2f} / {n[p + 'dropped_bytes'] / 1e3:.2f} "
                f"[{b[p + 'dropped_bytes'] / 1e3:.2f}] "
                f"| {j[p + 'mean_delay_ms']:.1f} / {n[p + 'mean_delay_ms']:.1f} "
                f"[{b[p + 'mean_delay_ms']:.1f}] {{{q[p + 'mean_delay_ms']:.1f}}} "
                f"| {b[p + 'se_scheduled']:.2f} |"
            )
    for r in results:
        if r["sequence"] != "staircase":
            continue
        print()
        print(f"Per PRB level ({r['traffic']} traffic, staircase, seed 0, settled steps; "
              "JAX = pf_ns3; SE = eq. 1):")
        print("| PRB ctrl / other (jax; ns3) | SE ctrl jax / ns3 | viol. ctrl jax / ns3 "
              "| SE other jax / ns3 | viol. other jax / ns3 |")
        print("|---|---|---|---|---|")
        lv = r["per_level"][0]
        for level in sorted(set(lv["jax"]) & set(lv["ns3"])):
            j, n = lv["jax"][level], lv["ns3"][level]
            print(f"| {level} / {j['other_prbs']:.0f}; {n['other_prbs']:.0f} "
                  f"| {j['se_allocated']:.2f} / {n['se']:.2f} "
                  f"| {j['slice_violation']:.2f} / {n['slice_violation']:.2f} "
                  f"| {j['other_se_allocated']:.2f} / {n['other_se']:.2f} "
                  f"| {j['other_violation']:.2f} / {n['other_violation']:.2f} |")
    print()
    print("| traffic | sequence | JAX s/decision | ns-3 s/decision | ratio ns-3/JAX | JAX compile s |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['traffic']} | {r['sequence']} | {r['jax_step_s']:.2e} | {r['ns3_step_s']:.3f} "
              f"| {r['ns3_step_s'] / r['jax_step_s']:.0f} | {r['jax_compile_s']:.1f} |")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
