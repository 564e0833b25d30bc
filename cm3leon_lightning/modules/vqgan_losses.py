"""VQGAN training losses (Esser et al. 2021): LPIPS perceptual distance, PatchGAN discriminator, hinge loss and the
adaptive generator weight. Pure torch, with taming-transformers' parameter names so weights can be taken from a taming
checkpoint's ``loss.perceptual_loss.*`` / ``loss.discriminator.*`` entries.

Nothing here downloads weights: LPIPS needs a local file (see :class:`LPIPS`).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# VGG16 ``features`` indices of the five LPIPS slices (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3).
_VGG_SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))
_VGG_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_LPIPS_CHANNELS = (64, 128, 256, 512, 512)


def _vgg16_features() -> list[nn.Module]:
    layers: list[nn.Module] = []
    cin = 3
    for v in _VGG_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU()]
            cin = v
    return layers


class LPIPS(nn.Module):
    """LPIPS with a VGG16 trunk (Zhang et al. 2018), the perceptual loss of taming's ``VQLPIPSWithDiscriminator``.

    Weights layout (taming / ``lpips`` package): ``net.slice{1..5}.{i}.weight|bias`` (torchvision VGG16 ``features``
    indices) and ``lin{0..4}.model.1.weight`` (the ``lpips`` package's ``lins.{0..4}`` copies are read as those);
    ``scaling_layer.shift|scale`` optional. Keys may carry a ``loss.perceptual_loss.`` or ``perceptual_loss.`` prefix,
    so a taming VQGAN checkpoint works as a source.

    Args:
        weights: path of a ``.safetensors`` or torch (``weights_only``-loadable) file with those tensors; None builds
            the layers only, for weights loaded after (a ``VQGANModule`` checkpoint holds them).

    Raises:
        FileNotFoundError: ``weights`` does not exist.
        ValueError: keys missing or unexpected, tensors of the wrong shape, or a torch file that needs unpickling (a
            Lightning 1.x checkpoint).
    """

    def __init__(self, weights: str | Path | None) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        features = _vgg16_features()
        self.net = nn.Module()
        for n, (a, b) in enumerate(_VGG_SLICES, start=1):
            s = nn.Sequential()
            for i in range(a, b):
                s.add_module(str(i), features[i])
            setattr(self.net, f"slice{n}", s)
        for n, c in enumerate(_LPIPS_CHANNELS):
            setattr(self, f"lin{n}", nn.Module())
            getattr(self, f"lin{n}").model = nn.Sequential(nn.Dropout(), nn.Conv2d(c, 1, 1, bias=False))
        if weights is not None:
            self.load_weights(weights)
        self.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> LPIPS:
        """Stay in eval mode whatever ``mode`` is (a parent's ``.train()`` included): LPIPS is a fixed metric, and
        the dropout before its ``lin`` layers would make the loss random."""
        return super().train(False)

    def load_weights(self, path: str | Path) -> None:
        """Load LPIPS weights from ``path`` (see the class docstring for the layout)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"LPIPS weights not found: {path} (nothing is downloaded; give a local file with VGG16 'net.slice*' "
                f"and 'lin*' tensors, e.g. extracted from a taming checkpoint's loss.perceptual_loss.* entries)"
            )
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            try:
                sd = torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as e:
                raise ValueError(
                    f"lpips_weights={str(path)!r} holds pickled Python objects that torch.load(weights_only=True) "
                    f"refuses to run (Lightning 1.x checkpoints such as taming-transformers' store callback classes). "
                    f"If you trust the file, extract its LPIPS tensors once into a safetensors file and pass that: "
                    f'python -c "import torch; from safetensors.torch import save_file; '
                    f"sd = torch.load('{path}', weights_only=False)['state_dict']; "
                    f"save_file({{k: v.contiguous() for k, v in sd.items() if k.startswith('loss.perceptual_loss.')}}, "
                    f"'lpips.safetensors')\". Details: {str(e).splitlines()[0]}"
                ) from e
            sd = sd.get("state_dict", sd)
        out: dict[str, torch.Tensor] = {}
        for k, v in sd.items():
            for prefix in ("loss.perceptual_loss.", "perceptual_loss."):
                if k.startswith(prefix):
                    k = k[len(prefix) :]
            if k.startswith("lins."):  # the lpips package's ModuleList holding the same lin{n} layers
                k = "lin" + k[len("lins.") :]
            if not k.startswith(("net.", "lin")):
                continue
            if k in out and not torch.equal(out[k], v):
                raise ValueError(f"{path}: two different tensors for the LPIPS weight {k} (prefixed or lins.* copies)")
            out[k] = v
        expected = self.state_dict()
        missing, unexpected = sorted(set(expected) - set(out)), sorted(set(out) - set(expected))
        wrong = [f"{k} {tuple(v.shape)}" for k, v in out.items() if k in expected and v.shape != expected[k].shape]
        if missing or unexpected or wrong:
            raise ValueError(
                f"{path}: LPIPS weights do not match: missing {len(missing)} {missing[:4]}, unexpected "
                f"{len(unexpected)} {unexpected[:4]}, wrong shapes {len(wrong)} {wrong[:4]}"
            )
        self.load_state_dict(out, strict=True)

    min_input_size = 16
    """Smallest image side LPIPS measures: VGG16 halves it four times before the last slice."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-image perceptual distance of images in ``[-1, 1]``: ``(B, 3, H, W)`` x2 -> ``(B,)``.

        Raises:
            ValueError: ``x`` and ``y`` differ in shape (they were broadcast: one image against a batch gave a
                distance per image, silently), or are smaller than :attr:`min_input_size`.
        """
        if x.shape != y.shape or x.ndim != 4 or min(x.shape[-2:]) < self.min_input_size:
            raise ValueError(
                f"LPIPS compares two image batches (B, 3, H, W) of one shape with H, W >= {self.min_input_size} "
                f"(VGG16 pools four times), got {tuple(x.shape)} and {tuple(y.shape)}"
            )
        h_x, h_y = (x - self.shift) / self.scale, (y - self.shift) / self.scale
        total = x.new_zeros(x.shape[0])
        for n in range(5):
            s = getattr(self.net, f"slice{n + 1}")
            h_x, h_y = s(h_x), s(h_y)
            diff = (F.normalize(h_x, dim=1, eps=1e-10) - F.normalize(h_y, dim=1, eps=1e-10)).pow(2)
            total = total + getattr(self, f"lin{n}").model(diff).mean(dim=(1, 2, 3))
        return total


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix, as in taming): ``(B, C, H, W)`` -> patch logits ``(B, 1, h, w)``.

    Args:
        in_channels: image channels.
        ndf: channels of the first layer.
        n_layers: stride-2 layers (>= 1); images must be at least :meth:`min_input_size` pixels on a side.

    Raises:
        ValueError: ``ndf`` or ``n_layers`` below 1.
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        if ndf < 1 or n_layers < 1:  # n_layers 0 still had one stride-2 layer, and not taming's layers
            raise ValueError(f"the discriminator needs ndf >= 1 and n_layers >= 1, got ndf={ndf}, n_layers={n_layers}")
        self.n_layers = n_layers
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=False), nn.BatchNorm2d(ndf * mult)]
            layers.append(nn.LeakyReLU(0.2))
        layers.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():  # taming's weights_init
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    @staticmethod
    def min_input_size(n_layers: int) -> int:
        """Smallest image side that gives at least one patch logit: ``3 * 2 ** n_layers`` (each stride-2 4x4 conv
        halves the side, then two stride-1 4x4 convs with padding 1 take one pixel each)."""
        return 3 * 2**n_layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Patch logits.

        Raises:
            ValueError: ``x`` is smaller than :meth:`min_input_size` (torch's error named only a kernel size).
        """
        need = self.min_input_size(self.n_layers)
        if min(x.shape[-2:]) < need:
            raise ValueError(
                f"images of {x.shape[-2]}x{x.shape[-1]} are too small for a PatchGAN discriminator with n_layers="
                f"{self.n_layers} (VQGANModule disc_layers), which needs at least {need}x{need}: use fewer layers"
            )
        return self.main(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: ``(mean(relu(1 - D(x))) + mean(relu(1 + D(G(z))))) / 2``."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_weight(
    rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, max_weight: float = 1e4
) -> torch.Tensor:
    """Adaptive GAN weight (Esser et al. 2021, eq. 7).

    ``||grad rec|| / (||grad g|| + 1e-4)`` at the decoder's last layer, clamped to ``[0, max_weight]``, detached.
    """
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, max_weight).detach()
