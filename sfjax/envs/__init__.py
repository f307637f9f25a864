"""Environments: the pure-JAX RAN slicing simulator (``ran``) and the ns-3 bridge (``ns3``).

Nothing heavy is imported here: ``from sfjax.envs.ran import RanSlicingEnv`` for the JAX env
(its parts: ``scenario`` config, ``state`` params/state/observation, ``decision`` TTI scan and
feedback; radio in ``channel``/``fading``, ``traffic``, ``buffers``, ``scheduler``;
``calibration`` the static-allocation sweep), ``sfjax.envs.ns3`` for the ns-3 bridge,
``sfjax.envs.gymnasium_env`` for the gymnasium wrapper.
"""
