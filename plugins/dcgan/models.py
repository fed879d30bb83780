"""DCGAN generator and discriminator (Radford, Metz & Chintala, 2016), any power-of-two size."""

from __future__ import annotations

import math

import torch
from torch import nn


def _num_stages(image_size: int) -> int:
    """Doublings from the 4x4 base map to ``image_size``."""
    n = int(math.log2(image_size)) - 2
    if n < 2 or 4 * 2**n != image_size:
        raise ValueError(f"image_size must be a power of two >= 16 (got {image_size})")
    return n


class Generator(nn.Module):
    """z [B, nz, 1, 1] → image [B, channels, size, size] in [-1, 1]: transposed convs, BatchNorm, ReLU, tanh."""

    def __init__(self, nz: int = 100, ngf: int = 64, channels: int = 3, image_size: int = 64) -> None:
        super().__init__()
        n = _num_stages(image_size)
        self.nz = nz
        mult = 2 ** (n - 1)
        layers: list[nn.Module] = [nn.ConvTranspose2d(nz, ngf * mult, 4, 1, 0, bias=False),
                                   nn.BatchNorm2d(ngf * mult), nn.ReLU(True)]
        for _ in range(n - 1):
            layers += [nn.ConvTranspose2d(ngf * mult, ngf * mult // 2, 4, 2, 1, bias=False),
                       nn.BatchNorm2d(ngf * mult // 2), nn.ReLU(True)]
            mult //= 2
        layers += [nn.ConvTranspose2d(ngf, channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.main = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() == 2:
            z = z[:, :, None, None]
        return self.main(z)


class Discriminator(nn.Module):
    """image → one logit per image: strided convs, BatchNorm (not on the first layer), LeakyReLU."""

    def __init__(self, ndf: int = 64, channels: int = 3, image_size: int = 64, slope: float = 0.2) -> None:
        super().__init__()
        n = _num_stages(image_size)
        layers: list[nn.Module] = [nn.Conv2d(channels, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(slope, True)]
        mult = 1
        for _ in range(n - 1):
            layers += [nn.Conv2d(ndf * mult, ndf * mult * 2, 4, 2, 1, bias=False),
                       nn.BatchNorm2d(ndf * mult * 2), nn.LeakyReLU(slope, True)]
            mult *= 2
        layers += [nn.Conv2d(ndf * mult, 1, 4, 1, 0, bias=False)]  # logits: the loss applies the sigmoid
        self.main = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x).flatten()


def init_weights(m: nn.Module) -> None:
    """The paper's init: conv weights ~ N(0, 0.02); BatchNorm scale ~ N(1, 0.02), shift 0."""
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


class DCGAN(nn.Module):
    """Both networks in one module, so checkpoints, resume and EMA treat the GAN as one model."""

    def __init__(self, nz: int = 100, ngf: int = 64, ndf: int = 64, channels: int = 3, image_size: int = 64,
                 slope: float = 0.2) -> None:
        super().__init__()
        self.nz, self.channels, self.image_size = nz, channels, image_size
        self.generator = Generator(nz, ngf, channels, image_size)
        self.discriminator = Discriminator(ndf, channels, image_size, slope)
        self.apply(init_weights)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Generate images from noise (the discriminator is used by the training step only)."""
        return self.generator(z)


class GeneratorExport(nn.Module):
    """What is exported: z [B, nz] → image [B, C, H, W] in [0, 1]."""

    def __init__(self, generator: Generator) -> None:
        super().__init__()
        self.generator = generator

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return (self.generator(z) + 1.0) * 0.5
