"""Every hook an Ouroboros plugin can implement.

Plugins are modules or objects registered under the entry-point group ``ouroboros_plugins``; they are
discovered once, lazily, the first time the core needs them (see `plugins.get_plugin_manager`). The
built-in Llama and Qwen2 backbones are registered exactly this way.

    from ouroboros_plugins import hookimpl

    @hookimpl
    def ouroboros_backbones():
        return [MyBackbone()]
"""

from __future__ import annotations

import pluggy

PROJECT = "ouroboros_plugins"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def ouroboros_backbones():
    """Return the backbones this plugin provides: a list of objects shaped like
    `ouroboros_plugins.backbones.Backbone` (`model_types`, where the decoder layers are, projection names
    and shapes, how to run one layer with a modulation and a KV-cache slot).

    Fires whenever the core looks up the handler for a model's ``config.model_type`` and when
    ``ouroboros plugins`` lists what is installed. The first backbone (in pluggy's call order: last
    registered first) whose ``model_types`` contains the model type wins.
    """


@hookspec
def ouroboros_register_commands(subparsers):
    """Add sub-commands to the ``ouroboros`` command line.

    Fires once when the CLI builds its parser. ``subparsers`` is the ``argparse`` sub-parser action:
    call ``subparsers.add_parser(name, help=...)`` and set ``func=callable(args) -> int`` with
    ``parser.set_defaults``. Host adapters (which may import heavy frameworks lazily inside ``func``)
    contribute ``train``, ``eval`` and ``export`` this way, so the core never imports a host. Returns nothing.
    """
