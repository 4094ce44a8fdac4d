"""Facts about OpenVINO MatMul nodes with constant weights, shared by the OpenVINO graph passes."""

from __future__ import annotations

from typing import Any

import numpy as np


def kn_weight(mm: Any) -> np.ndarray:
    """The constant weight of a :func:`const_matmul` as (in features K, out features N)."""
    w: np.ndarray = mm.input_value(1).get_node().get_data()
    return w.T if mm.get_attributes().get("transpose_b") else w


def const_matmul(mm: Any) -> bool:
    """``mm`` multiplies its first input (not transposed) by a constant 2-D weight."""
    if mm.get_type_name() != "MatMul" or mm.get_attributes().get("transpose_a"):
        return False
    weights = mm.input_value(1).get_node()
    return weights.get_type_name() == "Constant" and len(weights.get_output_partial_shape(0)) == 2


def bias_add(mm: Any, width: int) -> tuple[Any, np.ndarray] | None:
    """``(add, constant)`` when ``mm``'s only consumer adds a constant with ``width`` values on the last axis.

    The constant comes back with the MatMul output's rank (leading 1s added).
    """
    users = list(mm.output(0).get_target_inputs())
    if len(users) != 1:
        return None
    add = users[0].get_node()
    if add.get_type_name() != "Add":
        return None
    other = add.input_value(1 - users[0].get_index()).get_node()
    if other.get_type_name() != "Constant" or any(t.get_node().get_type_name() == "Result"
                                                  for t in add.output(0).get_target_inputs()):
        return None
    bias = other.get_data()
    rank = len(mm.get_output_partial_shape(0))
    if bias.ndim > rank or bias.shape[-1:] != (width,):
        return None
    return add, bias.reshape((1,) * (rank - bias.ndim) + bias.shape)
