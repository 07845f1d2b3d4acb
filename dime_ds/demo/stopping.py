"""What SIGTERM and Ctrl-C do to `make demo` and `make study`: the run training at that moment
checkpoints at its next step (the trainer's own stop, engine/loop.py's StopRequested), and then the
whole command ends with jobs.STOPPED (3) and a message saying where it stopped and how to resume,
instead of going on to the next student and later evaluating a half-trained one.

Signals and who takes them:
- inside a training run the trainer holds SIGTERM (it installs its handler when it starts); the
  guard forwards SIGINT (Ctrl-C) to it, so both checkpoint. A second Ctrl-C quits at once (the run
  resumes from its previous checkpoint);
- anywhere else (world, teacher set-up, embedding and grounding, evaluation, between runs) there is
  nothing to checkpoint: the guard raises `Stopped` where the signal lands; every file a rerun reads
  is written atomically, so the rerun picks up from there;
- data loader processes forked from the command inherit the guard; in them it does nothing (the
  loaders end with the run), so a terminal's Ctrl-C, which reaches the whole process group, stops
  the run once;
- a signal that reached the trainer after its last step (while its final weights were written) is
  found on the trainer's handler afterwards: the run counts as finished, the command stops after it.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
from typing import Callable, Iterator

from dime_ds.jobs import STOPPED
from dime_ds.errors import UserError

log = logging.getLogger("dime_ds.demo")
SIGNALS = (signal.SIGTERM, signal.SIGINT)


def user_command(target: str, args: str = "") -> str:
    """The command line that runs `target` (demo, study) the way the user started this one: `make`
    exports MAKELEVEL to what it runs, and a wheel install has no Makefile, only `dime-ds`."""
    if os.environ.get("MAKELEVEL"):
        return f"make {target}" + (f' ARGS="{args}"' if args else "")
    return f"dime-ds {target}" + (f" {args}" if args else "")


class Stopped(UserError):
    """The command was stopped by a signal after its checkpoint; a rerun resumes. Exit status 3."""

    exit_status = STOPPED


def _trainer_stop(handler) -> object | None:
    """The trainer's stop flag holder behind an installed handler (a bound StopRequested._set), or None."""
    from dime_ds.engine.loop import StopRequested

    owner = getattr(handler, "__self__", None)
    return owner if isinstance(owner, StopRequested) else None


class StopGuard:
    """Installed for the whole command (`with StopGuard(command):`), restoring the previous handlers
    on exit. `command` is what the user reruns (`make demo`), for the messages."""

    def __init__(self, command: str):
        self.command = command
        self.signum: int | None = None  # the first signal received, if any
        self._previous: dict[int, object] = {}
        self._pid = os.getpid()

    def __enter__(self) -> "StopGuard":
        self._pid = os.getpid()
        self._previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
        self._install()
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _install(self) -> None:
        for sig in SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        if os.getpid() != self._pid:
            return  # a data loader process forked from this one (a terminal's Ctrl-C reaches the whole group)
        name = signal.Signals(signum).name
        self.signum = self.signum or signum
        # Only SIGINT gets here while a trainer runs: it holds SIGTERM itself.
        stop = _trainer_stop(signal.getsignal(signal.SIGTERM))
        if stop is not None:
            if not stop.flag:
                print(f"\n{name}: the run checkpoints at its next step, then `{self.command}` stops "
                      "(Ctrl-C again to quit at once)", flush=True)
                stop.flag = True  # what the trainer's own SIGTERM handler sets
                return
            raise Stopped(f"{name} again: quit without waiting for the checkpoint; rerun `{self.command}` to "
                          "resume from the run's previous checkpoint")
        raise Stopped(f"{name}: `{self.command}` stopped (no student was training); rerun `{self.command}` "
                      "to go on: what finished is reused")

    @contextlib.contextmanager
    def training(self) -> Iterator[Callable[[], bool]]:
        """Around code that runs the trainer. Afterwards the guard takes SIGTERM back from the trainer's
        handler (which stays installed when the trainer is done); yields a callable that says, after
        the block, whether a signal reached the trainer too late to stop it (after its last step)."""
        late = {"flag": False}
        try:
            yield lambda: late["flag"]
        finally:
            stop = _trainer_stop(signal.getsignal(signal.SIGTERM))
            late["flag"] = bool(stop is not None and stop.flag)
            if late["flag"] and self.signum is None:
                self.signum = signal.SIGTERM
            self._install()

    def stopped_message(self, what: str, step: int, steps: int, where: str) -> str:
        return (f"stopped at step {step} of {steps} ({what}, checkpoint in {where}); "
                f"rerun `{self.command}` to resume")
