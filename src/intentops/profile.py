"""Stage `profile`: the training vocabulary and the whylogs reference profile that drift checks compare against."""

from __future__ import annotations

import logging

from intentops.config import load_params
from intentops.errors import cli_entry
from intentops.monitor.profiles import write_reference

log = logging.getLogger(__name__)


@cli_entry
def main() -> None:
    cfg = load_params()
    p = cfg.paths
    write_reference(p.train, p.val, p.monitoring_vocab, p.monitoring_reference, cfg.monitor.features.vocab_min_count)
    log.info("reference profile written to %s (vocabulary: %s)", p.monitoring_reference, p.monitoring_vocab)


if __name__ == "__main__":
    main()
