"""One torchrun rank of an LM script, run as `__main__`, that fails if the process group's threads outlive
the script: at interpreter exit such a thread, freeing a tensor it still holds, aborts the rank (SIGABRT)."""
import os
import runpy
import sys

script = sys.argv.pop(1)
runpy.run_path(script, run_name="__main__")
if os.path.isdir("/proc/self/task"):  # Linux: the threads gloo names
    names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
    if left := [n for n in names if "gloo" in n]:
        sys.exit(f"rank {os.environ.get('RANK')}: the process group's threads outlived the script: {left}")
