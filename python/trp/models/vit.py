"""A small Vision Transformer for the embedded digits and other small images (Dosovitskiy et al. 2021).

Patch embedding (a patch x patch conv with stride patch), a class token, learned position embeddings, a
pre-norm nn.TransformerEncoder (GELU MLP; its nn.MultiheadAttention keeps q, k, v packed in
in_proj_weight), a final LayerNorm and a linear head on the class token. The position embeddings are
learned on the grid of `image_size` and resized (bicubic) for other input sizes, so the model takes any
input size that is a multiple of the patch."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from trp._utils import checks

# registry name -> configuration ("vit_tiny": 4 blocks of width 64, 4 heads, MLP 128, patch 4: 0.14M params)
VIT_CONFIGS = {
    "vit_tiny": dict(patch_size=4, dim=64, depth=4, heads=4, mlp_dim=128),
    "vit_small": dict(patch_size=4, dim=128, depth=6, heads=4, mlp_dim=256),
}


class ViT(nn.Module):
    def __init__(self, image_size=16, patch_size=4, dim=64, depth=4, heads=4, mlp_dim=128, num_classes=10,
                 in_channels=3, dropout=0.0):
        super().__init__()
        for name, v in (("image_size", image_size), ("patch_size", patch_size), ("dim", dim), ("depth", depth),
                        ("heads", heads), ("mlp_dim", mlp_dim)):
            checks.integer(v, name, 1)
        if image_size % patch_size:
            raise ValueError(f"image_size ({image_size}) must be a multiple of patch_size ({patch_size})")
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.patch_size, self.grid = patch_size, image_size // patch_size
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, self.grid * self.grid + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, mlp_dim, dropout=dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def _pos_embed(self, gh, gw):
        if (gh, gw) == (self.grid, self.grid):
            return self.pos_embed
        cls, grid = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        grid = grid.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
        return torch.cat([cls, grid.flatten(2).transpose(1, 2)], dim=1)

    def forward(self, x):
        x = self.patch_embed(x)  # [N, dim, H/p, W/p]
        gh, gw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self._pos_embed(gh, gw)
        return self.head(self.norm(self.encoder(x))[:, 0])


__all__ = ["ViT", "VIT_CONFIGS"]
