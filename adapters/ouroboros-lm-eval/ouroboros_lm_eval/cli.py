"""`ouroboros-eval`: lm-eval's own command line with the `ouroboros` model registered explicitly.

Use it where the start-up hook is not active (OUROBOROS_LM_EVAL_NO_HOOK=1, an interpreter started with -S, or an
installation that skipped the .pth file). Arguments are lm-eval's, unchanged:

    ouroboros-eval --model ouroboros --model_args pretrained=DIR --tasks hellaswag --include_path evals/tasks
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from . import register


def main(argv: Optional[Sequence[str]] = None) -> None:
    register()
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
