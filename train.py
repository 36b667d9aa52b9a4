"""Train a DeepGen stage: `python train.py stage=sft` (tiny world on CPU by default).

Wiring only: compose and validate the config, build the data module, the stage module and the
trainer, call fit. Every option is documented in deepgen/config.py.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import hydra
import lightning as L
import torch
import wandb
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ThroughputMonitor
from omegaconf import DictConfig, OmegaConf

from deepgen.config import RunConfig
from deepgen.model.tiny_zoo import build_tiny_zoo
from stages import STAGES
from stages.callbacks import (
    LossSummary,
    Preemption,
    SampleGridCallback,
    StepCheckpoint,
    latest_checkpoint,
    run_checkpoint,
)
from stages.checkpoint_io import SafeCheckpointIO
from stages.datamodule import DataProgress, DeepGenDataModule
from stages.parallel import cluster_plugins, compile_blocks, make_strategy
from stages.schema import register_schema
from stages.validation import BenchmarkValidation

register_schema()
# The VAE stays in eval mode on purpose (it is frozen and only encodes); Lightning would warn about it.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
# stage grpo steps its optimiser itself; checkpoints come after the whole step, so they agree with it.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
log = logging.getLogger("deepgen.train")


def batch_size(batch: dict) -> int:
    return len(batch["captions"] if batch["task"] == "t2i" else batch["instructions"])


def ensure_tiny_zoo(run: RunConfig) -> None:
    root = Path(run.model.vlm_path).parent
    if Path(run.model.dit_path).parent != root:
        raise ValueError("model.build_tiny_zoo needs model.vlm_path and model.dit_path in one folder")
    build_tiny_zoo(root, log=log.info)


def resolve_resume(run: RunConfig, run_dir: Path) -> str | None:
    """`resume`: None, a checkpoint directory, or "auto" (the newest checkpoint of this stage, if any).

    A run folder that already holds checkpoints (a requeued SLURM job, a relaunched sweep job) always
    continues from its own newest one.
    """
    own = run_checkpoint(run_dir)
    if own is not None:
        log.info(f"{run_dir} already has checkpoints: continuing from {own}")
        return str(own)
    if run.resume is None:
        return None
    if run.resume == "auto":
        found = latest_checkpoint(Path(run.output_dir) / run.stage.name)
        log.info(
            f"resume=auto: {'continuing from ' + str(found) if found else 'no checkpoint yet, starting fresh'}"
        )
        return str(found) if found else None
    if not Path(run.resume).is_dir():
        raise FileNotFoundError(f"resume={run.resume} is not a checkpoint directory (or use resume=auto)")
    return run.resume


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    run: RunConfig = OmegaConf.to_object(cfg)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    resume = resolve_resume(run, run_dir)
    cfg.resume = run.resume = resume  # the saved config names the checkpoint actually continued
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    if run.stage.name not in STAGES:
        raise ValueError(f"stage={run.stage.name} is not available; choose one of {sorted(STAGES)}")
    if run.hardware.compile_sampling and run.hardware.strategy == "fsdp2":
        raise ValueError(
            "hardware.compile_sampling=true needs an unsharded model (CUDA graphs of one GPU): "
            "set it false with hardware.strategy=fsdp2"
        )
    if run.hardware.torch_threads:
        torch.set_num_threads(run.hardware.torch_threads)
    L.seed_everything(run.seed, workers=True)
    if run.model.build_tiny_zoo:
        ensure_tiny_zoo(run)

    data = DeepGenDataModule(run.data, run.stage)
    init_from = None if resume else run.init_from  # a resumed run's checkpoint already holds its start
    extra = {}
    if run.stage.name == "grpo":  # rollouts need the image size; manual optimisation clips itself
        extra = dict(
            image_size=run.data.image_size,
            size_unit=run.data.size_unit,
            grad_clip=run.trainer.grad_clip,
            out_dir=run_dir,
        )
    module = STAGES[run.stage.name](
        run.model, run.stage, run.trainer.max_steps, seed=run.seed, init_from=init_from, **extra
    )
    module.configure_model()
    if run.hardware.compile and run.hardware.strategy != "fsdp2":  # fsdp2 compiles while sharding
        compile_blocks(module.backbone)
    if run.hardware.compile_sampling:
        module.backbone.compile_sampling()
    log.info(f"Run folder: {run_dir}\nParameters:\n{module.describe_parameters()}")
    if resume:
        log.info(f"Resuming from {resume}")

    loggers = [instantiate(c, save_dir=str(run_dir)) for c in run.loggers.values()]
    callbacks = [
        StepCheckpoint(
            dirpath=run_dir / "checkpoints",
            filename="step_{step:06d}",
            auto_insert_metric_name=False,
            every_n_train_steps=run.trainer.checkpoint_every_n_steps,
            monitor="step",
            mode="max",
            save_top_k=run.trainer.keep_last_checkpoints,
        ),
        ThroughputMonitor(batch_size_fn=batch_size, window_size=min(20, run.trainer.log_every_n_steps * 2)),
        SampleGridCallback(
            run.sampling, run.data.image_size, run_dir / "samples", run.trainer.sample_every_n_steps
        ),
        DataProgress(data),
        Preemption(run_dir / "checkpoints"),
    ]
    validation = run.validation
    # Off by default: each validation samples validation.limit images per category (96 by default).
    if validation.every_n_steps or validation.at_start or validation.at_end:
        callbacks.append(BenchmarkValidation(validation, run.data.image_size, run_dir / "validation"))
    if module.automatic_optimization:  # grpo logs its held-out reward summary itself
        callbacks.append(LossSummary())
    trainer = L.Trainer(
        accelerator=run.hardware.accelerator,
        devices=run.hardware.devices,
        num_nodes=run.hardware.num_nodes,
        precision=run.hardware.precision,
        strategy=make_strategy(run.hardware),
        max_steps=run.trainer.max_steps,
        gradient_clip_val=run.trainer.grad_clip if module.automatic_optimization else None,
        accumulate_grad_batches=run.trainer.accumulate_grad_batches,
        log_every_n_steps=run.trainer.log_every_n_steps,
        default_root_dir=run_dir,
        logger=loggers or False,
        callbacks=callbacks,
        plugins=[SafeCheckpointIO(), *cluster_plugins(run.hardware)],
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    trainer.fit(module, datamodule=data, ckpt_path=resume)
    wandb.finish()  # end this job's W&B run: the next job of a local --multirun starts its own
    log.info(f"Done. Samples: {run_dir / 'samples'}  Checkpoints: {run_dir / 'checkpoints'}")


if __name__ == "__main__":
    main()
