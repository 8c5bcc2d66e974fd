"""Group split: which temporal slices each group pass sees.

Strided (default, FlexSelect's layout): with G groups, group g takes slices g, g+G, g+2G, ...,
so every group -- and every prefix of groups, which is what makes Lite's early stop safe -- covers
the whole video. Contiguous: group g takes one run of consecutive slices.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InputError

LAYOUTS = ("strided", "contiguous")


@dataclass(frozen=True)
class Groups:
    """The slices of each group of one sampled video (`video` is a VideoHandle)."""
    video: object
    slices: tuple[np.ndarray, ...]
    group_size: int
    layout: str

    def __len__(self) -> int:
        return len(self.slices)

    def describe(self) -> str:
        return (f"{len(self.slices)} {self.layout} groups of <= {self.group_size} slices "
                f"({self.num_slices} slices)")

    @property
    def num_slices(self) -> int:
        return int(sum(len(s) for s in self.slices))


def split_slices(num_slices: int, group_size: int, layout: str = "strided") -> tuple[np.ndarray, ...]:
    """Slice ids per group. The number of groups is ceil(num_slices / group_size)."""
    if layout not in LAYOUTS:
        raise InputError(f"layout={layout!r} is not known: use one of {', '.join(LAYOUTS)}")
    if group_size < 1:
        raise InputError(f"group_size={group_size} must be at least 1 slice")
    if num_slices < 1:
        raise InputError("the video has no complete slice: sample at least 2 frames")
    if group_size > num_slices:
        raise InputError(f"group_size={group_size} slices is larger than the video's {num_slices} "
                         f"slices: lower group_size or sample more frames")
    n_groups = -(-num_slices // group_size)
    ids = np.arange(num_slices)
    if layout == "strided":
        return tuple(ids[g::n_groups] for g in range(n_groups))
    return tuple(ids[g * group_size:(g + 1) * group_size] for g in range(n_groups))


def split_groups(video, group_size: int = 64, layout: str = "strided") -> Groups:
    """Split a VideoHandle's slices into groups of `group_size` temporal slices."""
    return Groups(video, split_slices(video.num_slices, group_size, layout), group_size, layout)
