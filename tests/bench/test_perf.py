"""The GPU benchmarks (bench/perf.py, bench/fsdp_memory.py) run end to end on the tiny random
architecture on CPU: every measurement on both sides, with numbers that hang together. The GPU
figures themselves come from running the same commands on the GPU machine (bench/RESULTS.md)."""

from __future__ import annotations

import importlib
import json
import weakref
from types import ModuleType

import pytest
import torch
import torch.distributed as dist

from tests.conftest import ROOT

TINY = ["--model", "tiny", "--device", "cpu", "--size", "32", "--prompt-tokens", "8"]
MEASUREMENTS = {
    "train_align": 2,  # images per step
    "train_align_edit": 2,
    "train_sft_t2i": 2,
    "train_sft_edit": 2,
    "sample_cfg_64": 1,
    "sample_cfg_32": 1,
    "grpo_rollout": 2,
    "grpo_update": 2,
}


def bench_module(name: str) -> ModuleType:
    """bench/ is no package: its scripts run from the repository root (``python -m bench.perf``), so
    they are imported the same way."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(ROOT))
        return importlib.import_module(f"bench.{name}")


perf_module, fsdp_module = bench_module("perf"), bench_module("fsdp_memory")
perf, fsdp_memory = perf_module.main, fsdp_module.main
largest_fitting, is_out_of_memory = fsdp_module.largest_fitting, fsdp_module.is_out_of_memory


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models spend their time in thread hand-offs: one thread is several times faster, and steady
    when other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def perf_doc(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("perf") / "perf.json"
    argv = [*TINY, "--sample-sizes", "64", "32", "--steps", "3", "--batch", "2", "--rollout-images", "2"]
    argv += ["--precision", "bf16-mixed", "--frozen-dtype", "bfloat16"]  # the GPU's dtypes, not the CPU's
    perf([*argv, "--warmup", "1", "--iters", "2", "--long-iters", "2", "--out", str(out)])
    return json.loads(out.read_text())


def test_every_measurement_times_both_sides(perf_doc):
    results = perf_doc["results"]
    assert list(results) == list(MEASUREMENTS)
    for name, result in results.items():
        for side in ("ours", "plain"):
            m = result[side]
            assert "error" not in m, f"{name} {side}: {m.get('error')}"
            assert len(m["seconds_all"]) == 2 and min(m["seconds_all"]) == m["seconds_min"] > 0
            assert m["seconds_min"] <= m["seconds"] <= max(m["seconds_all"])
            assert m["images"] == MEASUREMENTS[name]
            assert m["img_per_s"] == pytest.approx(m["images"] / m["seconds"])
            assert m["flops"] > 0
            assert m["tflops_per_s"] == pytest.approx(m["flops"] / m["seconds"] / 1e12)
            assert m["mfu"] == pytest.approx(m["tflops_per_s"] / 989.0)
            assert m["peak_mem_gib"] is None  # CPU: no allocator statistics
        assert result["speedup"] == pytest.approx(result["plain"]["seconds"] / result["ours"]["seconds"])
    settings = perf_doc["settings"]
    assert settings["model"] == "tiny" and settings["precision"] == "bf16-mixed"
    assert settings["frozen_dtype"] == "bfloat16"


def test_flop_counts_follow_the_work(perf_doc):
    """Counted FLOPs rise with what each step does, and the plain loop does the same work as ours."""
    flops = {
        name: {side: r[side]["flops"] for side in ("ours", "plain")}
        for name, r in perf_doc["results"].items()
    }
    for side in ("ours", "plain"):
        # sft adds the DiT's and the adapters' weight gradients; an edit adds reference tokens
        assert flops["train_align"][side] < flops["train_sft_t2i"][side] < flops["train_sft_edit"][side]
        assert flops["train_align"][side] < flops["train_align_edit"][side] < flops["train_sft_edit"][side]
        assert flops["sample_cfg_32"][side] < flops["sample_cfg_64"][side]
    for name, sides in flops.items():
        assert sides["plain"] == pytest.approx(sides["ours"], rel=0.1), name


def test_only_runs_the_named_measurements(tmp_path):
    out = tmp_path / "perf.json"
    argv = ["--only", "sample", "--sample-sizes", "32", "--steps", "2", "--warmup", "0", "--long-iters", "1"]
    doc = perf([*TINY, *argv, "--out", str(out)])
    assert list(doc["results"]) == ["sample_cfg_32"]
    settings = doc["settings"]
    assert settings["precision"] == "32-true" and settings["frozen_dtype"] == "float32"  # CPU defaults
    assert json.loads(out.read_text())["results"].keys() == {"sample_cfg_32"}


def test_our_side_compiles_after_counting_flops(tmp_path, monkeypatch):
    """--compile: our blocks are compiled (traced with aot_eager here; inductor takes minutes on CPU)
    after the eager FLOP count, so the count matches the uncompiled run's, and sampling and rollouts
    also compile their denoising step; the numerics check compares a compiled loss, gradient and
    guided velocity with eager ones."""
    from deepgen.model.backbone import DeepGenBackbone
    from stages.parallel import compile_blocks

    compiled, sampling = [], []
    compile_sampling = DeepGenBackbone.compile_sampling

    def trace(bb):
        compiled.append(bb)
        compile_blocks(bb, backend="aot_eager")

    def trace_sampling(bb):
        sampling.append(bb)
        compile_sampling(bb, backend="aot_eager", mode=None)

    monkeypatch.setattr(perf_module, "compile_blocks", trace)
    monkeypatch.setattr(DeepGenBackbone, "compile_sampling", trace_sampling)
    argv = [*TINY, "--only", "train_sft_t2i", "sample_cfg", "grpo_rollout", "--batch", "2", "--steps", "2"]
    argv += [
        "--sample-sizes",
        "32",
        "--rollout-images",
        "2",
        "--warmup",
        "1",
        "--iters",
        "1",
        "--long-iters",
        "1",
    ]
    eager_doc = perf([*argv, "--out", str(tmp_path / "eager.json")])
    assert not compiled and not sampling and "compile_numerics" not in eager_doc
    fast_doc = perf([*argv, "--compile", "--out", str(tmp_path / "fast.json")])
    assert len(compiled) == 4  # the numerics check, then the three measurements
    assert sampling == [compiled[0], compiled[2], compiled[3]]  # the check, sampling, rollouts
    for name in ("train_sft_t2i", "sample_cfg_32", "grpo_rollout"):
        fast, eager = fast_doc["results"][name], eager_doc["results"][name]
        assert fast["ours"]["compiled"] and not fast["plain"]["compiled"] and not eager["ours"]["compiled"]
        assert fast["ours"]["flops"] == eager["ours"]["flops"]
    numerics = fast_doc["compile_numerics"]
    assert numerics["ok"] and numerics["loss_eager"] > 0
    assert max(numerics["rel_diff"].values()) < 1e-4  # fp32, same graphs


@pytest.mark.parametrize("fails", [False, True])
def test_a_side_frees_its_models_before_the_next_is_built(monkeypatch, fails):
    """Two full-size backbones do not fit at once, so one side's models must be gone when
    ``free_memory`` runs, also when the side failed (its traceback must not keep them)."""
    models = []

    def prepare(s):
        model = torch.nn.Linear(2, 2)
        model.me = [model]  # a reference cycle, as Lightning's objects have: only gc frees it
        models.append(weakref.ref(model))

        def step():
            model(torch.ones(2))
            if fails:
                raise torch.OutOfMemoryError("CUDA out of memory")

        return step, 1

    alive_at_free = []
    free_memory = perf_module.free_memory

    def checked_free_memory(device):
        free_memory(device)
        alive_at_free.append(models[-1]() is not None)

    monkeypatch.setattr(perf_module, "free_memory", checked_free_memory)
    result = perf_module.measure_side(prepare, perf_module.Settings(device="cpu", warmup=0, iters=1))
    assert ("error" in result) == fails
    assert alive_at_free == [False]


def test_frozen_bf16_weights_need_autocast(capsys, tmp_path):
    with pytest.raises(SystemExit):
        perf([*TINY, "--frozen-dtype", "bfloat16", "--out", str(tmp_path / "perf.json")])
    assert "--precision bf16-mixed" in capsys.readouterr().err


def test_largest_fitting_doubles_then_bisects():
    tried = []

    def fits(batch: int) -> bool:
        tried.append(batch)
        return batch <= 37

    assert largest_fitting(fits, cap=64) == 37
    assert tried == [1, 2, 4, 8, 16, 32, 64, 48, 40, 36, 38, 37]
    assert largest_fitting(lambda b: True, cap=6) == 6  # every size fits: the cap is the answer
    assert largest_fitting(lambda b: False, cap=64) == 0


def test_out_of_memory_errors_are_told_apart_from_bugs():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"))
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_out_of_memory(ValueError("out of memory"))


def test_fsdp_memory_runs_sharded_align_and_sft_steps(tmp_path):
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    out = tmp_path / "fsdp.json"
    # fsdp_h100's settings (bf16 sharding, activation checkpointing); on CPU the group uses gloo
    argv = [*TINY, "--hardware", "fsdp_h100", "--max-batch", "3", "--warmup", "0", "--iters", "1"]
    doc = fsdp_memory([*argv, "--out", str(out)])
    assert not dist.is_initialized()  # the one-process group is torn down again
    assert json.loads(out.read_text()) == json.loads(json.dumps(doc))
    hardware = doc["hardware"]
    assert hardware["strategy"] == "fsdp2" and hardware["precision"] == "bf16-mixed"
    assert hardware["compile"] and not doc["compiled"]  # compiled on GPU only
    assert hardware["activation_checkpointing"] and hardware["reshard_after_forward"]
    for stage in ("align", "sft"):
        record = doc["stages"][stage]
        # nothing runs out of memory on CPU: the search stops at the cap, and says so
        assert record["largest_batch"] == 3 and record["capped"]
        assert [t["batch"] for t in record["trials"]] == [1, 2, 3]
        assert all(t["fits"] and t["seconds"] > 0 and t["img_per_s"] > 0 for t in record["trials"])
