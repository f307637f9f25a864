"""Environments: the pure-JAX RAN slicing simulator (``ran``) and the ns-3 bridge (``ns3``).

Nothing heavy is imported here: ``from sfjax.envs.ran import RanSlicingEnv`` for the JAX env,
``sfjax.envs.ns3`` for the ns-3 bridge, ``sfjax.envs.gymnasium_env`` for the gymnasium wrapper.
"""
