"""ns3-gym protobuf messages, built at import time without code generation.

ns3-gym (tkn-tub/ns3-gym, ``model/messages.proto``) talks protobuf-over-ZMQ between an ns-3
process and a Python agent. We speak the same wire format with our own description of it:
``ns3/messages.proto`` in this repository declares the same package (``ns3opengym``), message,
enum and field names and numbers, and this module builds the identical ``FileDescriptorProto``
by hand with ``descriptor_pb2`` and turns it into message classes with ``message_factory``.
That keeps the Python side independent of the ``protoc`` version installed on the machine
(a ``_pb2.py`` file is tied to the protobuf runtime that generated it), while the C++ side of
our scenario is generated from the ``.proto`` by the system ``protoc`` at build time. A test
compares this descriptor with ``protoc --descriptor_set_out`` of the ``.proto`` file.

The descriptor lives in a private pool, so importing ns3-gym's own ``messages_pb2`` in the
same process does not clash with it; type URLs inside ``Any`` are the ordinary
``type.googleapis.com/ns3opengym.<Message>`` strings either way.

Message flow (one episode)::

    ns-3 (ZMQ REQ, connects)            Python (ZMQ REP, binds 127.0.0.1)
    SimInitMsg{obsSpace, actSpace} ---->
                                   <---- SimInitAck{done=true}
    EnvStateMsg{obs, reward, info} ---->       (first state: before any action)
                                   <---- EnvActMsg{actData}
    ... one EnvStateMsg / EnvActMsg pair per step ...
    EnvStateMsg{isGameOver=true}  ---->
                                   <---- EnvActMsg{stopSimReq=true}
"""

from __future__ import annotations

from google.protobuf import any_pb2, descriptor_pb2, descriptor_pool, message_factory

PACKAGE = "ns3opengym"
PROTO_FILE = "messages.proto"

_F = descriptor_pb2.FieldDescriptorProto
_OPTIONAL = _F.LABEL_OPTIONAL
_REPEATED = _F.LABEL_REPEATED

# (name, [(field name, number, label, type, type_name or None)]) in .proto order.
_ENUMS: list[tuple[str, list[tuple[str, int]]]] = [
    (
        "MsgType",
        [
            ("Unknown", 0),
            ("Init", 1),
            ("ActionSpace", 2),
            ("ObservationSpace", 3),
            ("IsGameOver", 4),
            ("Observation", 5),
            ("Reward", 6),
            ("ExtraInfo", 7),
            ("Action", 8),
            ("StopEnv", 9),
        ],
    ),
    ("SpaceType", [("NoSpaceType", 0), ("Discrete", 1), ("Box", 2), ("Tuple", 3), ("Dict", 4)]),
    ("Dtype", [("NoDType", 0), ("INT", 1), ("UINT", 2), ("FLOAT", 3), ("DOUBLE", 4)]),
]

_ANY = ".google.protobuf.Any"


def _p(name: str) -> str:
    return f".{PACKAGE}.{name}"


_MESSAGES: list[tuple[str, list[tuple[str, int, int, int, str | None]]]] = [
    (
        "SpaceDescription",
        [
            ("type", 1, _OPTIONAL, _F.TYPE_ENUM, _p("SpaceType")),
            ("space", 2, _OPTIONAL, _F.TYPE_MESSAGE, _ANY),
            ("name", 3, _OPTIONAL, _F.TYPE_STRING, None),
        ],
    ),
    ("DiscreteSpace", [("n", 1, _OPTIONAL, _F.TYPE_INT32, None)]),
    (
        "BoxSpace",
        [
            ("low", 1, _OPTIONAL, _F.TYPE_FLOAT, None),
            ("high", 2, _OPTIONAL, _F.TYPE_FLOAT, None),
            ("dtype", 3, _OPTIONAL, _F.TYPE_ENUM, _p("Dtype")),
            ("shape", 4, _REPEATED, _F.TYPE_UINT32, None),
        ],
    ),
    ("TupleSpace", [("element", 1, _REPEATED, _F.TYPE_MESSAGE, _p("SpaceDescription"))]),
    ("DictSpace", [("element", 1, _REPEATED, _F.TYPE_MESSAGE, _p("SpaceDescription"))]),
    (
        "DataContainer",
        [
            ("type", 1, _OPTIONAL, _F.TYPE_ENUM, _p("SpaceType")),
            ("data", 2, _OPTIONAL, _F.TYPE_MESSAGE, _ANY),
            ("name", 3, _OPTIONAL, _F.TYPE_STRING, None),
        ],
    ),
    ("DiscreteDataContainer", [("data", 1, _OPTIONAL, _F.TYPE_INT32, None)]),
    (
        "BoxDataContainer",
        [
            ("dtype", 1, _OPTIONAL, _F.TYPE_ENUM, _p("Dtype")),
            ("shape", 2, _REPEATED, _F.TYPE_UINT32, None),
            ("intData", 3, _REPEATED, _F.TYPE_INT32, None),
            ("uintData", 4, _REPEATED, _F.TYPE_UINT32, None),
            ("floatData", 5, _REPEATED, _F.TYPE_FLOAT, None),
            ("doubleData", 6, _REPEATED, _F.TYPE_DOUBLE, None),
        ],
    ),
    ("TupleDataContainer", [("element", 1, _REPEATED, _F.TYPE_MESSAGE, _p("DataContainer"))]),
    ("DictDataContainer", [("element", 1, _REPEATED, _F.TYPE_MESSAGE, _p("DataContainer"))]),
    (
        "SimInitMsg",
        [
            ("simProcessId", 1, _OPTIONAL, _F.TYPE_UINT64, None),
            ("wafShellProcessId", 2, _OPTIONAL, _F.TYPE_UINT64, None),
            ("obsSpace", 3, _OPTIONAL, _F.TYPE_MESSAGE, _p("SpaceDescription")),
            ("actSpace", 4, _OPTIONAL, _F.TYPE_MESSAGE, _p("SpaceDescription")),
        ],
    ),
    (
        "SimInitAck",
        [
            ("done", 1, _OPTIONAL, _F.TYPE_BOOL, None),
            ("stopSimReq", 2, _OPTIONAL, _F.TYPE_BOOL, None),
        ],
    ),
    (
        "EnvStateMsg",
        [
            ("obsData", 1, _OPTIONAL, _F.TYPE_MESSAGE, _p("DataContainer")),
            ("reward", 2, _OPTIONAL, _F.TYPE_FLOAT, None),
            ("isGameOver", 3, _OPTIONAL, _F.TYPE_BOOL, None),
            ("reason", 4, _OPTIONAL, _F.TYPE_ENUM, _p("EnvStateMsg.Reason")),
            ("info", 5, _OPTIONAL, _F.TYPE_STRING, None),
        ],
    ),
    (
        "EnvActMsg",
        [
            ("actData", 1, _OPTIONAL, _F.TYPE_MESSAGE, _p("DataContainer")),
            ("stopSimReq", 2, _OPTIONAL, _F.TYPE_BOOL, None),
            ("pyRecvEnvCpuCycle", 3, _OPTIONAL, _F.TYPE_UINT64, None),
            ("pySendActCpuCycle", 4, _OPTIONAL, _F.TYPE_UINT64, None),
        ],
    ),
]

