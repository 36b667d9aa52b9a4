"""MRGRPOModule on the tiny zoo: rollouts, on-policy ratios, what trains, failures, checkpoints."""

from __future__ import annotations

import json

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from deepgen.config import GRPOConfig, LoraConfig, PromptSetConfig, StageConfig
from deepgen.data.tiny_world import draw_sample_meta
from deepgen.diffusion.schedule import inference_sigmas
from deepgen.diffusion.sde import sde_step
from deepgen.io.checkpoints import load_checkpoint_dir, save_checkpoint_dir
from deepgen.rewards.base import REWARDS, RewardResult, register_reward
from deepgen.rewards.runner import RetryPolicy, RewardSet
from stages.checkpoint_io import SafeCheckpointIO
from stages.grpo import MRGRPOModule, plan_chunks

if "test_brightness" not in REWARDS:

    @register_reward("test_brightness")
    class Brightness:
        """Mean pixel value: a reward any policy can move."""

        name = "test_brightness"

        def __call__(self, images, prompts, metadata, group_ids) -> RewardResult:
            return RewardResult(np.array([img.mean() / 255 for img in images]), np.ones(len(images), bool))

    @register_reward("test_failing")
    class Failing:
        name = "test_failing"

        def __call__(self, images, prompts, metadata, group_ids) -> RewardResult:
            raise ConnectionError("reward service down")


def prompt_file(tmp_path, n: int = 4) -> str:
    lines = [json.dumps(draw_sample_meta("t2i", "general", "train", 0, i)) for i in range(n)]
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def grpo_stage(tmp_path, weights: dict[str, float], **overrides) -> StageConfig:
    path = prompt_file(tmp_path)
    settings = dict(
        prompts_per_step=2,
        group_size=3,
        rollout_batch_size=4,  # 6 images: chunks of 4 and 2, a group split across chunks
        num_steps=4,
        train_fraction=0.5,
        prompt_sets=[PromptSetConfig(name="general", path=path, rewards=weights)],
        rewards={name: {} for name in weights},
        eval_prompt_sets=[PromptSetConfig(name="general", path=path, rewards=weights)],
        eval_num_steps=2,
        log_images_every_n_steps=1,
        warmup_steps=1,
    )
    settings.update(overrides)
    return StageConfig(
        name="grpo",
        train_bridge=False,
        train_dit=True,
        lora=LoraConfig(rank=4, alpha=8),
        grpo=GRPOConfig(**settings),
    )


def build(tiny_model_cfg, stage: StageConfig, tmp_path) -> MRGRPOModule:
    module = MRGRPOModule(tiny_model_cfg, stage, max_steps=3, image_size=64, out_dir=tmp_path / "run")
    module.configure_model()
    module.rewards = RewardSet({n: {} for n in module.reward_names}, retry=RetryPolicy(0, 0.0))
    module.manual_backward = lambda loss: loss.backward()  # no trainer in these unit tests
    return module


def test_plan_chunks_groups_sizes_and_limits_batch():
    chunks = plan_chunks([(64, 64), (96, 64), (64, 64)], group_size=3, batch=4)
    assert chunks == [[(0, 0), (0, 1), (0, 2), (2, 0)], [(2, 1), (2, 2)], [(1, 0), (1, 1), (1, 2)]]


