"""The ouroboros-peft plugin for the `ouroboros` command. A top-level module, so listing plugins does not
import peft/transformers; each command imports what it needs when it runs."""

from ouroboros_plugins import hookimpl


@hookimpl
def ouroboros_register_commands(subparsers):
    return None
