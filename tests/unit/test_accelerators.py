"""The accelerator path, checked where a CPU can check it: device binding and the barrier's backend, the device
index of each rank, dtypes the chip supports, the fp32 logit scale under half precision, copy-then-cast, padded
batches, worker counts per rank, the warning for a GPU that torch cannot use, the NPU text tower."""

import shutil

import numpy as np
import pytest
import torch

from pipeline import devices, distributed
from pipeline.errors import UserError
from tests.helpers import TINY_CLIP


def test_ranks_bind_their_device_and_meet_at_a_gloo_barrier(monkeypatch):
    import torch.distributed as dist

    bound, joined = [], []
    monkeypatch.setattr(torch.cuda, "set_device", bound.append)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: joined.append(backend))
    distributed.init(distributed.Shard(3, 4, True, 3), torch.device("cuda:3"), timeout_hours=1)
    assert bound == [torch.device("cuda:3")] and joined == ["gloo"]  # gloo whatever the device: no NCCL/HCCL


@pytest.mark.parametrize("visible,local_rank,index", [(8, 3, 3), (1, 3, 0), (4, 5, 1)])
def test_local_rank_picks_among_the_visible_devices(monkeypatch, visible, local_rank, index):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    assert devices.device_index("cuda", local_rank) == index


def test_dtype_follows_what_the_chip_supports(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)  # a V100
    assert devices.resolve("cuda", "auto").dtype_name == "fp16"
    with pytest.raises(UserError, match="no bfloat16 support"):
        devices.resolve("cuda", "bf16")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)  # an H100
    assert devices.resolve("cuda", "auto").dtype_name == "bf16"
    assert devices.resolve("cpu", "auto").dtype_name == "fp32"


@pytest.mark.parametrize("line,native", [
    ("flags\t\t: fpu sse2 avx2 fma avx512f avx512_vnni", False),  # Cascade Lake: VNNI, no BF16
    ("flags\t\t: fpu avx2 avx512f avx512_vnni avx512_bf16", True),  # Cooper Lake, Zen 4
    ("flags\t\t: fpu avx512f amx_bf16 amx_tile amx_int8", True),  # Sapphire Rapids
    ("Features\t: fp asimd sve bf16 i8mm", True),  # Graviton 3, Neoverse V1
])
def test_cpu_bf16_instructions_are_read_from_the_flags(tmp_path, line, native):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: some cpu\n{line}\n", encoding="utf-8")
    assert devices.cpu_has_native_bf16(str(cpuinfo)) is native
    assert devices.cpu_has_native_bf16(str(tmp_path / "absent")) is False


def test_cpu_bf16_runs_where_the_cpu_has_it_and_falls_back_elsewhere(monkeypatch, caplog):
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: True)
    assert devices.resolve("cpu", "bf16").dtype_name == "bf16"
    assert devices.resolve("cpu", "fp16").dtype_name == "fp32"  # fp16 has no fast CPU kernels here
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: False)
    assert devices.resolve("cpu", "bf16").dtype_name == "fp32"
    assert "no bf16 instructions) is slower than fp32" in caplog.text
    assert devices.resolve("cpu", "bf16", cpu_half=True).dtype_name == "bf16"  # parity checks run it anyway


def test_a_gpu_torch_cannot_use_is_reported(monkeypatch, caplog):
    import os

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    real_isdir, real_listdir = os.path.isdir, os.listdir
    monkeypatch.setattr(os.path, "isdir", lambda p: p == "/proc/driver/nvidia/gpus" or real_isdir(p))
    monkeypatch.setattr(os, "listdir", lambda p: ["0000:17:00.0"] if p == "/proc/driver/nvidia/gpus" else real_listdir(p))
    assert devices.resolve("auto", "auto").device.type == "cpu"
    assert "1 NVIDIA GPU(s) on this machine, but this torch" in caplog.text


def _with_logit_scale(tmp_path, value: float):
    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(TINY_CLIP, model)
    weights = load_file(model / "model.safetensors")
    weights["logit_scale"] = torch.tensor(value, dtype=torch.float32)
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    return model


