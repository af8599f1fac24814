"""The ouroboros-lm-eval plugin for the `ouroboros` command: the lm-eval host adapter, as `ouroboros plugins` lists it.

lm-eval itself finds the `ouroboros` model through the start-up hook (`ouroboros_lm_eval.pth`) or
`ouroboros-eval`. This top-level module is separate so that listing plugins imports neither lm-eval nor torch
nor the adapter package.
"""

from __future__ import annotations

from ouroboros_plugins.hookspecs import HostAdapter, hookimpl


@hookimpl
def ouroboros_host_adapters():
    # `supported` is the fallback for a source tree: installed, the range comes from this distribution's metadata
    # (pyproject.toml's dependencies). tests/test_plugins.py checks that the two agree.
    return [
        HostAdapter(name="lm-eval", distribution="ouroboros-lm-eval", host="lm-eval", module="lm_eval",
                    supported=">=0.4.13,<0.5", provides="lm-eval model `ouroboros` (lm_eval --model ouroboros)"),
    ]