def test_rollout_is_on_policy_and_only_the_dit_learns(tiny_model_cfg, tmp_path):
    module = build(
        tiny_model_cfg, grpo_stage(tmp_path, {"test_brightness": 1.0, "tiny_world": 0.5}), tmp_path
    )
    prompts = module.prompt_sampler.draw(0, 0, 2)
    rollouts, results, metrics = module.rollout(prompts, step=0)
    assert [len(r.items) for r in rollouts] == [4, 2]
    assert rollouts[0].latents.shape[:2] == (5, 4) and rollouts[0].log_probs.shape == (4, 4)
    first = {it: r.latents[0, k] for r in rollouts for k, it in enumerate(r.items)}
    assert torch.equal(first[(0, 0)], first[(0, 2)])  # a group shares its initial noise
    assert not torch.equal(first[(0, 0)], first[(1, 0)])
    assert set(results) == {"test_brightness", "tiny_world"} and results["tiny_world"].valid.all()

    adv, mask, adv_metrics = module.advantages(prompts, rollouts, results)
    assert mask.all() and adv.abs().max() <= 5 and abs(float(adv.mean())) < 1e-5
    reference = {k: v.clone() for k, v in module.reference_dit.state_dict().items()}
    out = module.grpo_backward(rollouts, adv, mask, module.trained_steps(0))
    # recomputed log-probabilities equal the rollout's: the ratio is exactly 1, nothing is clipped
    assert out["ratio/min"] == out["ratio/max"] == 1.0 and out["clip_frac"] == 0.0
    assert out["kl"] == 0.0  # the policy still equals its reference
    grads = {n for n, p in module.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and all(n.startswith("backbone.dit.") for n in grads)
    assert all(torch.equal(v, module.reference_dit.state_dict()[k]) for k, v in reference.items())
    assert module.trained_steps(0) == module.trained_steps(0) and len(module.trained_steps(0)) == 2


def test_a_failing_reward_is_invalid_and_counted_not_zero(tiny_model_cfg, tmp_path):
    module = build(
        tiny_model_cfg, grpo_stage(tmp_path, {"test_brightness": 1.0, "test_failing": 1.0}), tmp_path
    )
    prompts = module.prompt_sampler.draw(0, 0, 2)
    rollouts, results, metrics = module.rollout(prompts, step=0)
    assert not results["test_failing"].valid.any()
    assert metrics["reward_stats/test_failing/failed_calls"] == 2  # one per chunk
    adv, mask, adv_metrics = module.advantages(prompts, rollouts, results)
    assert adv_metrics["reward/test_failing/invalid"] == 6
    assert "reward/test_failing/mean" not in adv_metrics
    # the advantages are those of the working reward alone
    only = build(tiny_model_cfg, grpo_stage(tmp_path, {"test_brightness": 1.0}), tmp_path)
    only_adv, _, _ = only.advantages(prompts, rollouts, {"test_brightness": results["test_brightness"]})
    assert torch.allclose(adv, only_adv)


def test_stage_checks(tiny_model_cfg, tmp_path):
    stage = grpo_stage(tmp_path, {"tiny_world": 1.0})
    stage.train_bridge = True
    with pytest.raises(ValueError, match="trains only the DiT"):
        MRGRPOModule(tiny_model_cfg, stage, max_steps=1)
    stage = grpo_stage(tmp_path, {"tiny_world": 1.0}, rewards={})
    with pytest.raises(
        ValueError, match=r"rewards \['tiny_world'\] that stage.grpo.rewards does not configure"
    ):
        MRGRPOModule(tiny_model_cfg, stage, max_steps=1)


def aux_batches(n: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    batch = {"task": "t2i", "images": torch.rand(2, 3, 64, 64, generator=g) * 2 - 1, "captions": ["a", "b"]}
    return [batch] * n


def test_fit_logs_evaluates_and_checkpoints_the_reference(tiny_model_cfg, tmp_path):
    stage = grpo_stage(tmp_path, {"test_brightness": 1.0, "tiny_world": 0.5}, eval_rollout_sampler=True)
    module = MRGRPOModule(tiny_model_cfg, stage, max_steps=3, image_size=64, out_dir=tmp_path / "run")
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=L.pytorch.loggers.CSVLogger(tmp_path),
        enable_checkpointing=False,
        enable_progress_bar=False,
        log_every_n_steps=1,
        plugins=[SafeCheckpointIO()],
        default_root_dir=tmp_path,
    )
    trainer.fit(module, DataLoader(aux_batches(2), batch_size=None))
    assert trainer.global_step == 2
    assert sorted(module.eval_history) == [0, 2]  # held-out eval at the start and the end
    assert (tmp_path / "run/eval/step_000000.json").is_file() and (
        tmp_path / "run/eval/step_000002.json"
    ).is_file()
    assert (tmp_path / "run/rollouts/step_000000.png").is_file()
    caption = (tmp_path / "run/rollouts/step_000000.txt").read_text()
    assert "test_brightness:" in caption and "tiny_world:" in caption
    metrics = (tmp_path / "lightning_logs/version_0/metrics.csv").read_text().splitlines()[0]
    for key in (
        "reward/test_brightness/mean",
        "reward/combined",
        "adv/std",
        "kl",
        "clip_frac",
        "ratio/mean",
        "loss/sft_aux",
        "grad_norm/total",
        "time/rollout",
        "eval/combined",
        "eval/rollout/combined",  # eval_rollout_sampler: also scored as the rollouts sample
    ):
        assert key in metrics, key
    policy, reference = module.backbone.dit.pos_embed.proj.weight, module.reference_dit.pos_embed.proj.weight
    assert not torch.equal(policy, reference)  # the policy moved, its reference did not

    path = tmp_path / "step.ckpt"
    trainer.save_checkpoint(path)
    saved = load_checkpoint_dir(path)["state_dict"]
    assert any(k.startswith("reference_dit.") for k in saved)
    frozen = ("backbone.vlm.", "backbone.bridge.")  # LoRA and bridge stay as the SFT checkpoint left them
    assert not any(k.startswith(frozen) for k in saved)


def test_held_out_eval_can_sample_as_the_rollouts_do(tiny_model_cfg, tmp_path):
    """sampler="rollout" uses the rollouts' SDE, steps and guidance: with eta 0 and no CFG it is the
    ODE evaluation at CFG 1 over the same steps and noise; with the SDE's noise it is not."""
    torch.manual_seed(0)
    stage = grpo_stage(
        tmp_path, {"test_brightness": 1.0}, eta=0.0, cfg_scale=0.0, eval_cfg_scale=1.0, eval_num_steps=4
    )
    module = build(tiny_model_cfg, stage, tmp_path)
    torch.nn.init.normal_(
        module.backbone.bridge.seq_head.weight
    )  # zero-initialised: prompts would not matter
    prompts = module.eval_prompts
    ode = module.evaluate(prompts)
    assert module.evaluate(prompts, sampler="rollout") == pytest.approx(ode, abs=2e-3)
    module.grpo.eta = 1.0
    noisy = module.evaluate(prompts, sampler="rollout")["combined"]
    assert abs(noisy - ode["combined"]) > 1e-3
    assert module.evaluate(prompts, sampler="rollout")["combined"] == noisy  # seeded like the ODE evaluation


def test_resume_continues_exactly(tiny_model_cfg, tmp_path):
    """Prompts, rollout noise and trained steps come from (seed, step), and checkpoints carry the frozen
    weights init_from brought: a run resumed without init_from matches the uninterrupted one."""
    stage = grpo_stage(tmp_path, {"test_brightness": 1.0}, eval_prompt_sets=[], log_images_every_n_steps=0)
    torch.manual_seed(7)
    sft = MRGRPOModule(tiny_model_cfg, stage, max_steps=3)
    sft.configure_model()
    sft_weights = ("backbone.think_tokens", "backbone.bridge.", "lora_")  # what an SFT checkpoint adds
    frozen = {
        n: p.detach()
        for n, p in sft.named_parameters()
        if n.startswith(sft_weights[:2]) or sft_weights[2] in n
    }
    save_checkpoint_dir({"state_dict": frozen}, tmp_path / "sft.ckpt")

    def fit(steps: int, init_from=None, ckpt=None, save=None) -> MRGRPOModule:
        module = MRGRPOModule(tiny_model_cfg, stage, max_steps=3, image_size=64, init_from=init_from)
        trainer = L.Trainer(
            accelerator="cpu",
            max_steps=steps,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            plugins=[SafeCheckpointIO()],
            default_root_dir=tmp_path,
        )
        # its own generator, as the data module's: creating the iterator must not draw from the global RNG
        loader = DataLoader(aux_batches(3), batch_size=None, generator=torch.Generator())
        trainer.fit(module, loader, ckpt_path=ckpt)
        if save is not None:
            trainer.save_checkpoint(save)
        return module

    torch.manual_seed(0)
    straight = fit(3, init_from=str(tmp_path / "sft.ckpt"))
    torch.manual_seed(0)
    fit(2, init_from=str(tmp_path / "sft.ckpt"), save=tmp_path / "half.ckpt")
    assert set(frozen) <= set(load_checkpoint_dir(tmp_path / "half.ckpt")["state_dict"])
    torch.manual_seed(123)  # other random init: the checkpoint must restore weights and random state
    resumed = fit(3, ckpt=tmp_path / "half.ckpt")
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters(), strict=True):
        if not name.startswith("backbone.vae."):
            assert torch.allclose(a, b, atol=1e-6), name


