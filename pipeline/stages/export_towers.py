"""Stage `export_towers`: the model's towers exported for ONNX Runtime or OpenVINO, in fp32 or int8 (a bf16 run
uses the fp32 export: OpenVINO converts it to bf16 as it compiles it).

Cached like every stage: keyed by the model's content fingerprint, the runtime and the dtype (and, for int8, by
the calibration images' fingerprint), written into a temporary directory and sealed atomically. The stages that
run the towers take this entry as an input, so a new export re-encodes what it would change and nothing else.
"""

from __future__ import annotations

from ..engine import Artifact, StageContext
from ..export import export
from .calibration import read_calibration

VERSION = 9


def export_towers(ctx: StageContext, *, model: str, runtime: str, dtype: str, image_size: list[int],
                  calibration: Artifact | None = None) -> None:
    loaded = ctx.execution.models.get(model, "fp32")  # torch, fp32, on the CPU: what every export starts from
    pixels = read_calibration(calibration) if calibration is not None else None
    export(loaded.model, loaded.tokenizer, loaded.text_kwargs, tuple(image_size), ctx.out, runtime, dtype,
           (loaded.logit_scale, loaded.logit_bias), pixels)