def test_logit_scale_is_read_in_fp32_under_half_precision(tmp_path):
    from pipeline.models import LoadedModel, inspect_model_dir

    model = _with_logit_scale(tmp_path, float(np.log(100.0)))
    loaded = LoadedModel(inspect_model_dir(model), devices.DeviceChoice(torch.device("cpu"), "bf16"))
    assert loaded.model.logit_scale.dtype == torch.bfloat16
    cast = float(loaded.model.logit_scale.detach().float().exp())
    assert abs(cast - 98.86) < 0.01  # ln 100 in bf16 is 4.59375
    assert loaded.logit_scale == pytest.approx(100.0, abs=1e-4)


def test_pixels_are_copied_then_cast_on_the_device():
    from torch.overrides import TorchFunctionMode

    from pipeline.models import LoadedModel, inspect_model_dir

    loaded = LoadedModel(inspect_model_dir(TINY_CLIP), devices.DeviceChoice(torch.device("cpu"), "bf16"))
    calls = []

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.Tensor.to and args and args[0].dim() == 4:
                calls.append(kwargs.get("dtype") or next((a for a in args[1:] if isinstance(a, torch.dtype)), None))
            return func(*args, **kwargs)

    pixels = torch.zeros((2, 3, 64, 64), dtype=torch.float32)
    with Record():
        loaded.encode_images(pixels)
    assert calls[:2] == [None, torch.bfloat16]  # first the copy (dtype kept), then the cast on the device


def test_short_batches_are_padded_to_a_fixed_shape():
    from pipeline.encoding.loop import pad

    batch = torch.ones((3, 3, 8, 8))
    padded = pad(batch, 8)
    assert padded.shape == (8, 3, 8, 8) and padded[3:].abs().sum() == 0 and torch.equal(padded[:3], batch)
    inputs = {"pixel_values": torch.ones((2, 4, 5)), "spatial_shapes": torch.ones((2, 2), dtype=torch.long)}
    assert {k: tuple(v.shape) for k, v in pad(inputs, 4).items()} == {"pixel_values": (4, 4, 5),
                                                                       "spatial_shapes": (4, 2)}
    assert pad(batch, None) is batch


def test_padded_batches_give_the_same_results(compose, monkeypatch):
    """Padding changes the shape the model sees, not the embeddings of the real rows."""
    import pyarrow.parquet as pq

    from pipeline import workflow

    plain = workflow.run(compose("encode.batch_size=5", out="plain", cache="c1"))
    real_build = workflow.build

    def build_padded(*a, **kw):
        pipeline = real_build(*a, **kw)
        pipeline.execution.pad_to = pipeline.execution.batch_size  # as on an accelerator
        return pipeline

    monkeypatch.setattr(workflow, "build", build_padded)
    padded = workflow.run(compose("encode.batch_size=5", out="padded", cache="c2"))
    a = pq.read_table(plain.out_dir / "predictions.parquet").to_pandas()
    b = pq.read_table(padded.out_dir / "predictions.parquet").to_pandas()
    assert list(a["label"]) == list(b["label"])
    assert np.abs(np.stack(a["probs"]) - np.stack(b["probs"])).max() < 1e-5


@pytest.mark.parametrize("local_world,cpus,accelerator,expected", [
    ("4", 16, True, (3, 3, 3)),  # 4 ranks on 16 cores: 4 each, one kept for the thread driving the device
    ("1", 64, True, (16, 63, 16)),
    ("1", 2, False, (2, 2, 1)),  # on a CPU: start at all cores, half when the model never waits
    ("2", 16, False, (8, 8, 4)),
])
def test_worker_counts_per_rank(monkeypatch, local_world, cpus, accelerator, expected):
    from pipeline import workflow

    monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world)
    monkeypatch.setattr(devices, "cpu_count", lambda: cpus)
    choice = devices.DeviceChoice(torch.device("cuda:0" if accelerator else "cpu"), "fp32")
    assert workflow.worker_counts(choice) == expected


def test_worker_tuner_grows_while_it_pays_and_falls_back():
    from pipeline.encoding.tuner import WorkerTuner

    tuner = WorkerTuner(start=1, highest=4, fixed=False)
    tuner.observe(1, images=100, seconds=4.0, waited=2.0)  # the model waits half the time: one more
    assert tuner.count == 2 and not tuner.settled
    tuner.observe(2, images=100, seconds=2.5, waited=0.8)  # faster, still waiting: one more
    assert tuner.count == 3
    tuner.observe(3, images=100, seconds=3.0, waited=0.2)  # clearly slower than with 2: back to 2, settled
    assert (tuner.count, tuner.settled) == (2, True)
    noisy = WorkerTuner(start=1, highest=4, fixed=False)
    noisy.observe(1, images=100, seconds=4.0, waited=2.0)
    noisy.observe(2, images=100, seconds=4.1, waited=1.0)  # within the noise band: keeps 2, does not go on
    assert (noisy.count, noisy.settled) == (2, True)
    fixed = WorkerTuner(start=3, highest=8, fixed=True)
    fixed.observe(3, images=100, seconds=9.0, waited=8.0)
    assert fixed.count == 3


