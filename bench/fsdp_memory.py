"""Full-size align and SFT train steps through our FSDP2 path in one process: peak memory, step time and
the largest micro-batch that fits.

    python -m bench.fsdp_memory --model full --out fsdp.json        # the GPU machine (4-6 minutes, estimated)
    python -m bench.fsdp_memory --model tiny --device cpu --size 32 --max-batch 2 --out smoke.json  # gloo

The backbone is built from the published configs with random weights (``deepgen.model.random_init``),
the stage module sets what trains (align: think tokens and bridge; sft: also the DiT and VLM LoRA),
then ``stages.parallel.shard_backbone`` shards it with the settings of ``conf/hardware/<--hardware>``
(fsdp_h100: bf16 parameters and fp32 gradient reduction, activation checkpointing of the VLM decoder
layers, connector layers and DiT blocks, resharding after forward, per-block compile on GPU) over a
one-process group, and the
stage's own AdamW steps the sharded parameters. Steps run under bf16 autocast, as Lightning's
bf16-mixed precision does around ``training_step``. Inputs: T2I micro-batches at --size px with
--prompt-tokens of template and caption plus the think tokens (``--task edit`` adds one reference).

With one process nothing is divided: every fp32 master weight, gradient and AdamW state lies on this
GPU, so these are the memory and speed of one rank at world size 1, the upper bound for a rank of a
larger run (at world size N the sharded states shrink N-fold; activations and the gathered bf16
blocks do not).

Micro-batch search: double from 1 until a step runs out of memory (or --max-batch), then bisect. A
trial warms up, then times --iters steps; after an out-of-memory error the model is rebuilt rather
than reused. The JSON is rewritten after every trial.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from bench.perf import (
    GRAD_CLIP,
    ROOT,
    Settings,
    environment,
    free_memory,
    load_stage_config,
    random_images,
    synthetic_prompts,
    time_step,
    write_json,
)
from deepgen.config import HardwareConfig
from deepgen.model.random_init import ARCHITECTURES, build_random_backbone
from stages import STAGES
from stages.parallel import shard_backbone


def largest_fitting(fits: Callable[[int], bool], cap: int) -> int:
    """The largest micro-batch in [1, cap] for which ``fits`` holds, assuming it is monotone: double
    from 1 until one fails, then bisect between the last that fitted and the first that did not.
    0 when even 1 does not fit."""
    good, bad, batch = 0, cap + 1, 1
    while batch <= cap:
        if not fits(batch):
            bad = batch
            break
        good, batch = batch, batch * 2
    while bad - good > 1:
        mid = (good + bad) // 2
        if fits(mid):
            good = mid
        else:
            bad = mid
    return good


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA allocator failures, including those cuBLAS and cuDNN report as plain RuntimeErrors."""
    text = str(error)
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and ("out of memory" in text or "ALLOC_FAILED" in text)
    )


def load_hardware(name: str) -> HardwareConfig:
    node = OmegaConf.merge(
        OmegaConf.structured(HardwareConfig), OmegaConf.load(ROOT / "conf" / "hardware" / f"{name}.yaml")
    )
    return OmegaConf.to_object(node)


class ShardedStage:
    """One stage's sharded backbone and optimiser, built on first use and dropped after an OOM."""

    def __init__(self, s: Settings, stage: str, task: str, hw: HardwareConfig, mesh: DeviceMesh) -> None:
        self.s, self.stage, self.task, self.hw, self.mesh = s, stage, task, hw, mesh
        self.parts: tuple | None = None

    def build(self) -> tuple:
        s = self.s
        bb = build_random_backbone(s.arch, device=s.dev)
        module = STAGES[self.stage](s.arch.model, load_stage_config(self.stage), max_steps=1000, seed=s.seed)
        module.backbone = bb
        module.apply_trainable()
        # configure_model's order: trainable flags, then sharding, then the optimiser over the shards
        shard_backbone(
            bb,
            self.mesh,
            activation_checkpointing=self.hw.activation_checkpointing,
            mixed_precision=self.hw.precision == "bf16-mixed",
            reshard_after_forward=self.hw.reshard_after_forward,
            compile=self.hw.compile and s.compile,
        )
        optimizer = module.configure_optimizers()["optimizer"]
        params = [p for group in optimizer.param_groups for p in group["params"]]
        return bb, optimizer, params

    def step_fn(self, batch: int) -> Callable[[], None]:
        if self.parts is None:
            self.parts = self.build()
        bb, optimizer, params = self.parts
        s = self.s
        refs = [[r] for r in random_images(batch, s.size, s.dev, s.seed + 1)] if self.task == "edit" else None
        prompts = synthetic_prompts(s.arch, bb.vision, batch, s.prompt_tokens, bb.cfg.num_think_tokens, refs)
        targets = random_images(batch, s.size, s.dev, s.seed)
        amp = self.hw.precision == "bf16-mixed"

        def step() -> None:
            with torch.autocast(s.dev.type, dtype=torch.bfloat16, enabled=amp):
                cond = bb.encode_prompts(prompts)
                loss = bb.flow_loss(cond, targets, bb.encode_references(refs) if refs else None)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    def trial(self, batch: int) -> dict:
        """Time ``batch``; an out-of-memory error is a result (fits: false), any other error is raised."""
        try:
            result = {
                "batch": batch,
                "fits": True,
                **time_step(self.step_fn(batch), batch, self.s, count_flops=False),
            }
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            result = {"batch": batch, "fits": False, "error": f"{type(error).__name__}: {str(error)[:300]}"}
            self.parts = None  # an FSDP step broken off half-way leaves state we do not reuse
        free_memory(self.s.dev)
        return result


