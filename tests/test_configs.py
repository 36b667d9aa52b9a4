from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue

from deepgen.config import RunConfig
from stages.schema import register_schema

CONF = Path(__file__).resolve().parents[1] / "conf"
register_schema()


def compose_train(*overrides: str):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def test_default_is_tiny_sft_on_cpu_with_the_tiny_recipe():
    run = OmegaConf.to_object(compose_train())
    assert isinstance(run, RunConfig)
    assert (run.stage.name, run.model.name, run.data.name, run.hardware.accelerator) == (
        "sft",
        "tiny",
        "tiny_world",
        "cpu",
    )
    assert run.stage.optim.lr == 1e-3 and run.trainer.max_steps == 600  # conf/recipe/tiny_sft.yaml
    assert run.stage.lora.rank == 64 and run.stage.train_dit and run.stage.train_bridge
    assert set(run.loggers) == {"wandb", "csv"}


@pytest.mark.parametrize("group", ["model", "data", "hardware", "logger", "stage"])
def test_every_option_of_every_group_composes(group):
    for option in sorted((CONF / group).glob("*.yaml")):
        cfg = compose_train(f"{group}={option.stem}")
        assert cfg is not None


def test_mistyped_key_fails_with_its_name():
    with pytest.raises(ConfigCompositionException, match="stage.lrr"):
        compose_train("stage.lrr=1")


def test_full_size_model_requires_its_paths():
    cfg = compose_train("model=deepgen_5b")
    with pytest.raises(MissingMandatoryValue, match="vlm_path"):
        OmegaConf.to_object(cfg)
    run = OmegaConf.to_object(compose_train("model=deepgen_5b", "model.vlm_path=/v", "model.dit_path=/d"))
    assert run.model.num_think_tokens == 128 and run.model.bridge.num_layers == 6
    assert run.stage.optim.lr == 5e-5  # the original SFT lr: no tiny recipe for the real model


def test_mixture_config_is_typed():
    overrides = [f"data.datasets.{i}.shards=/d{i}" for i in range(3)]
    run = OmegaConf.to_object(compose_train("data=mixture", *overrides))
    assert [(d.name, d.task, d.weight) for d in run.data.datasets] == [
        ("captions", "t2i", 3.0),
        ("curated", "t2i", 1.0),
        ("edits", "edit", 1.0),
    ]
    with pytest.raises(ConfigCompositionException, match="wieght"):
        compose_train("data=mixture", "data.datasets.0.wieght=2")


def test_grpo_stage_has_the_original_settings_and_the_tiny_recipe():
    real = OmegaConf.to_object(
        compose_train("stage=grpo", "model=deepgen_5b", "model.vlm_path=/v", "model.dit_path=/d")
    )
    g = real.stage.grpo
    assert (g.group_size, g.num_steps, g.train_fraction, g.clip_range, g.kl_beta) == (8, 50, 0.6, 1e-4, 5e-7)
    assert (g.sft_aux_coef, g.adv_clip, g.cfg_scale, g.eval_cfg_scale, g.warmup_steps) == (
        1e-4,
        5.0,
        0.0,
        4.0,
        20,
    )
    assert real.stage.optim.lr == 2e-6 and tuple(real.stage.optim.betas) == (0.9, 0.999)
    assert (real.stage.train_dit, real.stage.train_bridge, real.stage.edit_per_cycle) == (True, False, 0)
    weights = {s.name: s.weight for s in g.prompt_sets}
    assert weights == {"general": 1.0, "reasoning": 1.0, "text_rendering": 3.0}  # text rendering 3x
    assert g.prompt_sets[0].path == real.data.shards_dir
    tiny = OmegaConf.to_object(compose_train("stage=grpo")).stage
    assert (tiny.optim.lr, tiny.grpo.num_steps) == (1e-4, 20)  # conf/recipe/tiny_grpo.yaml
    assert tiny.grpo.eval_rollout_sampler and not g.eval_rollout_sampler  # tiny: both samplers scored
