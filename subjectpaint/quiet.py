"""Quiet by default where a user asked for it (`-q`) and in the server: third-party chatter nobody asked for is
switched off precisely, each by the library's own switch or by its exact message, nothing blanket.

- transformers' and diffusers' "Loading weights" progress bars: their `disable_progress_bar()`;
- Lightning's per-fit INFO lines ("GPU available", "TPU available", the litlogger tip, "`Trainer.fit` stopped"):
  the level of the one logger that prints them (`lightning.pytorch.utilities.rank_zero`), warnings still pass;
- Lightning 2.6's own use of torch's deprecated `LeafSpec` (a FutureWarning from inside Lightning, not ours).
"""

from __future__ import annotations

import logging
import warnings


def quiet_third_party() -> None:
    import diffusers.utils.logging
    import transformers.utils.logging

    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning, module=r"lightning\.pytorch\.utilities\._pytree")
