"""Conversions between ns3-gym protobuf spaces / data containers and gymnasium / numpy.

ns3-gym describes spaces with ``SpaceDescription`` (a ``SpaceType`` tag plus the concrete
``DiscreteSpace`` / ``BoxSpace`` / ``TupleSpace`` / ``DictSpace`` packed in an ``Any``) and
carries values in ``DataContainer`` (same tag, ``DiscreteDataContainer`` /
``BoxDataContainer`` / ... in an ``Any``). The conversions here follow ns3-gym's own Python
client and ns-3 module: a Box value travels flat in the repeated field that matches its
``Dtype`` (``intData``, ``uintData``, ``floatData`` or ``doubleData``) with its ``shape``
alongside; dict entries carry their key in ``name``.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from sfjax.envs.ns3gym import messages as pb

_DTYPE_TO_NP = {
    pb.INT: np.int32,
    pb.UINT: np.uint32,
    pb.FLOAT: np.float32,
    pb.DOUBLE: np.float64,
    pb.NO_DTYPE: np.float32,
}
_FIELD_OF_DTYPE = {
    pb.INT: "intData",
    pb.UINT: "uintData",
    pb.FLOAT: "floatData",
    pb.DOUBLE: "doubleData",
    pb.NO_DTYPE: "floatData",
}


def _pb_dtype(np_dtype: np.dtype) -> int:
    dt = np.dtype(np_dtype)
    if dt.kind == "i":
        return pb.INT
    if dt.kind == "u":
        return pb.UINT
    if dt == np.float64:
        return pb.DOUBLE
    if dt.kind in "fb":
        return pb.FLOAT
    raise ValueError(f"ns3-gym Box spaces carry int/uint/float/double values, not {dt}.")


def space_from_pb(desc) -> gym.Space:
    """``SpaceDescription`` -> gymnasium space (Discrete, Box, Tuple or Dict)."""
    if desc.type == pb.DISCRETE:
        msg = pb.DiscreteSpace()
        desc.space.Unpack(msg)
        return gym.spaces.Discrete(msg.n)
    if desc.type == pb.BOX:
        msg = pb.BoxSpace()
        desc.space.Unpack(msg)
        return gym.spaces.Box(
            low=msg.low, high=msg.high, shape=tuple(msg.shape), dtype=_DTYPE_TO_NP[msg.dtype]
        )
    if desc.type == pb.TUPLE:
        msg = pb.TupleSpace()
        desc.space.Unpack(msg)
        return gym.spaces.Tuple(tuple(space_from_pb(e) for e in msg.element))
    if desc.type == pb.DICT:
        msg = pb.DictSpace()
        desc.space.Unpack(msg)
        return gym.spaces.Dict({e.name: space_from_pb(e) for e in msg.element})
    raise ValueError(f"Unknown ns3-gym space type {desc.type}; the peer speaks another protocol.")


def space_to_pb(space: gym.Space, name: str = ""):
    """gymnasium space -> ``SpaceDescription``. A Box sends one scalar ``low``/``high``."""
    desc = pb.SpaceDescription(name=name)
    if isinstance(space, gym.spaces.Discrete):
        desc.type = pb.DISCRETE
        desc.space.Pack(pb.DiscreteSpace(n=int(space.n)))
    elif isinstance(space, gym.spaces.Box):
        desc.type = pb.BOX
        desc.space.Pack(
            pb.BoxSpace(
                low=float(np.min(space.low)),
                high=float(np.max(space.high)),
                dtype=_pb_dtype(space.dtype),
                shape=list(space.shape),
            )
        )
    elif isinstance(space, gym.spaces.Tuple):
        desc.type = pb.TUPLE
        desc.space.Pack(pb.TupleSpace(element=[space_to_pb(s) for s in space.spaces]))
    elif isinstance(space, gym.spaces.Dict):
        desc.type = pb.DICT
        desc.space.Pack(
            pb.DictSpace(element=[space_to_pb(s, name=k) for k, s in space.spaces.items()])
        )
    else:
        raise ValueError(f"ns3-gym has no wire form for {type(space).__name__} spaces.")
    return desc


def data_from_pb(container) -> Any:
    """``DataContainer`` -> int (Discrete), ndarray (Box, reshaped), tuple or dict."""
    if container.type == pb.DISCRETE:
        msg = pb.DiscreteDataContainer()
        container.data.Unpack(msg)
        return int(msg.data)
    if container.type == pb.BOX:
        msg = pb.BoxDataContainer()
        container.data.Unpack(msg)
        values = np.asarray(
            getattr(msg, _FIELD_OF_DTYPE[msg.dtype]), dtype=_DTYPE_TO_NP[msg.dtype]
        )
        shape = tuple(msg.shape)
        if shape and int(np.prod(shape)) == values.size:
            values = values.reshape(shape)
        return values
    if container.type == pb.TUPLE:
        msg = pb.TupleDataContainer()
        container.data.Unpack(msg)
        return tuple(data_from_pb(e) for e in msg.element)
    if container.type == pb.DICT:
        msg = pb.DictDataContainer()
        container.data.Unpack(msg)
        return {e.name: data_from_pb(e) for e in msg.element}
    if container.type == pb.NO_SPACE_TYPE:
        return None
    raise ValueError(f"Unknown ns3-gym data container type {container.type}.")


def data_to_pb(value: Any, space: gym.Space, name: str = ""):
    """A value of ``space`` -> ``DataContainer`` (what ns3-gym's client sends as an action)."""
    container = pb.DataContainer(name=name)
    if isinstance(space, gym.spaces.Discrete):
        arr = np.asarray(value)
        if arr.size != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"A Discrete action must be one integer, got {value!r}.")
        container.type = pb.DISCRETE
        container.data.Pack(pb.DiscreteDataContainer(data=int(arr.reshape(()))))
    elif isinstance(space, gym.spaces.Box):
        arr = np.asarray(value, dtype=space.dtype).reshape(-1)
        dtype = _pb_dtype(space.dtype)
        box = pb.BoxDataContainer(dtype=dtype, shape=list(space.shape) or [arr.size])
        getattr(box, _FIELD_OF_DTYPE[dtype]).extend(arr.tolist())
        container.type = pb.BOX
        container.data.Pack(box)
    elif isinstance(space, gym.spaces.Tuple):
        container.type = pb.TUPLE
        elements = [data_to_pb(v, s) for v, s in zip(value, space.spaces, strict=True)]
        container.data.Pack(pb.TupleDataContainer(element=elements))
    elif isinstance(space, gym.spaces.Dict):
        container.type = pb.DICT
        elements = [data_to_pb(value[k], s, name=k) for k, s in space.spaces.items()]
        container.data.Pack(pb.DictDataContainer(element=elements))
    else:
        raise ValueError(f"ns3-gym has no wire form for {type(space).__name__} spaces.")
    return container
