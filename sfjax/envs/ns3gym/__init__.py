"""Our own implementation of the ns3-gym wire protocol (protobuf over ZMQ) and helpers.

``messages``: the protobuf messages (no codegen); ``spaces``: spaces and data containers to
gymnasium / numpy; ``bridge``: the agent end (ZMQ REP on loopback); ``build``: compiling ``ns3/ran_slicing.cc``.
The per-PRB fading traces for ns-3's TraceFadingLossModel are written by
:func:`sfjax.envs.fading.write_ns3_fad`.
"""