def test_worker_tuner_on_a_cpu_starts_at_every_core_and_halves_for_a_model_that_never_waits():
    from pipeline.encoding.tuner import WorkerTuner

    heavy = WorkerTuner(start=4, highest=4, fixed=False, lowest=2)
    heavy.observe(4, images=64, seconds=10.0, waited=0.1)  # the model never waited: the decoders are ahead
    assert (heavy.count, heavy.settled) == (2, True)
    cheap = WorkerTuner(start=4, highest=4, fixed=False, lowest=2)
    cheap.observe(4, images=64, seconds=1.0, waited=0.6)  # the decoders are the bottleneck: keep them all
    assert (cheap.count, cheap.settled) == (4, True)
    accelerator = WorkerTuner(start=15, highest=15, fixed=False, lowest=15)  # next to a device: never fewer
    accelerator.observe(15, images=640, seconds=2.0, waited=0.0)
    assert accelerator.count == 15


def test_npu_text_tower_runs_eager_with_the_same_results():
    from pipeline.models import LoadedModel, inspect_model_dir, text_attention_eager

    loaded = LoadedModel(inspect_model_dir(TINY_CLIP), devices.DeviceChoice(torch.device("cpu"), "fp32"))
    prompts = ["a photo of a red circle.", "a star", "a photo of a small blue cross on grass."]  # unequal lengths
    before = loaded.encode_text(prompts)
    text_attention_eager(loaded.model)
    assert loaded.model.config.text_config._attn_implementation == "eager"
    assert np.abs(loaded.encode_text(prompts) - before).max() < 1e-5


def test_worker_tuner_decides_inside_a_chunk_and_restarts_workers_only_to_change_their_number():
    """A dataset smaller than a chunk is tuned too: a step is the rest of a group, observed every ~32 images; it
    stops (at the batch just launched) only when the count changes, and the rest of the group goes to the new
    workers; once settled, many groups per step; a tar file (batches unknown) is one step, never stopped."""
    from pipeline.encoding.tuner import WorkerTuner

    tuner = WorkerTuner(start=1, highest=2, fixed=False)
    steps = tuner.segments({0: 0, 1: 0, 2: 0}, lambda group: 60)  # 60 batches in each group
    step = next(steps)
    assert step == ({0: 0}, range(0, 60))
    watch = tuner.watch(1, step, ahead=0)
    watch.arrived(10.0, images=0, waited=0.0)
    assert watch.after_batch(10.4, images=24, waited=0.2, batch=3) is None  # under 32 images: no decision yet
    assert watch.after_batch(11.0, images=32, waited=0.5, batch=4) == 5  # waiting on data: a worker more, stop
    assert tuner.count == 2
    step = steps.send(5)
    assert step == ({0: 0}, range(5, 60))  # the rest of the group, on two workers
    watch = tuner.watch(2, step, ahead=0)
    watch.arrived(12.0, images=40, waited=0.5)
    assert watch.after_batch(12.5, images=72, waited=0.52, batch=9) is None  # it paid, and 2 is the most: settled
    assert tuner.settled and tuner.count == 2 and tuner.watch(2, step, ahead=0) is None
    assert steps.send(None) == ({1: 0, 2: 0}, None)  # the step ran to its end; then the rest at once
    assert next(steps, None) is None
    tars = WorkerTuner(start=1, highest=2, fixed=False)
    tar_steps = tars.segments({0: 0, 1: 3}, lambda group: None)
    step = next(tar_steps)
    watch = tars.watch(1, step, ahead=0)
    watch.arrived(0.0, images=0, waited=0.0)
    assert step == ({0: 0}, None) and watch.after_batch(5.0, images=500, waited=4.0, batch=60) is None
    watch.finish(5.0, images=500, waited=4.0)  # decided at the tar file's end
    assert tars.count == 2 and tar_steps.send(None) == ({1: 3}, None)
