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
    """A small Vision Transformer (the module doc describes its layout).

    Args:
        image_size: the side of the square image the position embeddings are learned for, an int >= 1 and a
            multiple of patch_size; default 16.
        patch_size: the side of a square patch (the patch-embedding conv's kernel and stride), an int >= 1;
            default 4.
        dim: the embedding width, an int >= 1 divisible by heads; default 64.
        depth: the number of transformer encoder blocks, an int >= 1; default 4.
        heads: the attention heads per block, an int >= 1; default 4.
        mlp_dim: the hidden width of each block's MLP, an int >= 1; default 128.
        num_classes: outputs of the head, an int >= 1; default 10.
        in_channels: input channels, an int >= 1; default 3.
        dropout: the encoder blocks' dropout probability, a float in [0, 1); default 0.0.

    Raises:
        ValueError: when a size is not an int >= 1, image_size is not a multiple of patch_size, or dim is not
            divisible by heads.
    """

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
        """Class logits of a batch of images (the head on the class token).

        Args:
            x: images [N, in_channels, H, W], H and W multiples of patch_size (the position embeddings are
                resized for a grid other than image_size's).

        Returns:
            logits [N, num_classes].
        """
        x = self.patch_embed(x)  # [N, dim, H/p, W/p]
        gh, gw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self._pos_embed(gh, gw)
        return self.head(self.norm(self.encoder(x))[:, 0])


__all__ = ["ViT", "VIT_CONFIGS"]
