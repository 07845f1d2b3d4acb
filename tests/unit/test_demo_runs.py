"""The demo's and the study's runs (dime_ds/demo/runs.py) and their stop (dime_ds/demo/stopping.py):
a finished run is reused while its config holds, a stopped one resumes, another config starts over;
SIGTERM and Ctrl-C end the command with status 3 after the trainer's checkpoint. The trainer is a
stand-in here (tests/e2e/test_demo.py runs the real one)."""
from __future__ import annotations

import json
import os
import signal

import pytest

from dime_ds.config import load_config
from dime_ds.demo import runs
from dime_ds.demo.runs import RUN_STATE, Runner, fingerprint, unfinished
from dime_ds.demo.stopping import StopGuard, Stopped, user_command
from dime_ds.jobs import STOPPED


def _cfg(tmp_path, *extra):
    return load_config(["experiment=demo", f"work_dir={tmp_path}", "optim.warmup_steps=1", *extra])


class FakeTraining:
    """run_training's stand-in: records the configs it got; stops at `stop_at` when set."""

    def __init__(self):
        self.calls, self.stop_at = [], None

    def __call__(self, cfg):
        self.calls.append(cfg)
        start = 0
        if cfg.ckpt.resume == "latest" and (os.path.exists(f"{cfg.ckpt.dir}/latest")):
            start = int(open(f"{cfg.ckpt.dir}/latest").read().split("_")[1])
        os.makedirs(cfg.ckpt.dir, exist_ok=True)
        step = self.stop_at or cfg.optim.steps
        with open(f"{cfg.ckpt.dir}/latest", "w") as f:
            f.write(f"step_{step:08d}")
        summary = {"start_step": start, "step": step, "samples_per_s": 100.0 * (len(self.calls)),
                   "status": "stopped" if self.stop_at else "completed"}
        if not self.stop_at:
            os.makedirs(f"{cfg.run_dir}/final", exist_ok=True)
            open(f"{cfg.run_dir}/final/student.safetensors", "w").close()
            summary["final_weights"] = f"{cfg.run_dir}/final/student.safetensors"
        self.stop_at = None
        return summary


@pytest.fixture
def training(monkeypatch):
    fake = FakeTraining()
    monkeypatch.setattr("dime_ds.training.run_training", fake)
    return fake


def test_a_finished_run_is_reused_and_another_config_starts_over(tmp_path, training, capsys):
    runner = Runner(StopGuard("make demo"))
    cfg = _cfg(tmp_path, "optim.steps=10")
    first = runner.train(cfg, "student")
    assert first["status"] == "completed" and len(training.calls) == 1
    assert training.calls[0].ckpt.resume == "latest" and cfg.ckpt.resume is None  # the caller's config untouched
    again = runner.train(_cfg(tmp_path, "optim.steps=10", "log.every_n_steps=1", "eval.every_n_steps=5"), "student")
    assert again["reused"] and len(training.calls) == 1  # logging and evaluation shape nothing
    assert "finished earlier" in capsys.readouterr().out

    (tmp_path / "runs" / "demo" / "checkpoints" / "step_00000010").mkdir()
    changed = runner.train(_cfg(tmp_path, "optim.steps=10", "optim.lr=1e-3"), "student")
    assert len(training.calls) == 2 and not changed.get("reused")
    assert not (tmp_path / "runs" / "demo" / "checkpoints" / "step_00000010").exists()  # stale, removed first


