"""Dynamic int8 quantisation of an exported graph (``onnxruntime.quantization``).

Weights are quantised offline (signed int8, one scale per output channel), activations at
run time per tensor (uint8): no calibration data. Only the ``MatMul`` nodes with a constant
weight (the linear layers) are quantised; attention products, embeddings, LayerNorms and the
heads outside the graph stay fp32. The recipe was chosen by ``benchmarks/bench_int8_fidelity.py``
(figures and the alternatives measured: ``docs/runtime.md``).
"""

from __future__ import annotations

import ast
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from m3_rag.runtime.export import MODEL_FILE

__all__ = ["DEFAULT_RECIPE", "RECIPES", "Int8Recipe", "quantize_int8"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Int8Recipe:
    """How to quantise.

    Attributes:
        name: Short id, part of the cache key.
        per_channel: One weight scale per output channel (else one per matrix).
        reduce_range: 7-bit weights (for CPUs without VNNI whose u8*s8 sums can saturate).
        keep_fp32: Regular expressions over a linear layer's module path (e.g.
            ``encoder.layer.5.output.dense``): matching layers stay fp32.
    """

    name: str
    per_channel: bool = True
    reduce_range: bool = False
    keep_fp32: tuple[str, ...] = ()


RECIPES: dict[str, Int8Recipe] = {
    r.name: r
    for r in (
        Int8Recipe("tensor", per_channel=False),
        Int8Recipe("channel"),
        Int8Recipe("channel-ffn-out-fp32", keep_fp32=(r"\.output\.dense$",)),
        Int8Recipe("channel-last-fp32", keep_fp32=(r"layer\.LAST\.",)),
    )
}
DEFAULT_RECIPE = RECIPES["channel"]


def _module_path(node: object) -> str:
    """The torch module a node came from (``pkg.torch.onnx.name_scopes``), or ``''``."""
    for prop in getattr(node, "metadata_props", []):
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return ""
            return str(scopes[-1]) if scopes else ""
    return ""


def _excluded(model_file: Path, recipe: Int8Recipe) -> list[str]:
    if not recipe.keep_fp32:
        return []
    import onnx

    graph = onnx.load(str(model_file), load_external_data=False).graph
    paths = {n.name: _module_path(n) for n in graph.node if n.op_type in ("MatMul", "Gemm")}
    layers = [int(m.group(1)) for p in paths.values() if (m := re.search(r"layer\.(\d+)\.", p))]
    last = str(max(layers)) if layers else "-1"
    patterns = [re.compile(p.replace("LAST", last)) for p in recipe.keep_fp32]
    return [name for name, path in paths.items() if any(p.search(path) for p in patterns)]


def quantize_int8(src_dir: Path, out_dir: Path, recipe: Int8Recipe = DEFAULT_RECIPE) -> None:
    """Write ``out_dir/model.onnx``: the int8 version of ``src_dir/model.onnx``.

    Args:
        src_dir: Directory of the fp32 export (``model.onnx`` and its external data).
        out_dir: An empty directory.
        recipe: The quantisation recipe.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src = src_dir / MODEL_FILE
    exclude = _excluded(src, recipe)
    logger.info("int8 recipe %s: %d linear layers kept in fp32", recipe.name, len(exclude))
    quantize_dynamic(
        src,
        out_dir / MODEL_FILE,
        op_types_to_quantize=["MatMul"],
        per_channel=recipe.per_channel,
        reduce_range=recipe.reduce_range,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=exclude,
        use_external_data_format=True,
        extra_options={"MatMulConstBOnly": True},
    )
