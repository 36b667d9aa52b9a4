"""MRGRPOModule: MR-GRPO reinforcement learning (stage 3 of DeepGen).

Each optimiser step, per rank:

1. Draw ``prompts_per_step`` prompts from the weighted prompt sets (reproducible from seed and step).
2. Roll out ``group_size`` images per prompt with an SDE sampler (shared initial noise per group),
   keeping every latent and the log-probability of every step (deepgen/diffusion/sde.py).
3. Score the images with each reward its prompt set names; rewards run while later chunks roll out.
4. Advantages: per reward within each group, weighted per prompt set, normalised over the global
   batch, clipped (deepgen/rl/advantages.py).
5. Update on a random ``train_fraction`` of the steps: PPO-clipped ratio of recomputed to rollout
   log-probabilities, plus beta times the velocity KL to a frozen copy of the starting DiT; mixed
   as (1 - lambda) GRPO + lambda SFT with the flow-matching loss of the data batch Lightning hands in.

Only the DiT trains (as the original); VLM, LoRA and bridge stay as the SFT checkpoint left them.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from deepgen.config import GRPOConfig, ModelConfig, StageConfig
from deepgen.diffusion.schedule import inference_sigmas
from deepgen.diffusion.sde import sde_rollout, sde_step, velocity_kl
from deepgen.images import tile_rows, to_uint8
from deepgen.model.backbone import Conditioning
from deepgen.rewards.base import RewardResult
from deepgen.rewards.runner import RetryPolicy, RewardHandle, RewardSet
from deepgen.rl.advantages import combine, global_normalise, group_normalise
from deepgen.rl.prompts import Prompt, PromptSampler, load_prompt_set
from stages.base import StageModule

log = logging.getLogger(__name__)


def plan_chunks(sizes: list[tuple[int, int]], group_size: int, batch: int) -> list[list[tuple[int, int]]]:
    """(prompt, member) pairs in forward passes of at most ``batch`` images of one size each."""
    chunks: list[list[tuple[int, int]]] = []
    for size in sorted(set(sizes)):
        items = [(i, m) for i, s in enumerate(sizes) if s == size for m in range(group_size)]
        chunks += [items[k : k + batch] for k in range(0, len(items), batch)]
    return chunks


@dataclass
class Rollout:
    """One forward pass worth of trajectories."""

    items: list[tuple[int, int]]  # (prompt index, member)
    cond: Conditioning
    uncond: Conditioning | None
    latents: Tensor  # [T + 1, B, C, h, w]
    log_probs: Tensor  # [T, B]
    images: np.ndarray  # [B, H, W, 3] uint8


def _seed(*parts: object) -> int:
    """A 63-bit seed from any parts, stable across processes (unlike hash())."""
    import hashlib

    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


class MRGRPOModule(StageModule):
    def __init__(
        self,
        model_cfg: ModelConfig,
        stage_cfg: StageConfig,
        max_steps: int,
        *,
        seed: int = 0,
        init_from: str | None = None,
        image_size: int = 512,
        size_unit: int = 32,
        grad_clip: float | None = 1.0,
        out_dir: str | Path | None = None,
    ) -> None:
        super().__init__(model_cfg, stage_cfg, max_steps, seed=seed, init_from=init_from)
        self.automatic_optimization = False
        self.grpo: GRPOConfig = stage_cfg.grpo
        self.seed = seed
        self.image_size = image_size
        self.size_unit = size_unit
        self.grad_clip = grad_clip
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.prompt_sampler = PromptSampler.from_configs(self.grpo.prompt_sets, seed)
        self.eval_prompts = [p for c in self.grpo.eval_prompt_sets for p in load_prompt_set(c)]
        used = {
            k
            for c in [*self.grpo.prompt_sets, *self.grpo.eval_prompt_sets]
            for k, w in c.rewards.items()
            if w
        }
        unknown = sorted(used - set(self.grpo.rewards))
        if unknown:
            raise ValueError(
                f"prompt sets use rewards {unknown} that stage.grpo.rewards does not configure "
                f"(configured: {sorted(self.grpo.rewards)})"
            )
        self.reward_names = sorted(used)
        self.rewards: RewardSet | None = None
        self.reference_dit: nn.Module | None = None
        self.eval_history: dict[int, dict[str, float]] = {}

    def check_stage(self, stage_cfg: StageConfig) -> None:
        if stage_cfg.grpo is None:
            raise ValueError("stage grpo needs its stage.grpo settings (see conf/stage/grpo.yaml)")
        if not stage_cfg.train_dit or stage_cfg.train_bridge:
            raise ValueError(
                "stage grpo trains only the DiT: needs stage.train_dit=true, stage.train_bridge=false"
            )
        if stage_cfg.grpo.group_size < 2:
            raise ValueError("stage.grpo.group_size must be >= 2: advantages compare images within a group")

    # ---------------------------------------------------------------------- model and trainables
    def apply_trainable(self) -> None:
        """LoRA is attached (so the SFT checkpoint's adapters load) but frozen: only the DiT trains."""
        super().apply_trainable()
        self.backbone.vlm.requires_grad_(False)

    def on_weights_ready(self) -> None:
        """The KL reference: a frozen copy of the DiT as the run starts (saved with checkpoints, so a
        resumed run keeps the same reference)."""
        self.reference_dit = copy.deepcopy(self.backbone.dit).requires_grad_(False).eval()

    def required_names(self) -> list[str]:
        reference = [n for n, _ in self.named_parameters() if n.startswith("reference_dit.")]
        return self.trainable_names() + reference

    def lr_multiplier(self, step: int) -> float:
        """Constant after a linear warmup of ``warmup_steps`` (original: constant_with_warmup, 20)."""
        return min(1.0, (step + 1) / max(1, self.grpo.warmup_steps))

    def _set_modes(self) -> None:
        """Frozen parts in eval mode (no LoRA dropout in the conditioning); Lightning sets train()."""
        bb = self.backbone
        bb.eval()
        bb.dit.train()
        self.reference_dit.eval()

    # ----------------------------------------------------------------------------------- rewards
    def on_train_start(self) -> None:
        g = self.grpo
        self.rewards = RewardSet(
            {name: dict(g.rewards[name]) for name in self.reward_names},
            num_workers=g.reward_workers,
            retry=RetryPolicy(max_retries=g.reward_retries),
            torch_threads=1,
        )
        if self.global_step == 0 and self.eval_prompts:
            self.run_eval()

    def on_train_end(self) -> None:
        if self.eval_prompts and self.global_step not in self.eval_history:
            self.run_eval()
        if len(self.eval_history) >= 2 and self.trainer.is_global_zero:
            first, last = min(self.eval_history), max(self.eval_history)
            start, end = self.eval_history[first], self.eval_history[last]
            log.info(
                f"Held-out reward (ODE, CFG {self.grpo.eval_cfg_scale}): step {first} {start['combined']:.4f} "
                f"-> step {last} {end['combined']:.4f}"
            )
            if "rollout/combined" in end:
                log.info(
                    f"Held-out reward (rollout sampler): step {first} {start['rollout/combined']:.4f} "
                    f"-> step {last} {end['rollout/combined']:.4f}"
                )
        if self.rewards is not None:
            self.rewards.close()

    def submit_rewards(
        self, prompts: list[Prompt], items: list[tuple[int, int]], images: np.ndarray
    ) -> RewardHandle:
        """Start scoring one chunk with every reward (in the reward workers when there are any)."""
        return self.rewards.submit(
            list(images),
            [prompts[i].text for i, _ in items],
            [prompts[i].metadata for i, _ in items],
            [i for i, _ in items],
        )

    def collect_rewards(
        self, prompts: list[Prompt], chunks: list[list[tuple[int, int]]], handles: list[RewardHandle]
    ) -> tuple[dict[str, RewardResult], dict[str, float]]:
        """Wait for every chunk's scores. A reward counts only where the prompt's set weights it: other
        samples are invalid for it. Also returns the runners' counters (failures, seconds), summed."""
        scores = {name: [] for name in self.reward_names}
        valid = {name: [] for name in self.reward_names}
        counters: dict[str, float] = {}
        for items, handle in zip(chunks, handles, strict=True):
            out = handle.result()
            for name in self.reward_names:
                applies = np.array([bool(prompts[i].reward_weights.get(name, 0)) for i, _ in items])
                scores[name].append(out.results[name].scores)
                valid[name].append(out.results[name].valid & applies)
            for key, value in out.metrics().items():
                counters[key] = counters.get(key, 0.0) + value
        results = {
            name: RewardResult(np.concatenate(scores[name]), np.concatenate(valid[name]))
            for name in self.reward_names
        }
        return results, counters

    # ---------------------------------------------------------------------------------- sampling
    def velocity_fn(self, cond: Conditioning, uncond: Conditioning | None, dit: nn.Module | None = None):
        """``(x, sigma) -> v`` for one chunk: conditional only, or CFG when ``uncond`` is given."""
        return self.backbone.guided_velocity_fn(cond, uncond, self.grpo.cfg_scale, dit=dit)

    @torch.no_grad()
    def sample_rollout(
        self, prompts: list[Prompt], items: list[tuple[int, int]], x: Tensor, generator: torch.Generator
    ) -> Rollout:
        """One chunk sampled as the rollouts are, from initial noise ``x``: SDE trajectory with its
        log-probabilities, conditional only or with CFG (the empty prompt) when cfg_scale > 1."""
        g = self.grpo
        bb = self.backbone
        texts = [prompts[i].text for i, _ in items]
        cond = bb.condition_t2i(texts)
        uncond = bb.condition_t2i([""] * len(texts)) if g.cfg_scale > 1 else None
        sigmas = inference_sigmas(bb.scheduler, g.num_steps).to(bb.device)
        latents, log_probs = sde_rollout(self.velocity_fn(cond, uncond), x, sigmas, g.sde, g.eta, generator)
        return Rollout(items, cond, uncond, latents, log_probs, to_uint8(bb.decode_latents(latents[-1])))

    @torch.no_grad()
    def rollout(
        self, prompts: list[Prompt], step: int
    ) -> tuple[list[Rollout], dict[str, RewardResult], dict]:
        g = self.grpo
        bb = self.backbone
        gen = torch.Generator(device=bb.device).manual_seed(
            _seed("rollout", self.seed, step, self.global_rank)
        )
        sizes = [p.size(self.image_size, self.size_unit) for p in prompts]
        noise = []
        for w, h in sizes:
            shape = (1 if g.same_noise else g.group_size, *bb.latent_shape(h, w))
            noise.append(torch.randn(shape, generator=gen, device=bb.device).expand(g.group_size, *shape[1:]))
        rollouts, handles = [], []
        chunks = plan_chunks(sizes, g.group_size, g.rollout_batch_size)
        start = time.perf_counter()
        for items in chunks:
            x = torch.stack([noise[i][m] for i, m in items])
            rollout = self.sample_rollout(prompts, items, x, gen)
            handles.append(self.submit_rewards(prompts, items, rollout.images))
            rollouts.append(rollout)
        rollout_time = time.perf_counter() - start
        results, counters = self.collect_rewards(prompts, chunks, handles)
        wait = time.perf_counter() - start - rollout_time
        return rollouts, results, {"time/rollout": rollout_time, "time/reward_wait": wait, **counters}

    # ---------------------------------------------------------------------------------- training
    def advantages(
        self, prompts: list[Prompt], rollouts: list[Rollout], results: dict[str, RewardResult]
    ) -> tuple[Tensor, Tensor, dict[str, float]]:
        items = [it for r in rollouts for it in r.items]
        groups = torch.tensor([i for i, _ in items])
        per, weights, metrics = {}, {}, {}
        combined = np.zeros(len(items))
        for name in self.reward_names:
            res = results[name]
            per[name] = group_normalise(torch.from_numpy(res.scores), torch.from_numpy(res.valid), groups)
            w = np.array([prompts[i].reward_weights.get(name, 0.0) for i, _ in items])
            weights[name] = torch.from_numpy(w)
            applies = w != 0
            ok = res.valid & applies
            combined += np.where(ok, w * res.scores, 0.0)
            if ok.any():
                metrics[f"reward/{name}/mean"] = float(res.scores[ok].mean())
                metrics[f"reward/{name}/std"] = float(res.scores[ok].std())
            metrics[f"reward/{name}/invalid"] = float((applies & ~res.valid).sum())
            if per[name].groups:
                metrics[f"reward/{name}/zero_std_groups"] = per[name].zero_std_groups / per[name].groups
        adv, mask = combine(per, weights)
        adv = global_normalise(adv, mask, self.grpo.adv_clip)
        metrics["reward/combined"] = float(combined.mean())
        if mask.any():
            a = adv[mask]
            metrics.update(
                {
                    "adv/mean": float(a.mean()),
                    "adv/std": float(a.std()) if a.numel() > 1 else 0.0,
                    "adv/min": float(a.min()),
                    "adv/max": float(a.max()),
                    "adv/clipped": float((a.abs() >= self.grpo.adv_clip).double().mean()),
                }
            )
        metrics["adv/usable"] = float(mask.double().mean())
        return adv.float(), mask, metrics

    def trained_steps(self, step: int) -> list[int]:
        """int(num_steps * train_fraction) of the first num_steps - 1 steps, drawn anew each step."""
        g = self.grpo
        count = min(g.num_steps - 1, int(g.num_steps * g.train_fraction))
        gen = torch.Generator().manual_seed(_seed("train-steps", self.seed, step))
        return sorted(torch.randperm(g.num_steps - 1, generator=gen)[:count].tolist())

    def grpo_backward(self, rollouts: list[Rollout], adv: Tensor, mask: Tensor, steps: list[int]) -> dict:
        """Backward of (1 - lambda) * (policy + beta * KL), averaged over trained steps and samples."""
        g = self.grpo
        bb = self.backbone
        sigmas = inference_sigmas(bb.scheduler, g.num_steps).to(bb.device)
        sub = float(sigmas[1])  # flow_grpo's stand-in for sigma = 1, as in the rollout
        total = sum(len(r.items) for r in rollouts)
        usable = max(1, int(mask.sum()))
        scale = (1 - g.sft_aux_coef) / len(steps)
        sums = {"policy": 0.0, "kl": 0.0, "clipped": 0.0}
        ratios = []
        offset = 0
        for r in rollouts:
            n = len(r.items)
            a, m = adv[offset : offset + n].to(bb.device), mask[offset : offset + n].to(bb.device)
            offset += n
            policy_v = self.velocity_fn(r.cond, r.uncond)
            reference_v = self.velocity_fn(r.cond, r.uncond, dit=self.reference_dit)
            for j in steps:
                x, sigma, sigma_next = r.latents[j], sigmas[j], sigmas[j + 1]
                v = policy_v(x, sigma)
                out = sde_step(
                    g.sde, v, x, sigma, sigma_next, eta=g.eta, prev_sample=r.latents[j + 1], sigma_max_sub=sub
                )
                ratio = torch.exp(out.log_prob - r.log_probs[j])
                clipped = ratio.clamp(1 - g.clip_range, 1 + g.clip_range)
                per_sample = torch.maximum(-a * ratio, -a * clipped)
                policy = (per_sample * m).sum() / usable
                with torch.no_grad():
                    v_ref = reference_v(x, sigma)
                kl = velocity_kl(v.float(), v_ref.float(), out.kl_std).sum() / total
                self.manual_backward(scale * (policy + g.kl_beta * kl))
                sums["policy"] += float(policy.detach()) / len(steps)
                sums["kl"] += float(kl.detach()) / len(steps)
                sel = ratio.detach()[m]
                sums["clipped"] += float(((sel - 1).abs() > g.clip_range).sum()) / (usable * len(steps))
                ratios.append(sel.cpu())
        ratio_all = torch.cat(ratios) if ratios else torch.ones(1)
        return {
            "loss/policy": sums["policy"],
            "kl": sums["kl"],
            "clip_frac": sums["clipped"],
            "ratio/mean": float(ratio_all.mean()),
            "ratio/min": float(ratio_all.min()),
            "ratio/max": float(ratio_all.max()),
        }

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        g = self.grpo
        step = self.global_step
        opt = self.optimizers()
        scheduler = self.lr_schedulers()
        self._set_modes()
        params = [p for p in self.parameters() if p.requires_grad]

        prompts = self.prompt_sampler.draw(step, self.global_rank, g.prompts_per_step)
        rollouts, results, metrics = self.rollout(prompts, step)
        adv, mask, adv_metrics = self.advantages(prompts, rollouts, results)
        metrics.update(adv_metrics)

        start = time.perf_counter()
        sft = self.task_loss(batch)
        self.manual_backward(g.sft_aux_coef * sft)
        metrics["grad_norm/sft_aux"] = _grad_norm(params)
        metrics.update(self.grpo_backward(rollouts, adv, mask, self.trained_steps(step)))
        metrics["grad_norm/total"] = _grad_norm(params)
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        scheduler.step()
        metrics["time/update"] = time.perf_counter() - start
        metrics["loss/sft_aux"] = float(sft.detach())
        metrics["lr"] = opt.param_groups[0]["lr"]

        sync = dict(batch_size=len(prompts) * g.group_size, sync_dist=self.trainer.world_size > 1)
        shown = ("reward/combined", "kl")
        self.log_dict({k: metrics[k] for k in shown}, prog_bar=True, **sync)
        self.log_dict({k: v for k, v in metrics.items() if k not in shown}, **sync)
        every = g.log_images_every_n_steps
        if every and step % every == 0 and self.trainer.is_global_zero:
            self.log_rollout_grid(prompts, rollouts, results, step)
        if g.eval_every_n_steps and step and step % g.eval_every_n_steps == 0:
            self.run_eval()
        return torch.tensor(metrics["loss/policy"])

    # ---------------------------------------------------------------------------------- logging
    def log_rollout_grid(
        self, prompts: list[Prompt], rollouts: list[Rollout], results: dict[str, RewardResult], step: int
    ) -> None:
        """Up to four groups, one row each, with their prompt and per-reward scores as the caption."""
        images = {it: img for r in rollouts for it, img in zip(r.items, r.images, strict=True)}
        flat = [it for r in rollouts for it in r.items]
        shown = list(dict.fromkeys(i for i, _ in flat))[:4]
        rows, lines = [], []
        for i in shown:
            rows.append([images[(i, m)] for m in range(self.grpo.group_size)])
            parts = []
            for name in self.reward_names:
                res = results[name]
                scores = [
                    res.scores[k] if res.valid[k] else float("nan") for k, it in enumerate(flat) if it[0] == i
                ]
                if prompts[i].reward_weights.get(name, 0):
                    parts.append(f"{name}: " + " ".join(f"{s:.2f}" for s in scores))
            lines.append(f"{prompts[i].text} | " + "; ".join(parts))
        grid = tile_rows(rows)
        caption = "\n".join(lines)
        if self.out_dir is not None:
            folder = self.out_dir / "rollouts"
            folder.mkdir(parents=True, exist_ok=True)
            grid.save(folder / f"step_{step:06d}.png")
            (folder / f"step_{step:06d}.txt").write_text(caption + "\n")
        for logger in self.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image("rollouts/grid", images=[np.asarray(grid)], caption=[caption], step=step)

    # ------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, prompts: list[Prompt], sampler: str = "ode") -> dict[str, float]:
        """Mean reward on held-out prompts, one image each: "ode" samples as the original evaluates (Euler
        ODE, ``eval_num_steps``, ``eval_cfg_scale``), "rollout" as the rollouts do (SDE, ``num_steps``,
        ``cfg_scale``), the sampler whose reward RL maximises."""
        g = self.grpo
        bb = self.backbone
        was_training = self.training
        self.eval()
        sizes = [p.size(self.image_size, self.size_unit) for p in prompts]
        handles = []
        order: list[int] = []
        chunks = plan_chunks(sizes, 1, g.rollout_batch_size)
        for chunk in chunks:
            idx = [i for i, _ in chunk]
            w, h = sizes[idx[0]]
            texts = [prompts[i].text for i in idx]
            gen = torch.Generator(device=bb.device).manual_seed(_seed("eval", self.seed, idx[0]))
            if sampler == "rollout":
                x = torch.randn((len(texts), *bb.latent_shape(h, w)), generator=gen, device=bb.device)
                images = self.sample_rollout(prompts, chunk, x, gen).images
            else:
                cond, uncond = bb.condition_t2i(texts), bb.condition_t2i([""] * len(texts))
                images = to_uint8(
                    bb.sample(
                        cond,
                        uncond,
                        h,
                        w,
                        num_steps=g.eval_num_steps,
                        cfg_scale=g.eval_cfg_scale,
                        generator=gen,
                    )
                )
            handles.append(self.submit_rewards(prompts, chunk, images))
            order += idx
        results, _ = self.collect_rewards(prompts, chunks, handles)
        self.train(was_training)
        metrics: dict[str, float] = {}
        combined = np.zeros(len(order))
        for name in self.reward_names:
            res = results[name]
            w = np.array([prompts[i].reward_weights.get(name, 0.0) for i in order])
            ok = res.valid & (w != 0)
            combined += np.where(ok, w * res.scores, 0.0)
            if ok.any():
                metrics[name] = float(res.scores[ok].mean())
            for set_name in sorted({prompts[i].set_name for i in order}):
                in_set = ok & np.array([prompts[i].set_name == set_name for i in order])
                if in_set.any():
                    metrics[f"{set_name}/{name}"] = float(res.scores[in_set].mean())
        metrics["combined"] = float(combined.mean())
        return metrics

    def run_eval(self) -> None:
        step = self.global_step
        start = time.perf_counter()
        metrics = self.evaluate(self.eval_prompts)
        if self.grpo.eval_rollout_sampler:
            rollout = self.evaluate(self.eval_prompts, sampler="rollout")
            metrics.update({f"rollout/{k}": v for k, v in rollout.items()})
        self.eval_history[step] = metrics
        seconds = time.perf_counter() - start
        if self.trainer.is_global_zero:
            log.info(f"Held-out eval at step {step} ({seconds:.0f} s): " + json.dumps(metrics))
            if self.out_dir is not None:
                folder = self.out_dir / "eval"
                folder.mkdir(parents=True, exist_ok=True)
                (folder / f"step_{step:06d}.json").write_text(json.dumps(metrics, indent=2) + "\n")
            for logger in self.loggers:
                logger.log_metrics({f"eval/{k}": v for k, v in metrics.items()}, step=step)


def _grad_norm(params: list[Tensor]) -> float:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    norm = torch.nn.utils.get_total_norm(grads)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
