"""Stage `profile`: the training vocabulary and the whylogs reference profile that drift checks compare against.

The reference holds the text features of the validation split and the outputs of the exported model
(`paths.bundle_dir`, the bundle that `promote` copies into the registry and serving loads) on it:
predicted intent, calibrated confidence and top1-top2 margin, as serving logs them per request, and the
review reason. With the val labels it also measures what the label-free accuracy estimate needs (accuracy of
rows flagged out_of_distribution, their share, the calibration offset of the others: `performance.py`), stored
in the reference's whylogs metadata and in vocab.json (which the replicas read).
"""

from __future__ import annotations

import logging

from intentops.config import check_stage_args, load_params
from intentops.errors import cli_entry
from intentops.monitor.profiles import write_reference

log = logging.getLogger(__name__)


@cli_entry
def main() -> None:
    cfg = load_params()
    p = cfg.paths
    write_reference(
        p.train,
        p.val,
        p.monitoring_vocab,
        p.monitoring_reference,
        cfg.monitor.features.vocab_min_count,
        p.bundle_dir,
    )
    log.info(
        "reference profile of %s with the outputs of %s written to %s (vocabulary: %s)",
        p.val,
        p.bundle_dir,
        p.monitoring_reference,
        p.monitoring_vocab,
    )


if __name__ == "__main__":
    check_stage_args("profile", __doc__)  # --help, or exit 2 on any argument
    main()
