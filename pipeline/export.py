"""Export a model's towers for ONNX Runtime or OpenVINO, in fp32 or int8 (pipeline/stages/export_towers.py caches
the result).

Both towers go to ONNX first (torch's TorchScript-based exporter: dynamic batch and sequence axes, one graph per
tower); OpenVINO converts that ONNX file. int8 quantises the vision tower only, statically: weights per channel,
activations with ranges calibrated on real images (`calibration`). The text tower runs once per prompt, never per
image, so it stays fp32 and quantising it would buy nothing but error.

Both runtimes run the same quantised graph: ONNX Runtime's QDQ quantisation of MatMul and Gemm, and of Conv in
convolutional towers (u8 activations, s8 weights: the VNNI kernels), which OpenVINO reads as int8 layers;
attention's products of two activations stay fp32 (`_products_of_activations`). NNCF,
OpenVINO's own quantiser, was tried first: on the fixture CLIP its model fell to a minimum embedding cosine of 0.73,
and it is one more heavy dependency.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from .inference import OPENVINO, TOWERS_FILE, own_signal_stack

log = logging.getLogger(__name__)

OPSET = 17  # LayerNormalization as one op
_CALIBRATION_STRIDE = 8  # images whose activations are held at once while calibrating
# A ViT's one Conv is its patch embedding: a sliver of its FLOPs, fed raw pixels, and the layer whose int8 error
# OpenVINO amplified past make precision's 0.99 on the fixture model. EfficientNet (ALIGN) is nearly all Conv.
_QUANTISED_OPS = {"transformer": ["MatMul", "Gemm"], "convnet": ["MatMul", "Gemm", "Conv"]}


class _Tower(torch.nn.Module):
    """One tower of an HF dual encoder as a module with positional tensor inputs (what the exporter traces)."""

    def __init__(self, model, method: str, names: list[str]) -> None:
        super().__init__()
        self.model, self.method, self.names = model, method, names

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return getattr(self.model, self.method)(**dict(zip(self.names, tensors))).pooler_output


def export(model, tokenizer, text_kwargs: dict, image_size: tuple[int, int], out: Path, runtime: str, dtype: str,
           scores: tuple[float, float | None], calibration: np.ndarray | None = None) -> None:
    """Write the towers of an fp32 CPU `model` into `out`, with `towers.json` (what `ExportedTowers` loads)."""
    example_tokens = tokenizer(["a photo of a cat.", "a dog"], return_tensors="pt", **text_kwargs)
    text_names = list(example_tokens.keys())
    pixels = torch.zeros(2, 3, *image_size)
    with warnings.catch_warnings(), _global_pooling(model):
        warnings.simplefilter("ignore")  # tracer warnings about python control flow on constant shapes
        _to_onnx(_Tower(model, "get_image_features", ["pixel_values"]), [pixels], ["pixel_values"],
                 {"pixel_values": {0: "batch"}}, out / "image.onnx")
        _to_onnx(_Tower(model, "get_text_features", text_names), list(example_tokens.values()), text_names,
                 {name: {0: "batch", 1: "sequence"} for name in text_names}, out / "text.onnx")
    files = {"image": "image.onnx", "text": "text.onnx"}
    if dtype == "int8":
        _quantise_onnx(out / "image.onnx", out / "image.int8.onnx", calibration,
                       _QUANTISED_OPS["transformer" if _is_transformer(model) else "convnet"])
        files["image"] = "image.int8.onnx"
        (out / "image.onnx").unlink()
    if runtime == OPENVINO:  # it reads the QDQ nodes and runs those layers in int8
        files = {tower: _to_openvino(out / file, out / f"{tower}.xml") for tower, file in files.items()}
    manifest = {"runtime": runtime, "dtype": dtype, "files": files,
                "inputs": {"image": ["pixel_values"], "text": text_names},
                "scores": {"logit_scale": scores[0], "logit_bias": scores[1]}}
    (out / TOWERS_FILE).write_text(json.dumps(manifest, indent=1, sort_keys=True), encoding="utf-8")


@contextlib.contextmanager
def _global_pooling(model):
    """ALIGN pools its last feature map with `AvgPool2d(kernel=hidden_dim, ceil_mode=True)`: a kernel larger than
    the map, which torch clips to a global mean and OpenVINO's converter rejects. Export the same mean, stated as
    such, and put the model back as it was."""
    vision = getattr(model, "vision_model", None)
    pooler = getattr(vision, "pooler", None)
    if not isinstance(pooler, torch.nn.AvgPool2d):
        yield
        return
    vision.pooler = torch.nn.AdaptiveAvgPool2d(1)
    try:
        yield
    finally:
        vision.pooler = pooler


def _to_onnx(module: torch.nn.Module, args: list[torch.Tensor], names: list[str], axes: dict, path: Path) -> None:
    with torch.inference_mode(False), torch.no_grad():
        torch.onnx.export(module.eval(), tuple(args), str(path), input_names=names, output_names=["features"],
                          dynamic_axes={**axes, "features": {0: "batch"}}, opset_version=OPSET, dynamo=False)


def _quantise_onnx(source: Path, target: Path, calibration: np.ndarray, ops: list[str]) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        """The calibration images one by one, in strides: ORT folds each stride's ranges into the min/max so
        far, and never holds every activation of every image at once (64 images of ViT-L/14 would be ~20 GB)."""

        def __init__(self) -> None:
            self.rows = iter(())

        def __len__(self) -> int:
            return len(calibration)

        def set_range(self, start_index: int, end_index: int) -> None:
            self.rows = iter(calibration[start_index:end_index])

        def get_next(self):
            row = next(self.rows, None)
            return None if row is None else {"pixel_values": row[None]}

    stride = max(d for d in range(1, _CALIBRATION_STRIDE + 1) if len(calibration) % d == 0)
    prepared = source.with_suffix(".prepared.onnx")
    quant_pre_process(str(source), str(prepared))  # shape inference and graph optimisation, as ORT advises
    quantize_static(str(prepared), str(target), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                    op_types_to_quantize=ops, nodes_to_exclude=_products_of_activations(prepared),
                    extra_options={"CalibStridedMinMax": stride})
    prepared.unlink()


def _products_of_activations(path: Path) -> list[str]:
    """The MatMuls with no weight among their inputs: attention's query-key product and its probabilities times
    the values. Both operands get one scale per tensor (no per-channel weight scale to absorb outliers), and the
    softmax output is mostly near zero, so int8 there costs much precision for little time: on the fixture CLIP
    and 6 varied image sets, keeping them fp32 raised the minimum probability cosine on five (0.93 / 0.85 / 0.93
    / 0.91 / 0.97 -> 0.96 / 0.97 / 0.97 / 0.99 / 0.98; the sixth 0.96 -> 0.92), and on a ViT-B/16 tower they are
    8% of the FLOPs (the tower alone: OpenVINO 4.90x -> 4.93x torch fp32, ONNX Runtime 2.23x -> 2.54x)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {initializer.name for initializer in graph.initializer}
    return [node.name for node in graph.node
            if node.op_type == "MatMul" and not any(name in weights for name in node.input)]


def _to_openvino(source: Path, target: Path) -> str:
    import openvino as ov

    with own_signal_stack():  # see there: OpenVINO leaves the thread a signal stack that dies with its objects
        ov.save_model(ov.convert_model(str(source)), str(target), compress_to_fp16=False)  # fp16 changes results
    source.unlink()
    return target.name


def _is_transformer(model) -> bool:
    """ViT towers (every family but ALIGN, whose vision tower is an EfficientNet)."""
    return getattr(model.config, "model_type", "") != "align"
