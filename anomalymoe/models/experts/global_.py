"""Global experts (EfficientAD's logical branch): an autoencoder squeezes the whole image to a 1x1
latent and rebuilds the backbone's feature map; a student CNN learns to imitate the autoencoder.
Where the two disagree, the image breaks a global regularity (arrangement, count, layout)."""

from __future__ import annotations

from torch import Tensor, nn

from anomalymoe.models.config import GlobalExpertConfig

# The reference's decoder ladder (sizes before each conv4/p2, which adds 1): 3 -> 7 -> 15 -> 31 -> 63 -> 31.
_LADDER = (3, 7, 15, 31, 63, 31)


def _encoder(c: int, img_size: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    chans = [3, c // 4, c // 2, c]
    for cin, cout in zip(chans[:-1], chans[1:], strict=True):
        layers += [nn.Conv2d(cin, cout, 4, stride=2, padding=1), nn.ReLU(inplace=True)]
    layers += [nn.Conv2d(c, c, 3, padding=1), nn.ReLU(inplace=True)]
    size = img_size // 8
    # Reference (392 px): two conv9/s7/p1 stages 49 -> 7 -> 1. For other sizes keep conv9/s7/p1 while it
    # fits (padded size >= 9), then one conv of the remaining size, so the latent is always 1x1.
    convs = []
    while size > 1 and size + 2 >= 9:
        convs.append(nn.Conv2d(c, c, 9, stride=7, padding=1))
        size = (size + 2 - 9) // 7 + 1
    if size > 1:
        convs.append(nn.Conv2d(c, c, size))
    for i, conv in enumerate(convs):
        layers.append(conv)
        if i < len(convs) - 1:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def _decoder(c: int, out_channels: int, grid: int, drop: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for size in _LADDER:
        layers += [nn.Upsample(size=size, mode="bilinear"), nn.Conv2d(c, c, 4, padding=2), nn.ReLU(inplace=True),
                   nn.Dropout(drop)]
    layers += [nn.Upsample(size=grid, mode="bilinear"), nn.Conv2d(c, c, 3, padding=1), nn.ReLU(inplace=True),
               nn.Conv2d(c, out_channels, 3, padding=1)]
    return nn.Sequential(*layers)


def _student(channels: list[int], out_channels: int, patch_size: int) -> nn.Sequential:
    """PDN-like CNN whose output lands on the backbone's token grid (stride = patch size = 2 * 7)."""
    c1, c2 = channels
    if patch_size % 2:
        raise ValueError(f"the student's stride is 2*k; patch size {patch_size} is odd")
    return nn.Sequential(
        nn.Conv2d(3, c1, 3, padding=1), nn.ReLU(inplace=True), nn.AvgPool2d(2, 2),
        nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(inplace=True), nn.AvgPool2d(patch_size // 2, patch_size // 2),
        nn.Conv2d(c2, c2, 1), nn.ReLU(inplace=True),
        nn.Conv2d(c2, c2, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(c2, out_channels, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 1),
    )


class GlobalExpert(nn.Module):
    def __init__(self, dim: int, img_size: int, patch_size: int, cfg: GlobalExpertConfig):
        super().__init__()
        grid = img_size // patch_size
        self.autoencoder = nn.Sequential(_encoder(cfg.ae_channels, img_size),
                                         _decoder(cfg.ae_channels, dim, grid, cfg.ae_dropout))
        self.student = _student(cfg.student_channels, dim, patch_size)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """images: normalised [B,3,H,W] -> (autoencoder, student) maps, each [B, dim, h, w]."""
        return self.autoencoder(images), self.student(images)
