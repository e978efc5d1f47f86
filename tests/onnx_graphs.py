"""The smallest real ONNX models with the package contract's names (`image` → `probabilities`), for tests."""

from __future__ import annotations

from onnx import TensorProto, helper


def first_channel_sigmoid(channels: int = 2) -> bytes:
    """probabilities (1, 1, x, y, z) = sigmoid(image[:, 0]), any spatial size: for DWI+ADC, 'brighter than the
    head's mean DWI' after z-scoring."""
    nodes = [helper.make_node("Sigmoid", ["first"], ["probabilities"])]
    if channels == 1:
        nodes[0].input[0] = "image"
    else:
        nodes.insert(0, helper.make_node(
            "Split", ["image"], ["first", *(f"rest{c}" for c in range(1, channels))], axis=1, num_outputs=channels
        ))
    graph = helper.make_graph(
        nodes,
        "first-channel-sigmoid",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, channels, "x", "y", "z"])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [1, 1, "x", "y", "z"])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10).SerializeToString()