def single_process_mesh(device: torch.device, backend: str | None, rendezvous: Path) -> DeviceMesh:
    if device.type == "cuda":
        torch.cuda.set_device(device.index or 0)
    backend = (backend or "nccl") if device.type == "cuda" else "gloo"  # one config serves both here
    dist.init_process_group(backend, init_method=f"file://{rendezvous}", rank=0, world_size=1)
    return init_device_mesh(device.type, (1,))


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Settings]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(ARCHITECTURES), default="full")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--hardware", default="fsdp_h100", help="conf/hardware/<name>.yaml with strategy fsdp2")
    p.add_argument("--stages", nargs="+", default=["align", "sft"], choices=["align", "sft"])
    p.add_argument("--task", choices=["t2i", "edit"], default="t2i")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--prompt-tokens", type=int, default=96)
    p.add_argument("--max-batch", type=int, default=64, help="the search stops here")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("fsdp_memory.json"))
    a = p.parse_args(argv)
    if a.iters < 1 or a.max_batch < 1:
        p.error("--iters and --max-batch must be at least 1")
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    s = replace(
        Settings(),
        model=a.model,
        device=device,
        size=a.size,
        prompt_tokens=a.prompt_tokens,
        warmup=a.warmup,
        iters=a.iters,
        compile=torch.device(device).type == "cuda",  # on CPU inductor would take minutes per trial
    )
    return a, s


def search_stage(runner: ShardedStage, doc: dict, out: Path, max_batch: int) -> None:
    """Find ``runner``'s largest micro-batch, recording every trial in ``doc`` (written after each)."""
    record = doc["stages"][runner.stage] = {"trials": [], "largest_batch": None}

    def fits(batch: int) -> bool:
        result = runner.trial(batch)
        record["trials"].append(result)
        write_json(out, doc)
        mem = f", {result['peak_mem_gib']:.1f} GiB" if result.get("peak_mem_gib") is not None else ""
        print(
            f"{runner.stage} batch {batch}: "
            + (f"{result['seconds']:.3f} s{mem}" if result["fits"] else "OOM")
        )
        return result["fits"]

    record["largest_batch"] = largest_fitting(fits, max_batch)
    record["capped"] = record["largest_batch"] == max_batch  # the true limit may be higher
    runner.parts = None
    free_memory(runner.s.dev)
    write_json(out, doc)


def summary(doc: dict) -> str:
    lines = []
    for stage, record in doc["stages"].items():
        capped = " (the --max-batch cap: more may fit)" if record.get("capped") else ""
        lines.append(f"{stage}: largest micro-batch {record['largest_batch']}{capped}")
        for t in sorted(record["trials"], key=lambda t: t["batch"]):
            if not t["fits"]:
                lines.append(f"  batch {t['batch']:>3}: out of memory")
                continue
            mem = f"{t['peak_mem_gib']:.1f} GiB" if t["peak_mem_gib"] is not None else "-"
            lines.append(
                f"  batch {t['batch']:>3}: {t['seconds']:.3f} s/step, {t['img_per_s']:.1f} img/s, {mem}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    a, s = parse_args(argv)
    hw = load_hardware(a.hardware)
    if hw.strategy != "fsdp2":
        raise SystemExit(f"conf/hardware/{a.hardware}.yaml has strategy {hw.strategy!r}, not fsdp2")
    doc = {"env": environment(s), "hardware": asdict(hw), "compiled": hw.compile and s.compile}
    doc |= {"task": a.task, "px": s.size, "stages": {}}
    with tempfile.TemporaryDirectory() as tmp:
        mesh = single_process_mesh(s.dev, hw.process_group_backend, Path(tmp) / "rendezvous")
        try:
            for stage in a.stages:
                start = time.perf_counter()
                search_stage(ShardedStage(s, stage, a.task, hw, mesh), doc, a.out, a.max_batch)
                print(f"{stage}: searched in {time.perf_counter() - start:.0f} s", flush=True)
        finally:
            dist.destroy_process_group()
    print(summary(doc))
    return doc


if __name__ == "__main__":
    main()
