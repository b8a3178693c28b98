"""Run the `finetune` command line in this process and send it a real signal at a chosen point of training.

    python -m tests.interrupt --at-step 7 --signal TERM -- run recipes/legal.yaml --smoke --run-dir D ...
    python -m tests.interrupt --at-step 6 --signal KILL --in-checkpoint-write -- run ...
    python -m tests.interrupt --in-stage eval --signal TERM -- run ...

`--in-stage S`: sent as stage S starts (data preparation, evaluation: stages without an optimizer loop).
`--only-rank R`: with --gpus, only rank R signals itself (the others run as they would).
`--at-step N`: the signal is sent with os.kill as optimizer step N begins, so it arrives mid-step, as a scheduler's
would. `--in-checkpoint-write`: sent while checkpoint N is being written (after the Trainer wrote it, before its
COMPLETE marker), the worst moment for a SIGKILL. Nothing else in the command changes.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys


def main() -> None:
    argv = sys.argv[1:]
    if argv[:1] == ["@env"]:  # a rank started by torchrun: the options come from the launching process
        argv = os.environ["FINETUNE_TEST_INTERRUPT"].split() + ["--"] + argv[1:]
    cut = argv.index("--")
    p = argparse.ArgumentParser()
    p.add_argument("--at-step", type=int)
    p.add_argument("--in-stage", help="send the signal as this pipeline stage starts (prepare, eval ...)")
    p.add_argument("--signal", default="TERM")
    p.add_argument("--in-checkpoint-write", action="store_true")
    p.add_argument("--only-rank", type=int, help="with --gpus: only this rank signals itself")
    opts = p.parse_args(argv[:cut])
    sig = getattr(signal, f"SIG{opts.signal}")
    if opts.only_rank is not None and int(os.environ.get("RANK", "0")) != opts.only_rank and "RANK" in os.environ:
        opts.at_step = opts.in_stage = None  # another rank: runs untouched

    import finetune.distributed as distributed

    launch_command = distributed.launch_command

    def through_this_wrapper(*a, **kw):  # with --gpus, every rank runs under this wrapper too
        cmd = launch_command(*a, **kw)
        i = cmd.index("finetune.cli")
        # torchrun's parser would take `--signal` for its `--signals-to-handle`: the options travel in the environment
        os.environ["FINETUNE_TEST_INTERRUPT"] = " ".join(argv[:cut])
        return cmd[:i] + ["tests.interrupt", "@env"] + cmd[i + 1:]

    distributed.launch_command = through_this_wrapper

    from transformers import TrainerCallback

    import finetune.checkpoints as ck
    import finetune.train as train

    if opts.at_step is None and not opts.in_stage:
        pass
    elif opts.in_stage:
        import time

        import finetune.pipeline as pipeline

        run_stage = pipeline.run_stage

        def signalled(ctx, stage, *a):
            if stage == opts.in_stage:
                os.kill(os.getpid(), sig)
                time.sleep(5)  # the handler raises here: the stage never gets further
            return run_stage(ctx, stage, *a)

        pipeline.run_stage = signalled
    elif opts.in_checkpoint_write:
        fsync_tree = ck.fsync_tree

        def dying_fsync(path):
            fsync_tree(path)
            if path.name == f"step-{opts.at_step:06d}.tmp":
                os.kill(os.getpid(), sig)

        ck.fsync_tree = dying_fsync
    else:
        callbacks = train.trainer_callbacks

        class Signal(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                if state.global_step + 1 == opts.at_step:
                    os.kill(os.getpid(), sig)

        train.trainer_callbacks = lambda *a, **kw: callbacks(*a, **kw) + [Signal()]

    from finetune.cli import main as cli

    sys.argv = ["finetune", *argv[cut + 1:]]
    cli()


if __name__ == "__main__":
    main()
