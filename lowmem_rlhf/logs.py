"""Console logging for the commands (`lowmem-rlhf ...`, `python -m lowmem_rlhf.tiny.evaluate`)."""

from __future__ import annotations

import logging
import os
import warnings


def setup_logging(verbose: bool) -> None:
    """INFO (DEBUG with `verbose`) to the console; without `verbose`, library warnings and chatter are hidden."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", force=True)
    if int(os.environ.get("RANK", "0") or 0) > 0:  # under a data-parallel launch rank 0 alone reports
        logging.getLogger().setLevel(logging.ERROR)
    if not verbose:
        # Library chatter that says nothing to our users (e.g. an optional CPU kernel package).
        for name in ("bitsandbytes", "transformers", "peft", "httpx", "datasets"):
            logging.getLogger(name).setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"(torch|transformers|peft|bitsandbytes)\..*")
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
