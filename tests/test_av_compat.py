"""PyAV differences the library bridges: lmms-eval 0.7.3 pins av<16, where a stream's disposition
is a plain `enum.Flag` (int() refuses it); from 16 on it is an IntFlag."""
from __future__ import annotations

import enum
from types import SimpleNamespace

import av
import pytest

from adapttoken import video


class FlagDisposition(enum.Flag):          # PyAV 15
    default = 1
    attached_pic = 1024


class IntFlagDisposition(enum.IntFlag):    # PyAV 16+
    default = 1
    attached_pic = 1024


@pytest.mark.parametrize("kind", [FlagDisposition, IntFlagDisposition])
def test_cover_art_skipped_with_either_flag_kind(monkeypatch, kind):
    monkeypatch.setattr(av.stream, "Disposition", kind, raising=False)
    cover = SimpleNamespace(disposition=kind.attached_pic | kind.default, type="video")
    real = SimpleNamespace(disposition=kind.default, type="video")
    c = SimpleNamespace(format=SimpleNamespace(name="mov,mp4"), streams=SimpleNamespace(video=[cover, real]))
    assert video._video_stream(c, "x.mp4") is real
