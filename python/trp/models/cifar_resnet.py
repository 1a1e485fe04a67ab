"""CIFAR ResNets of He et al. 2016 (section 4.2): 3 stages of n basic blocks with 16/32/64 channels,
depth 6n+2, identity shortcuts with a 1x1 conv + BN projection where the shape changes.
ResNet-20 has 0.27M parameters."""
import torch.nn as nn
import torch.nn.functional as F


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN layers with ReLU and a shortcut: identity, or a 1x1 conv + BN where the shape changes.

    Args:
        in_planes: input channels, an int >= 1.
        planes: output channels of both convs, an int >= 1.
        stride: the first conv's (and the projection's) stride, an int >= 1; default 1.
    """

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x):
        """The block's output relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)).

        Args:
            x: input [N, in_planes, H, W].

        Returns:
            [N, planes, H / stride, W / stride] (rounded up).
        """
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """A CIFAR ResNet: a 3x3 stem conv (16 channels), 3 stages of n BasicBlocks, global pooling, a Linear head.

    Its `trp_layers` is "paper", so TRP's default selection for it is the paper's rule.

    Args:
        depth: the depth 6n+2, an int >= 8 (20, 32, 44, 56, 110: ResNet-20 ...); default 20.
        num_classes: outputs of the head, an int >= 1; default 10.
        in_channels: input channels, an int >= 1; default 3.

    Raises:
        ValueError: when depth is not 6n+2 with n >= 1.
    """

    # TRP's default layers for these models (trp.core.selection): the paper's rule, whose results they reproduce
    # (the "default" preset would add the two 1x1 shortcut convs)
    trp_layers = "paper"

    def __init__(self, depth=20, num_classes=10, in_channels=3):
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        """Class logits of a batch of images.

        Args:
            x: images [N, in_channels, H, W] (32 x 32 for CIFAR).

        Returns:
            logits [N, num_classes].
        """
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)
