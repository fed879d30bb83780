"""The DCGAN task: two networks, two optimizers, one training step; the engine does the rest."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from visionpipe.engine import distributed as dist
from visionpipe.engine.checkpoint import load_weights_file
from visionpipe.engine.optim import build_optimizer
from visionpipe.errors import ConfigError, UsageError, VisionpipeError
from visionpipe.io import write_json
from visionpipe.task import DataBundle, ExportSpec, OptimizationContext, PredictOption, Task
from visionpipe_plugins.dcgan.config import (
    DcganAugmentConfig,
    DcganConfig,
    DcganEvaluateConfig,
    DcganModelConfig,
    DcganTrainConfig,
)
from visionpipe_plugins.dcgan.data import ImageDataset, build_transforms, load_images
from visionpipe_plugins.dcgan.features import build_extractor, check_extractor_setting
from visionpipe_plugins.dcgan.fid import feature_stats, frechet_distance
from visionpipe_plugins.dcgan.models import DCGAN, GeneratorExport
from visionpipe_plugins.dcgan.samples import make_grid, noise, to_uint8, write_png

log = logging.getLogger(__name__)

# Offsets from the run seed for the fixed noise of the Fréchet distance, the grids and the parity check.
FID_NOISE, GRID_NOISE, PARITY_NOISE = 1_000_003, 2_000_003, 3_000_003


def unwrap(model: nn.Module) -> DCGAN:
    """The DCGAN inside ``model`` (torch.compile wrapper or an EMA copy included)."""
    m = getattr(model, "_orig_mod", model)
    m = getattr(m, "module", m) if not isinstance(m, DCGAN) else m
    if not isinstance(m, DCGAN):
        raise VisionpipeError(f"dcgan: expected a DCGAN model, got {type(model).__name__}")
    return m


class DcganTask(Task):
    """Unconditional image generation with a DCGAN; Fréchet distance per epoch; generator export."""

    name = "dcgan"
    Config = DcganConfig
    description = "image generation with a DCGAN (generator exported; Fréchet distance per epoch)"
    monitor = "val/fid"
    monitor_mode = "min"
    manual_optimization = True
    models: ClassVar[dict] = {"dcgan": DCGAN}
    image_predict = False
    predict_resumes = False  # every run writes all its samples again
    predict_options: ClassVar[dict[str, PredictOption]] = {
        "num": PredictOption(16, "how many images to generate", int, low=1),
        "seed": PredictOption(0, "seed of the noise the images are generated from", int, low=0)}

    cfg: DcganConfig

    def __init__(self, cfg: DcganConfig, ctx: Any = None) -> None:
        super().__init__(cfg, ctx)
        self._extractor: nn.Module | None = None
        self._reference: tuple[tuple, np.ndarray, np.ndarray, int] | None = None  # key, mean, cov, count

    # -- config shortcuts ---------------------------------------------------------------------
    def _aug(self) -> DcganAugmentConfig:
        return self.cfg.augment or DcganAugmentConfig()

    def _model_cfg(self) -> DcganModelConfig:
        return self.cfg.model or DcganModelConfig()

    def _train_cfg(self) -> DcganTrainConfig:
        return self.cfg.train or DcganTrainConfig()

    def _eval_cfg(self) -> DcganEvaluateConfig:
        return self.cfg.evaluate or DcganEvaluateConfig()

    # -- load / augment -----------------------------------------------------------------------
    def build_data(self) -> DataBundle:
        """Training images and the real reference set of the Fréchet distance, checked up front."""
        if self.cfg.load is None:
            raise ConfigError("the dcgan task needs a 'load' block with root: a folder of images", field="load")
        check_extractor_setting(self._eval_cfg().feature_extractor)
        train, reference, bad = load_images(self.cfg.load)
        ch = self._model_cfg().channels
        log.info("dcgan: %d training image(s), %d reference image(s) for the Fréchet distance",
                 len(train), len(reference))
        bundle = DataBundle(train=ImageDataset(train, channels=ch), val=ImageDataset(reference, channels=ch),
                            info={"image_size": self._aug().image_size, "channels": ch}, skipped=bad)
        self.augment(bundle)
        return bundle

    def augment(self, data: DataBundle) -> dict[str, Any]:
        """Train transforms + resize/crop + [-1, 1] on train; resize/crop + [-1, 1] on the reference set."""
        cfg, ch = self._aug(), self._model_cfg().channels
        if data.train is not None:
            data.train.transform = build_transforms(cfg.train, cfg.image_size, cfg.resize, ch)
        if data.val is not None:
            data.val.transform = build_transforms([], cfg.image_size, cfg.resize, ch)
        return {"train": [t.get("name") for t in cfg.train], "image_size": cfg.image_size, "resize": cfg.resize}

    # -- model / optimizers -------------------------------------------------------------------
    def build_model(self, info: dict[str, Any], *, pretrained: bool = True) -> nn.Module:
        """Generator + discriminator for the augment block's image size."""
        m = self._model_cfg()
        size = int(info.get("image_size") or self._aug().image_size)
        model = DCGAN(m.nz, m.ngf, m.ndf, m.channels, size, m.leaky_slope)
        if pretrained and m.weights:
            path = Path(m.weights).expanduser()
            if not path.is_file():
                raise ConfigError(f"weights file {path} not found", field="model.weights")
            report = load_weights_file(model, path, skip_mismatched=False)
            log.info("loaded weights %s (%d missing keys)", path, len(report["missing"]))
        return model

    def configure_optimizers(self, model: nn.Module) -> dict[str, torch.optim.Optimizer]:
        """One optimizer per network (Adam, lr 2e-4, beta1 0.5 by default)."""
        if dist.is_distributed():
            raise VisionpipeError("dcgan: multi-process (DDP) training is not supported yet; run one process")
        gan, tc = unwrap(model), self._train_cfg()
        g = build_optimizer([{"params": list(gan.generator.parameters()), "lr": tc.optimizer.lr}], tc.optimizer)
        d = build_optimizer([{"params": list(gan.discriminator.parameters()), "lr": tc.lr_d or tc.optimizer.lr}],
                            tc.optimizer)
        return {"G": g, "D": d}

    # -- train ----------------------------------------------------------------------------------
    def train_step(self, model: nn.Module, batch: Any, opt: OptimizationContext) -> dict[str, float]:
        """One discriminator update on real + fake, then one generator update (non-saturating loss)."""
        gan = unwrap(model)
        real = batch
        n = real.shape[0]
        real_target = torch.full((n,), 1.0 - self._train_cfg().label_smoothing, device=real.device)
        zeros, ones = torch.zeros(n, device=real.device), torch.ones(n, device=real.device)
        z = torch.randn(n, gan.nz, 1, 1, device=real.device)
        with opt.autocast():
            fake = gan.generator(z)
            d_real = gan.discriminator(real).float()
            d_fake = gan.discriminator(fake.detach()).float()
            loss_d = (F.binary_cross_entropy_with_logits(d_real, real_target)
                      + F.binary_cross_entropy_with_logits(d_fake, zeros))
        opt.step("D", loss_d)
        gan.discriminator.requires_grad_(False)  # the G loss needs gradients through D, not for D's weights
        try:
            with opt.autocast():
                d_gen = gan.discriminator(fake).float()
                loss_g = F.binary_cross_entropy_with_logits(d_gen, ones)
            opt.step("G", loss_g)
        finally:
            gan.discriminator.requires_grad_(True)
        return {"loss_d": float(loss_d.detach()), "loss_g": float(loss_g.detach()),
                "d_real": float(torch.sigmoid(d_real.detach()).mean()),
                "d_fake": float(torch.sigmoid(d_fake.detach()).mean())}

    # -- evaluate -------------------------------------------------------------------------------
    def _features(self, device: torch.device) -> nn.Module:
        ev = self._eval_cfg()
        if self._extractor is None:
            self._extractor = build_extractor(ev.feature_extractor, ev.feature_arch, ev.feature_image_size)
        return self._extractor.to(device)

    def _reference_stats(self, loader: Any, extractor: nn.Module, device: torch.device) -> tuple[Any, ...]:
        """Mean/covariance of the real reference features (computed once per run)."""
        ds = loader.dataset
        key = (tuple(getattr(ds, "paths", ())), repr(getattr(ds, "transform", None)), str(device))
        if self._reference is None or self._reference[0] != key:
            feats = [extractor(x.to(device).float()).double().cpu() for x in loader]
            if not feats:
                raise VisionpipeError("dcgan: the Fréchet distance reference set is empty")
            f = torch.cat(feats).numpy()
            if len(f) < 2:
                raise VisionpipeError("dcgan: the Fréchet distance needs at least 2 reference images")
            self._reference = (key, *feature_stats(f), len(f))
        return self._reference[1:]

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Any, *, device: torch.device, out_dir: Path | None = None,
                 epoch: int | None = None) -> dict[str, Any]:
        """Fréchet distance of fixed-noise samples to the reference images; a sample grid PNG."""
        gan, ev = unwrap(model), self._eval_cfg()
        gan.eval()
        bs = getattr(loader, "batch_size", None) or 64
        with torch.autocast(device.type, enabled=False):
            extractor = self._features(device)
            mu_r, sigma_r, n_real = self._reference_stats(loader, extractor, device)
            z = torch.from_numpy(noise(ev.fid_samples, gan.nz, self.cfg.seed + FID_NOISE))
            feats = [extractor(gan.generator(c.to(device)).float()).double().cpu() for c in z.split(bs)]
            mu_f, sigma_f = feature_stats(torch.cat(feats).numpy())
            fid = frechet_distance(mu_r, sigma_r, mu_f, sigma_f)
            if out_dir is not None:
                zg = torch.from_numpy(noise(ev.grid, gan.nz, self.cfg.seed + GRID_NOISE)).to(device)
                imgs = to_uint8(((gan.generator(zg).float() + 1) * 0.5).cpu().numpy())
                name = f"samples_epoch_{epoch:03d}.png" if epoch is not None else "samples_final.png"
                write_png(Path(out_dir) / "plots" / name, make_grid(imgs))
        return {"fid": fid, "fid_real_images": int(n_real), "fid_fake_images": ev.fid_samples}

    # -- export / predict -----------------------------------------------------------------------
    def export_spec(self, model: nn.Module, data: DataBundle | None, info: dict[str, Any],
                    num_parity: int) -> ExportSpec:
        """The generator alone: z [batch, nz] → image [batch, C, H, W] in [0, 1]."""
        gan = unwrap(model)
        module = GeneratorExport(gan.generator).eval()
        z = torch.from_numpy(noise(max(num_parity, 2) + 1, gan.nz, self.cfg.seed + PARITY_NOISE))
        parity = [(z[:num_parity],), (z[num_parity:num_parity + 1],)] if num_parity else []
        m = self._model_cfg()
        meta = {"task": self.name, "model": "dcgan", "nz": gan.nz, "image_size": gan.image_size,
                "channels": gan.channels, "ngf": m.ngf, "ndf": m.ndf, "output_range": [0.0, 1.0],
                "layout": "NCHW", "color": "RGB" if gan.channels == 3 else "L"}
        return ExportSpec(module, (z[:2],), ["z"], ["image"], {"z": {0: "batch"}, "image": {0: "batch"}}, meta,
                          parity_inputs=parity)

    @classmethod
    def predict(cls, backend: Any, metadata: dict[str, Any], source: str | None, out_dir: Path,
                options: dict[str, Any]) -> dict[str, Any]:
        """Write ``num`` PNG samples generated from ``seed`` (``--num N --seed S``); no SOURCE needed."""
        if source:  # was ignored with a warning; a flag the task does not take is an error too
            raise UsageError(f"SOURCE {source}: dcgan predict generates images from noise and takes no SOURCE; "
                             f"use --num N --seed S")
        num = int(options.get("num") or 16)
        seed = int(options.get("seed") or 0)
        if num < 1:
            raise VisionpipeError(f"--num must be >= 1 (got {num})")
        if seed < 0:
            raise VisionpipeError(f"--seed must be >= 0 (got {seed})")
        if "nz" not in metadata:
            raise VisionpipeError("this model has no 'nz' in its metadata; export it with the dcgan task")
        bs = int(options.get("batch_size") or 16)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        z = noise(num, int(metadata["nz"]), seed)
        name = backend.input_names[0]
        files = []
        for start in range(0, num, bs):
            images = to_uint8(backend.run({name: z[start:start + bs]})[0])
            for j, img in enumerate(images):
                path = out_dir / f"seed{seed}_{start + j:05d}.png"
                write_png(path, img)
                files.append(path.name)
        summary = {"task": cls.name, "images": num, "seed": seed, "nz": int(metadata["nz"]), "out": str(out_dir),
                   "first": files[0], "last": files[-1], "backend": getattr(backend, "name", "?")}
        write_json(out_dir / "summary.json", summary)
        log.info("wrote %d generated image(s) to %s", num, out_dir)
        return summary
