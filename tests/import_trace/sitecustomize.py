"""Imported first by every Python process of the traced demo run (on its PYTHONPATH).

At exit each process writes the files it imported to $SDXL_IMPORT_TRACE/<pid>.json, under the
rule script that started its job (inherited by the job's children: torchrun ranks, spawned
workers), so tests can check each rule's derived code inputs against what its job loaded.
"""

import atexit
import json
import os
import sys

TRACE_DIR = os.environ.get("SDXL_IMPORT_TRACE")
if TRACE_DIR:
    script = sys.argv[0] if sys.argv else ""
    if f"{os.sep}.snakemake{os.sep}scripts{os.sep}" in script:  # tmpXXXX.<script>.py
        os.environ["SDXL_IMPORT_TRACE_JOB"] = os.path.basename(script).split(".", 1)[1]

    def _write() -> None:
        files = sorted({getattr(m, "__file__", None) or "" for m in list(sys.modules.values())})
        record = {"job": os.environ.get("SDXL_IMPORT_TRACE_JOB", ""), "files": files}
        with open(os.path.join(TRACE_DIR, f"{os.getpid()}.json"), "w") as f:
            json.dump(record, f)

    atexit.register(_write)
