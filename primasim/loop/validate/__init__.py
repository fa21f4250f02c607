"""`primasim validate`: the loop the toolkit exists for, on one host (see driver.py for the steps).

probes.py runs inside each emulated device; calibrate.py turns the probes into a cluster; compare.py
predicts, runs and compares; hostload.py measures what else used the host; report.py writes the
outputs; driver.py is `validate()` and the command line (`python -m primasim.loop.validate probe`).
"""

from .calibrate import effective_rates as effective_rates, measured_cluster as measured_cluster
from .compare import (
    compare as compare,
    measure as measure,
    predict as predict,
    prompt_ids as prompt_ids,
)
from .driver import (
    ValidateConfig as ValidateConfig,
    ValidateResult as ValidateResult,
    default_out as default_out,
    main as main,
    validate as validate,
)
