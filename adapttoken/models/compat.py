"""Differences between the supported transformers versions, decided once from the installed code.

The KV cache keyword: transformers 5.24 renamed the `past_key_values` argument of the models'
forward to `cache` (the old name still works there, with a FutureWarning, until 5.40); 5.17 to
5.23 only know `past_key_values`, and would silently drop an unknown `cache` into **kwargs. So the
name is read from the forward's signature, never assumed from a version number.
"""
from __future__ import annotations

import functools
import inspect

NEW_CACHE_KWARG = "cache"                     # transformers >= 5.24
OLD_CACHE_KWARG = "past_key_values"           # transformers <= 5.23 (deprecated from 5.24)


@functools.lru_cache(maxsize=None)
def _cache_kwarg_of(forward) -> str:
    try:
        params = inspect.signature(forward).parameters      # follows the decorators' __wrapped__
    except (TypeError, ValueError):
        return OLD_CACHE_KWARG
    return NEW_CACHE_KWARG if NEW_CACHE_KWARG in params else OLD_CACHE_KWARG


def cache_kwarg(module) -> str:
    """The keyword under which `module` (a transformers model or one of its submodules) takes the
    KV cache: 'cache' where its forward declares it, else 'past_key_values'."""
    return _cache_kwarg_of(type(module).forward)


def cache_kwargs(module, cache) -> dict:
    """{keyword: cache} to pass the KV cache to `module`'s forward under the name it declares."""
    return {cache_kwarg(module): cache}


def passed_cache(kwargs: dict):
    """The KV cache in the keyword arguments of a forward call (a forward pre-hook's view), under
    either name; None if there is none."""
    cache = kwargs.get(NEW_CACHE_KWARG)
    return cache if cache is not None else kwargs.get(OLD_CACHE_KWARG)
