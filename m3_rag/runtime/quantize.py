"""int8 quantisation of an exported graph (``onnxruntime.quantization``), no calibration data.

Two methods. ``dynamic``: weights quantised offline (signed int8, one scale per output
channel or per matrix), activations at run time with one scale per tensor (``quantize_dynamic``,
``MatMulInteger``). ``blockwise``: weights in int8 blocks of ``block_size`` input features,
each with its own scale (``MatMulNBits``, 8 bits); with ``accuracy_level=4`` the activations
are quantised at run time per block too, so an outlier feature only coarsens its block.
Only the ``MatMul`` nodes with a constant weight (the linear layers) are quantised;
attention products, embeddings, LayerNorms and the heads outside the graph stay fp32. The
default recipe was chosen by ``benchmarks/bench_int8_fidelity.py`` (figures and the
alternatives measured: ``docs/runtime.md``).
"""

from __future__ import annotations

import ast
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
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
        method: ``"dynamic"`` (``quantize_dynamic``) or ``"blockwise"`` (``MatMulNBits``).
        per_channel: (dynamic) One weight scale per output channel (else one per matrix).
        reduce_range: (dynamic) 7-bit weights (for CPUs without VNNI whose u8*s8 sums can saturate).
        keep_fp32: Regular expressions over a linear layer's module path (e.g.
            ``encoder.layer.5.output.dense``): matching layers stay fp32.
        block_size: (blockwise) Input features per scale.
    """

    name: str
    method: str = "dynamic"
    per_channel: bool = True
    reduce_range: bool = False
    keep_fp32: tuple[str, ...] = ()
    block_size: int = 32


RECIPES: dict[str, Int8Recipe] = {
    r.name: r
    for r in (
        Int8Recipe("tensor", per_channel=False),
        Int8Recipe("channel"),
        Int8Recipe("channel-ffn-out-fp32", keep_fp32=(r"\.output\.dense$",)),
        Int8Recipe("channel-last-fp32", keep_fp32=(r"layer\.LAST\.",)),
        Int8Recipe("block32", method="blockwise", block_size=32),
    )
}
DEFAULT_RECIPE = RECIPES["block32"]  # the figures: docs/runtime.md


def _module_path(node: object) -> str:
    """The torch module a node came from (``pkg.torch.onnx.name_scopes``), or ``''``."""
    for prop in getattr(node, "metadata_props", []):
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return ""
            return max((str(x) for x in scopes), key=len, default="")  # the deepest module
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


class _DropAll(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


@contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """onnxruntime.quantization logs through the root logger (``logging.warning``: advice
    about pre-processing), which would also configure the application's logging; hold it."""
    root = logging.getLogger()
    handler, drop = logging.NullHandler(), _DropAll()
    root.addHandler(handler)  # a handler present: logging.warning() calls no basicConfig()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)
        root.removeHandler(handler)


def quantize_int8(src_dir: Path, out_dir: Path, recipe: Int8Recipe = DEFAULT_RECIPE) -> None:
    """Write ``out_dir/model.onnx``: the int8 version of ``src_dir/model.onnx``.

    Args:
        src_dir: Directory of the fp32 export (``model.onnx`` and its external data).
        out_dir: An empty directory.
        recipe: The quantisation recipe.
    """
    src = src_dir / MODEL_FILE
    exclude = _excluded(src, recipe)
    logger.info("int8 recipe %s: %d linear layers kept in fp32", recipe.name, len(exclude))
    with _quiet_root_logger():
        _quantize(src, out_dir / MODEL_FILE, recipe, exclude)


def _quantize(src: Path, dst: Path, recipe: Int8Recipe, exclude: list[str]) -> None:
    if recipe.method == "blockwise":
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quantizer = MatMulNBitsQuantizer(
            onnx.load(str(src)),
            bits=8,
            block_size=recipe.block_size,
            is_symmetric=True,
            accuracy_level=4,
            nodes_to_exclude=exclude,
        )
        quantizer.process()
        quantizer.model.save_model_to_file(str(dst), use_external_data_format=True)
        return
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        src,
        dst,
        op_types_to_quantize=["MatMul"],
        per_channel=recipe.per_channel,
        reduce_range=recipe.reduce_range,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=exclude,
        use_external_data_format=True,
        extra_options={"MatMulConstBOnly": True},
    )
