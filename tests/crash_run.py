"""Run ``infer.py`` or ``eval.py`` in this process and SIGKILL it at the N-th file commit, for the kill/resume tests.

Usage: ``python tests/crash_run.py N infer|eval ARGS...``. Every ``os.replace`` (how AutoSeg commits a file) and every
status line appended to ``manifest.jsonl`` counts as one step; at step N the process kills itself with SIGKILL just
before the step happens, so no Python cleanup runs, as with ``kill -9``. N = 0 runs to the end and prints
``steps: TOTAL`` last on stdout.
"""

import os
import signal
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> int:
    kill_at, tool, argv = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
    steps = 0

    def step() -> None:
        nonlocal steps
        steps += 1
        if steps == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    import torch

    torch.set_num_threads(1)
    from autoseg import outputs

    real_replace, real_record = os.replace, outputs.RunManifest.record

    def replace(src, dst, *args, **kwargs):
        step()
        return real_replace(src, dst, *args, **kwargs)

    def record(self, entry):
        step()
        return real_record(self, entry)

    os.replace = replace
    outputs.RunManifest.record = record
    if tool == "infer":
        from autoseg.cli.infer import main as run
    else:
        from autoseg.cli.eval import main as run
    code = run(argv)
    print(f"steps: {steps}")
    return code


if __name__ == "__main__":
    sys.exit(main())
