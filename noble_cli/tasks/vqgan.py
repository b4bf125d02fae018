"""Transformer VQGAN image tokenizer (recipes vqgan-tiny on Fashion-MNIST, vqgan-imagenet).

Generator loss: reconstruction (L2 or L1, on images scaled to [-1, 1]) + codebook loss + beta * commitment loss
(+ disc_weight * hinge generator loss once the discriminator has started at `disc_start`). The patch
discriminator has its own AdamW, so the task uses Lightning's manual optimization: the generator's optimizer is the
base task's AdamW with NOBLE's lr groups and schedule; the discriminator's optimizer steps outside Lightning's step
counter, so `trainer.global_step` (max_steps, metrics.csv) counts generator steps.

Logged per step: train_loss (the reconstruction loss, the same quantity as eval_loss), train_psnr, perplexity,
codebook usage, vq and adversarial losses. Eval: eval_loss (reconstruction loss, what reports compare), eval_psnr
(dB on [0, 1] images), eval_perplexity and eval_usage of the codebook.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from noble_cli.config import ConfigModel, RunConfig, Str
from noble_cli.errors import NobleError
from noble_cli.models.vqgan import (
    VQGAN,
    PatchDiscriminator,
    VQGANConfig,
    hinge_d_loss,
    psnr,
)
from noble_cli.tasks.base import NobleTask
from noble_cli.tasks.spec import Task


class ImageData(ConfigModel):
    """Images to reconstruct."""

    dataset: Str = "fashion-mnist"
    """fashion-mnist | cifar10 | cifar100 | imagenet | hf:NAME | a path to an ImageFolder."""
    root: Str | None = None
    flip: bool = True
    """Random horizontal flips when training."""
    download: bool = True
    """CIFAR only: download when missing (needs network)."""


class VQGANModule(NobleTask):
    items_name = "images"

    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        self.automatic_optimization = False
        m = self.model_cfg
        # Outside self.model: not counted in the model's parameters, never given NOBLE branches.
        self.discriminator = (PatchDiscriminator(m.in_channels, m.disc_channels, m.disc_layers)
                              if m.disc_weight > 0 else None)

    def make_model(self, model_cfg: VQGANConfig) -> VQGAN:
        return VQGAN(model_cfg)

    # --- losses ---------------------------------------------------------------------------------------------------
    @staticmethod
    def inputs(batch) -> torch.Tensor:
        """Images in [0, 1] from the loader -> [-1, 1]."""
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        return images * 2.0 - 1.0

    def reconstruction_loss(self, recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        fn = F.l1_loss if self.model_cfg.recon_loss == "l1" else F.mse_loss
        return fn(recon.float(), x.float())

    def _generator(self, batch):
        x = self.inputs(batch)
        recon, q = self.model(x)
        rec_loss = self.reconstruction_loss(recon, x)
        vq_loss = q.codebook_loss + self.model_cfg.beta * q.commitment_loss
        return x, recon, q, rec_loss, vq_loss

    def loss(self, batch):
        """Generator loss without the adversarial term (reconstruction + vq), with logs."""
        x, recon, q, rec_loss, vq_loss = self._generator(batch)
        return rec_loss + vq_loss, {"recon": rec_loss.detach(), "vq": vq_loss.detach(), "perplexity": q.perplexity}

    def evaluate(self, batch) -> dict[str, torch.Tensor]:
        x, recon, q, rec_loss, _ = self._generator(batch)
        return {"loss": rec_loss, "psnr": psnr((recon.clamp(-1, 1) + 1) / 2, (x + 1) / 2),
                "perplexity": q.perplexity, "usage": q.usage}

    def adversarial_weight(self, rec_loss: torch.Tensor, g_adv: torch.Tensor) -> torch.Tensor:
        """disc_weight * ||d rec / d W_last|| / (||d adv / d W_last|| + 1e-4), clamped to [0, 1e4] (Esser et al.)."""
        last = self.model.last_layer
        g_rec = torch.autograd.grad(rec_loss, last, retain_graph=True)[0]
        g_gan = torch.autograd.grad(g_adv, last, retain_graph=True)[0]
        w = g_rec.norm() / (g_gan.norm() + 1e-4)
        return (self.model_cfg.disc_weight * w.clamp(0.0, 1e4)).detach()

    # --- manual optimization ----------------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        m = self.model_cfg
        opts = self.optimizers()
        opt_g, opt_d = (opts[0], opts[1]) if isinstance(opts, (list, tuple)) else (opts, None)
        sched = self.lr_schedulers()
        step = self.global_step
        gan = self.discriminator is not None and step >= m.disc_start

        x, recon, q, rec_loss, vq_loss = self._generator(batch)
        total = rec_loss + vq_loss
        logs = {"recon": rec_loss.detach(), "vq": vq_loss.detach(), "perplexity": q.perplexity, "usage": q.usage,
                "psnr": psnr((recon.detach().clamp(-1, 1) + 1) / 2, (x + 1) / 2)}
        if gan:
            self.toggle_optimizer(opt_g)  # discriminator frozen while the generator's gradient is taken
            g_adv = -self.discriminator(recon).float().mean()
            weight = self.adversarial_weight(rec_loss, g_adv) if m.disc_adaptive else m.disc_weight
            total = total + weight * g_adv
            logs.update(g_adv=g_adv.detach(), adv_weight=torch.as_tensor(weight).detach())
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(total)
        if self.cfg.optim.grad_clip:
            self.clip_gradients(opt_g, gradient_clip_val=self.cfg.optim.grad_clip, gradient_clip_algorithm="norm")
        opt_g.step()
        sched.step()
        if gan:
            self.untoggle_optimizer(opt_g)
        if m.restart_every and (step + 1) % m.restart_every == 0:
            logs["restarted_codes"] = torch.tensor(float(self.model.quantizer.restart_dead_codes()))

        if gan:
            self.toggle_optimizer(opt_d)
            d_loss = hinge_d_loss(self.discriminator(x).float(), self.discriminator(recon.detach()).float())
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(d_loss)
            opt_d.optimizer.step()  # the raw optimizer: Lightning's step counter counts generator steps only
            self.untoggle_optimizer(opt_d)
            logs["d_loss"] = d_loss.detach()

        self.log("train_loss", rec_loss.detach(), prog_bar=True)
        for k, v in logs.items():
            self.log(f"train_{k}", v)
        # The run recorder reads outputs["loss"]: the reconstruction loss (eval_loss's quantity), or the total if that
        # went non-finite, so that a divergence is caught.
        return {"loss": rec_loss.detach() if torch.isfinite(total.detach()) else total.detach()}

    def configure_optimizers(self):
        opt_g, sched = self.optimizer_and_schedule()
        gen = {"optimizer": opt_g, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        if self.discriminator is None:
            return gen
        o = self.cfg.optim
        opt_d = torch.optim.AdamW(self.discriminator.parameters(), lr=self.model_cfg.disc_lr or o.lr,
                                  betas=tuple(o.betas), eps=o.eps, weight_decay=0.0)
        return [gen, {"optimizer": opt_d}]

    def items_in(self, batch) -> int:
        return int(self.inputs(batch).shape[0])

    def flops_per_item(self) -> float:
        return self.model.flops_per_image()


class VQGANTask(Task):
    name = "vqgan"
    model_class = VQGANConfig
    data_class = ImageData

    def check(self, cfg: RunConfig) -> None:
        from noble_cli.data.images import resolve_image_dataset

        if cfg.trainer.accumulate != 1:
            raise NobleError("the VQGAN task optimizes generator and discriminator by hand: trainer.accumulate must "
                             "be 1 (raise trainer.batch_size or use more devices instead)")
        if cfg.trainer.precision.startswith("16") and cfg.model.disc_weight > 0:
            raise NobleError("trainer.precision 16-mixed is not supported with the discriminator; use bf16-mixed or "
                             "32")
        resolve_image_dataset(cfg.data.dataset, cfg.data.root)

    def build_module(self, cfg: RunConfig) -> VQGANModule:
        return VQGANModule(cfg)

    def build_datamodule(self, cfg: RunConfig):
        from noble_cli.data.images import (
            ImageDataModule,
            reconstruction_transform,
            resolve_image_dataset,
        )

        m, d = cfg.model, cfg.data
        source = resolve_image_dataset(d.dataset, d.root)
        return ImageDataModule(
            d.dataset, d.root, batch_size=cfg.trainer.batch_size, eval_batches=cfg.trainer.eval_batches,
            seed=cfg.seed,
            train_transform=reconstruction_transform(source, m.image_size, m.in_channels, True, d.flip),
            eval_transform=reconstruction_transform(source, m.image_size, m.in_channels, False),
            num_workers=cfg.trainer.num_workers, download=d.download,
            max_batches=cfg.trainer.micro_batches,
        )

    def synthetic_batch(self, module: VQGANModule, batch_size: int, generator: torch.Generator):
        m = module.model_cfg
        return torch.rand(batch_size, m.in_channels, m.image_size, m.image_size, generator=generator), batch_size

    def data_summary(self, cfg: RunConfig) -> str:
        m, d = cfg.model, cfg.data
        gan = f", GAN from step {m.disc_start}" if m.disc_weight > 0 else ""
        return f"{d.dataset} ({m.image_size}px -> {m.num_codes} codes of {m.codebook_size}{gan})"


TASK = VQGANTask()
