"""Only the build step that installs the start-up hook `ouroboros_lm_eval.pth`; all metadata is in pyproject.toml.

A `.pth` file must sit directly in site-packages, which neither package data nor (for editable installs)
setuptools' data files can do:
* regular wheel: the file is written to the top of `build_lib`, and the wheel's top level becomes
  site-packages;
* editable wheel (`pip install -e`, PEP 660): setuptools does not copy files from `build_lib` into an editable
  wheel, and it skips `install_data` there as well; the file is written straight into the unpacked editable
  wheel instead, which setuptools prepares as the `install` command's `install_lib` (with the `.dist-info`
  folder already in it) before it runs the build steps.
Both paths are checked by tests/test_lm_eval.py (the hook's file must be in the installation's RECORD).
"""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH_NAME = "ouroboros_lm_eval.pth"
# One line: site.py executes .pth lines that start with `import`. Errors are reported, never raised, and
# OUROBOROS_LM_EVAL_NO_HOOK=1 switches the hook off.
PTH_LINE = (
    "import os, sys; exec(\"try:\\n import ouroboros_lm_eval._startup as _o\\n _o.install()\\n"
    "except Exception as _e:\\n sys.stderr.write('ouroboros-lm-eval: start-up hook not installed (%s: %s)\\\\n'"
    " % (type(_e).__name__, _e))\") if not os.environ.get('OUROBOROS_LM_EVAL_NO_HOOK') else None\n"
)


class build_py_with_hook(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            target = self.get_finalized_command("install").install_lib
            if not target or not any(name.endswith(".dist-info") for name in os.listdir(target)):
                raise RuntimeError(
                    f"ouroboros-lm-eval: cannot locate the editable wheel being built (install_lib={target!r}); "
                    "this setuptools version lays editable builds out differently than the ones tested (68-84)"
                )
        else:
            target = self.build_lib
        self.mkpath(target)
        with open(os.path.join(target, PTH_NAME), "w", encoding="utf-8") as handle:
            handle.write(PTH_LINE)

    def get_outputs(self, *args, **kwargs):
        outputs = list(super().get_outputs(*args, **kwargs))
        if not getattr(self, "editable_mode", False):
            outputs.append(os.path.join(self.build_lib, PTH_NAME))
        return outputs


setup(cmdclass={"build_py": build_py_with_hook})