# Nested enum of EnvStateMsg.
_NESTED_ENUMS = {"EnvStateMsg": ("Reason", [("SimulationEnd", 0), ("GameOver", 1)])}


def file_descriptor_proto() -> descriptor_pb2.FileDescriptorProto:
    """The ``FileDescriptorProto`` of ``ns3/messages.proto`` (what ``protoc`` would emit)."""
    fdp = descriptor_pb2.FileDescriptorProto(
        name=PROTO_FILE,
        package=PACKAGE,
        syntax="proto3",
        dependency=["google/protobuf/any.proto"],
    )
    for enum_name, values in _ENUMS:
        enum = fdp.enum_type.add(name=enum_name)
        for value_name, number in values:
            enum.value.add(name=value_name, number=number)
    for msg_name, fields in _MESSAGES:
        msg = fdp.message_type.add(name=msg_name)
        for field_name, number, label, ftype, type_name in fields:
            field = msg.field.add(
                name=field_name, number=number, label=label, type=ftype, json_name=field_name
            )
            if type_name is not None:
                field.type_name = type_name
        if msg_name in _NESTED_ENUMS:
            enum_name, values = _NESTED_ENUMS[msg_name]
            enum = msg.enum_type.add(name=enum_name)
            for value_name, number in values:
                enum.value.add(name=value_name, number=number)
    return fdp


def _build_pool() -> descriptor_pool.DescriptorPool:
    pool = descriptor_pool.DescriptorPool()
    any_fdp = descriptor_pb2.FileDescriptorProto()
    any_pb2.DESCRIPTOR.CopyToProto(any_fdp)
    pool.Add(any_fdp)
    pool.Add(file_descriptor_proto())
    return pool


POOL = _build_pool()
FILE_DESCRIPTOR = POOL.FindFileByName(PROTO_FILE)


def _cls(name: str):
    return message_factory.GetMessageClass(POOL.FindMessageTypeByName(f"{PACKAGE}.{name}"))


SpaceDescription = _cls("SpaceDescription")
DiscreteSpace = _cls("DiscreteSpace")
BoxSpace = _cls("BoxSpace")
TupleSpace = _cls("TupleSpace")
DictSpace = _cls("DictSpace")
DataContainer = _cls("DataContainer")
DiscreteDataContainer = _cls("DiscreteDataContainer")
BoxDataContainer = _cls("BoxDataContainer")
TupleDataContainer = _cls("TupleDataContainer")
DictDataContainer = _cls("DictDataContainer")
SimInitMsg = _cls("SimInitMsg")
SimInitAck = _cls("SimInitAck")
EnvStateMsg = _cls("EnvStateMsg")
EnvActMsg = _cls("EnvActMsg")

# Enum values (plain ints, as the generated module would expose them).
NO_SPACE_TYPE, DISCRETE, BOX, TUPLE, DICT = 0, 1, 2, 3, 4
NO_DTYPE, INT, UINT, FLOAT, DOUBLE = 0, 1, 2, 3, 4
REASON_SIMULATION_END, REASON_GAME_OVER = 0, 1
