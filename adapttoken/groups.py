"""Group split: which temporal slices each group pass sees.

Strided (default, FlexSelect's layout): with G groups, group g takes slices g, g+G, g+2G, ...,
so every group -- and every prefix of groups, which is what makes Lite's early stop safe -- covers
the whole video. Contiguous: group g takes one run of consecutive slices.

A group_size larger than the video's slice count is clamped: one group holds every slice (the
effective size is `Groups.group_size`, the asked one `Groups.requested_group_size`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from .errors import InputError

LAYOUTS = ("strided", "contiguous")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Groups:
    """The slices of each group of one sampled video (`video` is a VideoHandle). `group_size` is
    the effective size (at most the video's slices); `requested_group_size` the one asked for."""
    video: object
    slices: tuple[np.ndarray, ...]
    group_size: int
    layout: str
    requested_group_size: int | None = None

    def __len__(self) -> int:
        return len(self.slices)

    @property
    def clamped(self) -> bool:
        return self.requested_group_size is not None and self.requested_group_size != self.group_size

    def describe(self) -> str:
        n = len(self.slices)
        text = (f"{n} {self.layout} group{'s' if n != 1 else ''} of <= {self.group_size} slices "
                f"({self.num_slices} slices)")
        if self.clamped:
            text += (f"; group_size={self.requested_group_size} clamped to the video's "
                     f"{self.num_slices} slices")
        return text

    @property
    def num_slices(self) -> int:
        return int(sum(len(s) for s in self.slices))


def split_slices(num_slices: int, group_size: int, layout: str = "strided") -> tuple[np.ndarray, ...]:
    """Slice ids per group. The number of groups is ceil(num_slices / group_size); a group_size
    above num_slices gives one group of all slices."""
    if layout not in LAYOUTS:
        raise InputError(f"layout={layout!r} is not known: use one of {', '.join(LAYOUTS)}")
    if group_size < 1:
        raise InputError(f"group_size={group_size} must be at least 1 slice")
    if num_slices < 1:
        raise InputError("the video has no complete slice: sample at least 2 frames")
    group_size = min(group_size, num_slices)
    n_groups = -(-num_slices // group_size)
    ids = np.arange(num_slices)
    if layout == "strided":
        return tuple(ids[g::n_groups] for g in range(n_groups))
    return tuple(ids[g * group_size:(g + 1) * group_size] for g in range(n_groups))


def split_groups(video, group_size: int = 64, layout: str = "strided") -> Groups:
    """Split a VideoHandle's slices into groups of `group_size` temporal slices (clamped to the
    video's slice count, logged)."""
    slices = split_slices(video.num_slices, group_size, layout)
    groups = Groups(video, slices, min(group_size, video.num_slices), layout, group_size)
    if groups.clamped:
        log.info("AdaptToken: %s", groups.describe())
    return groups
