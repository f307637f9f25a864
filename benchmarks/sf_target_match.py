"""Did the fine-tuning teach the Actor what its Reflector asked, on the prompts it trained on?

    .venv/bin/python benchmarks/sf_target_match.py RUN_DIR [--samples 8] [--iteration 0]

For every step of SF iteration ``--iteration``'s trajectories (``RUN_DIR/trajectories`` and
``reflections``), ``--samples`` completions are drawn on that step's prompt from the Actor
before fine-tuning (LoRA off) and after it (the run's final ``adapter/``), with the same keys
and the *acting* sampling parameters (what the trajectories and the held-out evaluation use;
RfR's rollouts use their own). Per class of step it prints how often the sampled action is the
target (the Reflector's improved action on a suboptimal step, the action taken on an effective
one) and the mean sampled action, before and after. Set against
``python -m sfjax.agents.policy_profile RUN_DIR`` (the actions of the next collect, closed
loop), it separates what the fine-tuning changed on the labelled prompts from what the
closed loop made of it (the Actor's own allocation is part of its next prompt).

For runs of ``experiments/sf_ranslicing.py`` (any preset; its ``config.json`` is read back). On
a run of several SF iterations "after" is the final adapter. Measured results:
benchmarks/RESULTS.md, "What one SF iteration teaches".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "experiments"))

CLASSES = ("asked more", "asked less", "effective")


def step_targets(trajs, refls) -> list[tuple[str, int, str]]:
    """(prompt, target action, class) per labelled step of ``trajs`` (Trajectory objects) and
    their ``refls`` (Reflection objects); the requests are
    :func:`sfjax.agents.policy_profile.requested_changes`'s, and a suboptimal step that asks
    for the action it took is left out."""
    from sfjax.agents.policy_profile import requested_changes

    asked = requested_changes(trajs, refls)
    labels = {(r.env_index, lab.step): lab.label for r in refls for lab in r.labels}
    out = []
    for t in trajs:
        for st in t.steps:
            change = asked.get((t.env_index, st.t))
            if change is not None:
                out.append((st.prompt, st.action + change,
                            "asked more" if change > 0 else "asked less"))  # fmt: skip
            elif labels[(t.env_index, st.t)] != "suboptimal":
                out.append((st.prompt, st.action, "effective"))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--samples", type=int, default=8, help="completions per prompt (K)")
    p.add_argument("--iteration", type=int, default=0, help="SF iteration whose steps to use")
    p.add_argument("--seed", type=int, default=1234, help="sampling key (the same before/after)")
    p.add_argument("--batch", type=int, default=64, help="prompts per sampler call")
    a = p.parse_args(argv)
    run = a.run_dir
    for need in ("config.json", "summary.json", "adapter", f"trajectories/iter_{a.iteration}.json",
                 f"reflections/iter_{a.iteration}.json"):  # fmt: skip
        if not (run / need).exists():
            p.error(f"{run / need} is missing (a finished sf_ranslicing run dir is needed)")

    import cli_common
    import jax
    import numpy as np
    import sf_ranslicing as sf

    from sfjax.agents.actor import Actor
    from sfjax.agents.prompts import parse_output
    from sfjax.agents.trajectory import Reflection, load_json, load_trajectories
    from sfjax.baselines.llm_agent import prompt_config_for_env
    from sfjax.envs.ran import RanSlicingEnv
    from sfjax.models import qwen3
    from sfjax.models.lora import adapters_disabled, load_adapter
    from sfjax.sampling import Sampler
    from sfjax.tokenizer import load_tokenizer

    cfg = cli_common.with_values(sf.ExperimentConfig(), json.loads((run / "config.json").read_text()))
    ckpt = json.loads((run / "summary.json").read_text())["actor"]
    prompt_cfg = prompt_config_for_env(RanSlicingEnv(cfg.env), cfg.actor.prompt)
    model = qwen3.from_pretrained(ckpt, dtype=sf._dtype(cfg.model.dtype))
    load_adapter(model, run / "adapter")
    tokenizer = load_tokenizer(ckpt)
    actor = Actor(Sampler(model, tokenizer), tokenizer,
                  dataclasses.replace(cfg.actor, prompt=prompt_cfg))  # fmt: skip
    items = step_targets(
        load_trajectories(run / f"trajectories/iter_{a.iteration}.json"),
        [Reflection.from_json(d) for d in load_json(run / f"reflections/iter_{a.iteration}.json")],
    )
    prompts = [x[0] for x in items]
    key = jax.random.key(a.seed)
    k = a.samples

    def sampled_actions() -> list[list[int | None]]:
        out = []
        for i in range(0, len(prompts), a.batch):
            chunk = prompts[i : i + a.batch]
            for texts in actor.sample(chunk, k, jax.random.fold_in(key, i), acting=True):
                parsed = [parse_output(t, prompt_cfg) for t in texts]
                out.append([x.action if x.ok else None for x in parsed])
        return out

    with adapters_disabled(model):
        before = sampled_actions()
    after = sampled_actions()

    rows = defaultdict(lambda: {"n": 0, "match": [0, 0], "action": [[], []]})
    for (_, target, cls), *both in zip(items, before, after):
        row = rows[cls]
        row["n"] += 1
        for i, acts in enumerate(both):
            row["match"][i] += sum(x == target for x in acts)
            row["action"][i] += [x for x in acts if x is not None]
    print(f"{run}: SF iteration {a.iteration}'s {len(items)} labelled steps, K = {k} samples "
          f"each at the acting sampling parameters, before (LoRA off) / after (final adapter)")
    print(f"{'step class':12} {'steps':>6} {'target rate before':>19} {'after':>7} "
          f"{'mean action before':>19} {'after':>7}")
    for cls in CLASSES:
        if cls not in rows:
            continue
        r = rows[cls]
        rate = [m / (r["n"] * k) for m in r["match"]]
        mean = [float(np.mean(x)) if x else float("nan") for x in r["action"]]
        print(f"{cls:12} {r['n']:>6} {rate[0]:>19.3f} {rate[1]:>7.3f} {mean[0]:>19.2f} "
              f"{mean[1]:>7.2f}")


if __name__ == "__main__":
    main()