def test_an_update_makes_favoured_trajectories_likelier(tiny_model_cfg, tmp_path):
    """The policy gradient's sign: one small gradient step on grpo_backward's loss, with advantage +1 for
    half of the images and -1 for the rest, raises the advantage-weighted sum of their recomputed
    log-probabilities. A sign slip in the loss, the ratio or the log-probabilities lowers it."""
    module = build(tiny_model_cfg, grpo_stage(tmp_path, {"test_brightness": 1.0}), tmp_path)
    g = module.grpo
    rollouts, _, _ = module.rollout(module.prompt_sampler.draw(0, 0, 2), step=0)
    steps = module.trained_steps(0)
    sigmas = inference_sigmas(module.backbone.scheduler, g.num_steps)

    @torch.no_grad()
    def log_probs() -> torch.Tensor:
        """Per image, the log-probability of its trajectory over the trained steps, under today's DiT."""
        total = []
        for r in rollouts:
            velocity = module.velocity_fn(r.cond, r.uncond)
            per_step = [
                sde_step(
                    g.sde,
                    velocity(r.latents[j], sigmas[j]),
                    r.latents[j],
                    sigmas[j],
                    sigmas[j + 1],
                    eta=g.eta,
                    prev_sample=r.latents[j + 1],
                    sigma_max_sub=float(sigmas[1]),
                ).log_prob
                for j in steps
            ]
            total.append(torch.stack(per_step).sum(0))
        return torch.cat(total)

    before = log_probs()
    adv = torch.tensor([1.0, -1.0]).repeat(len(before) // 2)
    module.grpo_backward(rollouts, adv, torch.ones(len(adv), dtype=torch.bool), steps)
    with torch.no_grad():
        for p in module.parameters():
            if p.grad is not None:
                p -= 1e-2 * p.grad
    gain = float((adv * (log_probs() - before)).sum())
    assert gain > 0, gain
