"""The self-finetuning LLM agent (paper section IV) and the Reflexion baseline.

* :mod:`~sfjax.agents.prompts`    the Actor's prompt (task, eq. 14 state, last-k window) + parser
* :mod:`~sfjax.agents.actor`      the R-MDP Actor on the sampler (constrained action line)
* :mod:`~sfjax.agents.reflector`  Reflector backends: api (OpenAI-compatible), local, rule
* :mod:`~sfjax.agents.rfr`        Refine-from-Reflection datasets (Algorithm 2)
* :mod:`~sfjax.agents.finetune`   KTO on the Actor's LoRA weights, checkpointable
* :mod:`~sfjax.agents.loop`       Algorithm 1 with per-phase orbax checkpoints and resume
* :mod:`~sfjax.agents.loop_config` its config: SF iterations, envs, steps, seeds, checkpoints kept
* :mod:`~sfjax.agents.collect`    the collect phase: the Actor in parallel envs (protocols)
* :mod:`~sfjax.agents.env`        the JAX RAN env as the agents see it (RBG actions, feedback)
* :mod:`~sfjax.agents.trajectory` trajectories, labels, metrics, JSON persistence
"""
