"""Start-up hook, run by `ouroboros_lm_eval.pth` in every interpreter of the environment.

lm-eval 0.4.13 has no plugin loading for models, so the `ouroboros` model is registered from inside the
`lm_eval` process: a meta-path finder watches for the import of `lm_eval.models` and, right after that module
has run (so the built-in models are registered first), adds `ouroboros` as a lazy "module:attr" placeholder.
Nothing heavy is imported at start-up or at registration; torch/transformers load only when lm-eval
instantiates the model. Set OUROBOROS_LM_EVAL_NO_HOOK=1 to switch the hook off.
"""

from __future__ import annotations

import sys

WATCHED = "lm_eval.models"


def _register_quietly() -> None:
    try:
        from . import register

        register()
    except Exception as exc:  # never break lm-eval itself
        sys.stderr.write(f"ouroboros-lm-eval: could not register the 'ouroboros' model with lm-eval ({type(exc).__name__}: {exc})\n")


class _WatchFinder:
    """Finds nothing itself: asks the other finders for `lm_eval.models` and wraps that spec's exec_module."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != WATCHED:
            return None
        for finder in sys.meta_path:
            if finder is self or isinstance(finder, _WatchFinder):
                continue
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        original = getattr(loader, "exec_module", None)
        if original is None or getattr(original, "_ouroboros_wrapped", False):
            return spec

        def exec_module(module):
            original(module)
            if getattr(module, "__name__", None) == WATCHED:
                _register_quietly()

        exec_module._ouroboros_wrapped = True
        # The loader instance belongs to this one spec (file loaders are created per module), so patching the
        # instance affects nothing else; its type and other methods (resource readers, ...) stay as they were.
        loader.exec_module = exec_module
        return spec


def install() -> None:
    if any(isinstance(f, _WatchFinder) for f in sys.meta_path):
        return
    if WATCHED in sys.modules:  # installed late: lm-eval's registry is already populated
        _register_quietly()
        return
    sys.meta_path.insert(0, _WatchFinder())
