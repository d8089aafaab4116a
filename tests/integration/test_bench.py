"""`make bench` in miniature: the harness runs end to end and reports every ratio it promises."""

import json
import sys

import pytest

from pipeline.devices import cpu_has_native_bf16
from tests.helpers import ROOT, run


@pytest.mark.slow
def test_bench_quick_reports_all_ratios(tmp_path):
    proc = run([sys.executable, str(ROOT / "jobs" / "bench.py"), "--quick", "--out", str(tmp_path),
                "--models", "chinese-clip-vit-base-patch16", "--runtime-models", "chinese-clip-vit-base-patch16"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    model = report["models"][0]
    for key in ("ceiling_img_per_s", "hardware_limit_img_per_s"):
        assert model[key] > 0
    assert model["ours_10"]["images"] == 4 and model["ours_10"]["img_per_s"] > 0
    assert model["hf_10"]["img_per_s"] > 0 and model["hf_1000"]["labels"] == 40
    assert model["vision_gflop_per_image"] > 0 and model["text_gflop_per_label"] > 0
    # the profile of our run accounts for its time: the parts never exceed the whole
    profile = model["ours_10"]["profile"]
    assert profile["model_seconds"] > 0 and profile["other_seconds"] > -1e-3
    assert sum(v for k, v in profile.items() if k != "other_seconds") <= model["ours_10"]["seconds"] + 1e-3
    assert len(report["peak_probes"]) == 3 and report["peak_gflops"] == max(report["peak_probes"]) > 0
    assert report["data_path"]["ours_img_per_s"] > 0 and report["data_path"]["plain_pillow_img_per_s"] > 0
    assert set(report["draft"]) == {"clip", "chinese_clip"}
    assert 0 <= report["draft"]["clip"]["top1_agreement"] <= 1
    runtimes = report["runtimes"]["chinese-clip-vit-base-patch16"]
    threshold = "torch fp32 (mmap threshold 1 MB)"  # the allocator setting's before/after, for torch
    bf16 = ["torch bf16", "openvino bf16"] if cpu_has_native_bf16() else []  # bf16 only where the CPU has it
    assert sorted(k for k in runtimes if " " in k) == sorted([f"{r} {d}" for r in ("torch", "onnxruntime", "openvino")
                                                              for d in ("fp32", "int8")] + [threshold, *bf16])
    for key, variant in runtimes.items():
        if " " in key:
            assert variant["e2e_img_per_s"] > 0 and variant["tower_img_per_s"] > 0, key
            assert variant["min_cosine_vs_torch_fp32"] > (0.999999 if "fp32" in key else 0.99), key
            assert 100 < variant["peak_rss_mb"] < 8000, key
    assert runtimes["openvino int8"]["export_seconds"] > 0
    assert 0 < model["bound_img_per_s"] < min(model["ceiling_img_per_s"], model["decode_all_core_img_per_s"])
    for line in ("CPU runtimes", "onnxruntime int8", "ours / ceiling", "ours / bound", "where ours' time goes", "ours / HF pipeline, 10 labels", "ceiling / hardware limit",
                 "data path"):
        assert line in proc.stdout