def test_a_stopped_run_raises_stopped_and_the_next_call_resumes_it(tmp_path, training, capsys):
    runner = Runner(StopGuard("make demo"))
    cfg = _cfg(tmp_path, "optim.steps=10", "optim.global_batch_size=8")
    training.stop_at = 4
    with pytest.raises(Stopped, match=r"stopped at step 4 of 10 \(student, checkpoint in .*\); rerun `make demo` "
                                      r"to resume") as stop:
        runner.train(cfg, "student")
    assert stop.value.exit_status == STOPPED == 3
    state = json.loads((tmp_path / "runs" / "demo" / RUN_STATE).read_text())
    assert state["status"] == "stopped" and state["step"] == 4
    summary = runner.train(cfg, "student")
    assert "resuming from its latest checkpoint" in capsys.readouterr().out
    assert summary["status"] == "completed" and summary["resumed"] and summary["start_step"] == 4
    # samples/s over both segments: 4 steps at 100/s and 6 at 200/s
    assert summary["samples_per_s"] == pytest.approx(80 / (32 / 100 + 48 / 200))


def test_the_fingerprint_follows_the_teacher_recipe(tmp_path):
    cfg = _cfg(tmp_path)
    before = fingerprint(cfg)
    teacher = tmp_path / "demo_teacher"
    teacher.mkdir()
    (teacher / "open_clip_config.json").write_text(json.dumps({"dime_ds": {"recipe": "abc"}}))
    assert fingerprint(cfg) != before
    baseline = ["experiment=demo_baseline", f"work_dir={tmp_path}", "optim.warmup_steps=1"]
    assert fingerprint(load_config(baseline)) == fingerprint(load_config([*baseline, "log.progress=false"]))
    for speed_only in ("data.workers=1", "data.decoded_cache_mb=0"):  # a finished run stays reusable
        assert fingerprint(load_config(baseline)) == fingerprint(load_config([*baseline, speed_only]))
    assert fingerprint(load_config(baseline)) != fingerprint(load_config([*baseline, "data.augment=true"]))
    assert runs._recipe("local-dir:/nowhere") is None and runs._recipe("ViT-B-32") is None


def test_unfinished_summaries_are_named():
    assert unfinished({"a": {"status": "completed"}, "b": {"status": "stopped", "step": 7}}) == {
        "b": "unfinished: stopped at step 7"}


def test_sigterm_outside_training_raises_stopped_and_handlers_come_back():
    before = signal.getsignal(signal.SIGTERM)
    with StopGuard("make study") as guard:
        with pytest.raises(Stopped, match=r"SIGTERM: `make study` stopped \(no student was training\)"):
            os.kill(os.getpid(), signal.SIGTERM)  # the handler runs as soon as kill returns
        assert guard.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


def test_ctrl_c_during_training_asks_the_trainer_to_checkpoint_then_quits_on_a_second():
    from dime_ds.engine.loop import StopRequested

    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)}
    try:
        with StopGuard("make demo") as guard:
            with guard.training() as late:
                stop = StopRequested()  # what a Trainer installs for SIGTERM
                os.kill(os.getpid(), signal.SIGINT)
                assert stop.flag  # the trainer checkpoints at its next step
                with pytest.raises(Stopped, match="SIGINT again"):
                    os.kill(os.getpid(), signal.SIGINT)
            assert late()  # the flag outlived the block: a signal the trainer took
            assert signal.getsignal(signal.SIGTERM) == guard._handle  # the guard holds SIGTERM again
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def test_a_forked_loader_process_leaves_the_stop_to_the_command():
    """A terminal's Ctrl-C reaches the data loader processes too: they inherit the guard and ignore it."""
    with StopGuard("make demo") as guard:
        guard._pid = -1  # as seen from a process forked after the guard was installed
        os.kill(os.getpid(), signal.SIGINT)
        assert guard.signum is None


def test_the_rerun_named_is_the_command_the_user_typed_with_its_arguments(monkeypatch):
    monkeypatch.setenv("MAKELEVEL", "1")  # started by make, which exports it
    assert user_command("demo") == "make demo"
    assert user_command("study", "seeds=2 demo.compare=[views]") == 'make study ARGS="seeds=2 demo.compare=[views]"'
    monkeypatch.delenv("MAKELEVEL")  # a wheel install: no Makefile, the console script
    assert user_command("demo") == "dime-ds demo"
    assert user_command("study", "seeds=2") == "dime-ds study seeds=2"
