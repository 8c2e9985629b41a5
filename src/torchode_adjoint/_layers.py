"""Small layers for image dynamics."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ConcatConv2d"]


class ConcatConv2d(nn.Module):
    """A 2-D convolution that sees the time as one extra, constant input channel.

    ``forward(t, x)`` convolves ``cat([t * ones(B, 1, H, W), x], dim=1)``, as in the dynamics of
    Chen et al. (2018), so a time-dependent conv dynamics takes a few lines.

    Parameters
    ----------
    in_channels : int
        Channels of ``x`` (the time channel is added on top).
    out_channels : int
    kernel_size : int
    stride : int, default 1
    padding : int, default 0
    bias : bool, default True

    Examples
    --------
    >>> import torch
    >>> from torchode_adjoint import ConcatConv2d
    >>> conv = ConcatConv2d(8, 8, 3, padding=1)
    >>> conv(torch.tensor(0.5), torch.randn(2, 8, 4, 4)).shape
    torch.Size([2, 8, 4, 4])
    >>> sum(p.numel() for p in conv.parameters()) == (8 + 1) * 8 * 9 + 8
    True
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels + 1, out_channels, kernel_size, stride=stride, padding=padding, bias=bias
        )

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Convolve ``x`` with the time channel.

        Parameters
        ----------
        t : Tensor, 0-dim
        x : Tensor, shape (B, C_in, H, W)

        Returns
        -------
        Tensor, shape (B, C_out, H', W')
        """
        tt = t.to(x.dtype).expand(x.shape[0], 1, *x.shape[2:])
        return self.conv(torch.cat([tt, x], dim=1))
