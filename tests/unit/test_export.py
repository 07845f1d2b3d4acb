"""Export of a distilled student to a plain OpenCLIP model directory, and the checkpoint reading it
rests on: a few-step training, `python -m dime_ds.export`, then OpenCLIP alone (a fresh process
without dime_ds) must give the embeddings dime_ds gives. Both student.text modes; the teacher uses
QuickGELU, as OpenAI's do, so a student built with the wrong activation would show."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import open_clip
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from dime_ds.cli import run_entry
from dime_ds.errors import UserError
from dime_ds.config import load_config
from dime_ds.config.schema import StudentConfig, TeacherConfig
from dime_ds.engine.consolidate import CheckpointError, fp32_state_dict, load_student, resolve_checkpoint
from dime_ds.export import main as export_main
from dime_ds.models import (build_run_student, build_student, load_teacher, save_openclip_dir, student_tokenizer,
                            teacher_quick_gelu, uses_quick_gelu)
from dime_ds.models.student import StudentConfigError, student_preprocess_cfg
from tests.conftest import engine_overrides, tiny_model_cfg
from tests.multirank.harness import run_ranks

CPU = torch.device("cpu")
TEXTS = ["a red circle", "two blue stars next to a green square", "nothing at all"]


def _teacher_dir(root: Path, **model_cfg) -> Path:
    cfg = tiny_model_cfg(embed_dim=32, width=32)
    cfg["text_cfg"]["context_length"] = 32
    cfg.update(model_cfg)
    torch.manual_seed(1)
    model = open_clip.CustomTextCLIP(**{k: v for k, v in cfg.items() if k != "custom_text"}) \
        if cfg.get("custom_text") else open_clip.CLIP(**cfg)
    save_openclip_dir(model.state_dict(), cfg, student_preprocess_cfg(cfg), root)
    return root


@pytest.fixture(scope="module")
def quickgelu_teacher_dir(tmp_path_factory):
    return _teacher_dir(tmp_path_factory.mktemp("qg_teacher"), quick_gelu=True)


def _train(rank, world_size, overrides):
    from dime_ds.training import run_training

    return run_training(load_config(overrides))


def _run(work: Path, world: Path, teacher: Path, *extra: str) -> Path:
    summary = run_ranks(_train, 1, engine_overrides(work, world, teacher, *extra), timeout=300)[0]
    assert summary["status"] == "completed"
    return work / "runs" / "demo"


@pytest.fixture(scope="module")
def run_text_teacher(tmp_path_factory, tiny_world, quickgelu_teacher_dir):
    return _run(tmp_path_factory.mktemp("text_teacher"), tiny_world, quickgelu_teacher_dir)


@pytest.fixture(scope="module")
def run_text_own(tmp_path_factory, tiny_world, tiny_teacher_dir):
    return _run(tmp_path_factory.mktemp("text_own"), tiny_world, tiny_teacher_dir, "student.text=own")


def _images(n=4):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(5))


PLAIN_OPENCLIP = textwrap.dedent("""
    import json, sys
    import open_clip, torch
    from PIL import Image
    from safetensors.torch import load_file, save_file
    model_dir, inputs, texts, out = sys.argv[1:]
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{model_dir}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{model_dir}")
    model.eval()
    tokens = tokenizer(json.loads(texts))
    with torch.no_grad():
        image = model.encode_image(load_file(inputs)["images"])
        text = model.encode_text(tokens)
    save_file({"image": image.contiguous(), "text": text.contiguous(), "tokens": tokens.contiguous()}, out)
    blocks = lambda tower: {type(m).__name__ for m in tower.modules()} & {"QuickGELU", "GELU"}
    print(json.dumps({"dime_ds_imported": any(m.split(".")[0] == "dime_ds" for m in sys.modules),
                      "visual_act": sorted(blocks(model.visual)), "text_act": sorted(blocks(model.text)),
                      "preprocessed": list(preprocess(Image.new("RGB", (50, 40))).shape)}))
""")


def _plain_openclip(model_dir: Path, tmp_path: Path) -> tuple[dict, dict]:
    """Embeddings of _images() and TEXTS by OpenCLIP alone, in a process that never imports dime_ds."""
    save_file({"images": _images()}, str(tmp_path / "inputs.safetensors"))
    (tmp_path / "probe.py").write_text(PLAIN_OPENCLIP)
    run = subprocess.run([sys.executable, str(tmp_path / "probe.py"), str(model_dir),
                          str(tmp_path / "inputs.safetensors"), json.dumps(TEXTS), str(tmp_path / "out.safetensors")],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    info = json.loads(run.stdout.strip().splitlines()[-1])
    assert not info["dime_ds_imported"]
    return load_file(str(tmp_path / "out.safetensors")), info


def _assert_rel_close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-5) -> None:
    err = ((got - want).norm() / want.norm()).item()
    assert err < rel, f"relative error {err:.2e}"


def _export(run_dir: Path, out: Path, *extra: str) -> int:
    return run_entry(export_main, [str(run_dir), str(out), *extra])


def test_export_text_teacher_loads_in_plain_openclip(run_text_teacher, quickgelu_teacher_dir, tmp_path, capsys):
    out = tmp_path / "exported"
    assert _export(run_text_teacher, out) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and f"local-dir:{out}" in printed

    plain, info = _plain_openclip(out, tmp_path)
    # One OpenCLIP model, one activation: the student took the teacher's QuickGELU.
    assert info["visual_act"] == info["text_act"] == ["QuickGELU"]
    assert info["preprocessed"] == [3, 32, 32]

    student, cfg = load_student(run_text_teacher)
    teacher = load_teacher(TeacherConfig(arch=cfg.teacher.arch, pretrained=None, precision="fp32"), CPU)
    with torch.no_grad():
        _assert_rel_close(plain["image"], student.encode_image(_images()))
        assert torch.equal(plain["tokens"], teacher.tokenizer(TEXTS))
        _assert_rel_close(plain["text"], teacher.encode_text(teacher.tokenizer(TEXTS)))

    config = json.loads((out / "open_clip_config.json").read_text())
    assert config["model_cfg"]["quick_gelu"] is True and config["model_cfg"]["embed_dim"] == 32
    assert config["model_cfg"]["text_cfg"]["context_length"] == 32  # the teacher's tokenizer settings
    assert config["dime_ds"]["tag"] == "step_00000003" and config["dime_ds"]["step"] == 3
    assert config["dime_ds"]["source"] == str(run_text_teacher / "checkpoints" / "step_00000003")


def test_export_text_own_loads_in_plain_openclip(run_text_own, tmp_path):
    out = tmp_path / "exported"
    assert _export(run_text_own / "checkpoints", out) == 0
    plain, info = _plain_openclip(out, tmp_path)
    assert info["visual_act"] == info["text_act"] == ["GELU"]
    mask = os.umask(0)
    os.umask(mask)
    for name in ("open_clip_model.safetensors", "open_clip_config.json"):  # shareable, as the umask allows
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~mask, name

    student, _ = load_student(run_text_own)
    tokens = student_tokenizer(student)(TEXTS)
    assert torch.equal(plain["tokens"], tokens)
    with torch.no_grad():
        _assert_rel_close(plain["image"], student.encode_image(_images()))
        _assert_rel_close(plain["text"], student.encode_text(tokens))


def test_provenance_names_a_teacher_only_for_runs_that_had_one(run_text_teacher, tiny_world, tiny_teacher_dir,
                                                                tmp_path):
    distilled = tmp_path / "distilled"
    assert _export(run_text_teacher, distilled) == 0
    record = json.loads((distilled / "open_clip_config.json").read_text())["dime_ds"]
    assert record["loss"] == "dime" and record["teacher"].startswith("local-dir:")
    # The from-scratch baseline's (and the demo teacher's) CLIP loss learns from pairs, no teacher.
    clip_run = _run(tmp_path / "clip", tiny_world, tiny_teacher_dir, "loss=clip", "student.text=own",
                    f"data.paired={tiny_world}/paired")
    assert _export(clip_run, tmp_path / "baseline") == 0
    record = json.loads((tmp_path / "baseline" / "open_clip_config.json").read_text())["dime_ds"]
    assert record["loss"] == "clip" and "teacher" not in record and "teacher_pretrained" not in record
    assert record["student_text"] == "own" and record["step"] == 3


def test_every_path_form_gives_the_same_fp32_student(run_text_own):
    ckpt = run_text_own / "checkpoints"
    states = [load_student(p)[0].state_dict() for p in (run_text_own, ckpt, ckpt / "step_00000003")]
    final = load_file(str(run_text_own / "final" / "student.safetensors"))
    for state in states:
        assert state.keys() == final.keys()
        for key, value in final.items():
            assert torch.equal(state[key], value), key
    assert states[0]["logit_scale"].shape == (1,)
    cfg, ckpt_dir, tag = resolve_checkpoint(run_text_own)
    assert (ckpt_dir, tag, cfg.student.text) == (ckpt, "step_00000003", "own")


def _run_dir_without_checkpoints(root: Path) -> Path:
    (root / "config.yaml").write_text("name: x\nckpt: {dir: /nowhere}\n")
    return root


@pytest.mark.parametrize("make, words", [
    (lambda root: root / "missing", "no such directory"),
    (lambda root: root, "no config.yaml"),  # an empty directory
    (_run_dir_without_checkpoints, "without checkpoints"),
])
def test_a_path_that_is_no_checkpoint_is_named(tmp_path, capsys, make, words):
    path = make(tmp_path)
    with pytest.raises(CheckpointError, match=words) as err:
        resolve_checkpoint(path)
    assert str(path) in str(err.value)
    assert _export(path, tmp_path / "out") == 2
    stderr = capsys.readouterr().err
    assert str(path) in stderr and "Traceback" not in stderr
    assert not (tmp_path / "out").exists()


def test_unknown_tag_lists_the_tags(run_text_own):
    with pytest.raises(CheckpointError, match="step_00000003"):
        resolve_checkpoint(run_text_own, tag="step_99999999")
    with pytest.raises(CheckpointError, match="no DeepSpeed `latest`"):
        fp32_state_dict(run_text_own)  # a run dir is not a checkpoint dir


def test_a_resume_word_that_is_not_a_tag_is_refused_with_the_way_to_start_fresh(tmp_path):
    from dime_ds.engine.checkpoint import resolve_tag

    ckpt = tmp_path / "checkpoints"
    for word in ("none", "False"):  # what `ckpt.resume=none` and `ckpt.resume=false` arrive as
        fresh = "; it holds no checkpoint; to start without resuming: ckpt.resume=null$"
        with pytest.raises(CheckpointError, match=f"no checkpoint {word} .*{fresh}"):
            resolve_tag(ckpt, word)
    with pytest.raises(CheckpointError) as typo:
        resolve_tag(ckpt, "step_9")
    assert "ckpt.resume=null" not in str(typo.value)  # a tag that is not there is not told to start fresh


def test_resume_and_consolidation_read_the_layout_alike(tmp_path):
    from dime_ds.engine.checkpoint import resolve_tag

    ckpt = tmp_path / "checkpoints"
    (ckpt / "step_00000002").mkdir(parents=True)
    (ckpt / "step_00000002" / "mp_rank_00_model_states.pt").write_bytes(b"")
    (ckpt / "step_00000004").mkdir()  # a save killed before DeepSpeed's files
    assert resolve_tag(ckpt, "latest") is None  # nothing saved yet: a resume starts at step 0
    with pytest.raises(CheckpointError, match="no DeepSpeed `latest`.*tags in it: step_00000002$"):
        fp32_state_dict(ckpt)
    for missing in ("step_00000004", "step_00000009"):
        with pytest.raises(CheckpointError, match=f"{ckpt}: no checkpoint {missing}") as resumed:
            resolve_tag(ckpt, missing)
        with pytest.raises(CheckpointError) as consolidated:
            fp32_state_dict(ckpt, missing)
        assert str(resumed.value) == str(consolidated.value)
    (ckpt / "latest").write_text("step_00000004")
    with pytest.raises(CheckpointError, match="`latest` file names 'step_00000004'") as resumed:
        resolve_tag(ckpt, "latest")
    with pytest.raises(CheckpointError) as consolidated:
        fp32_state_dict(ckpt)
    assert str(resumed.value) == str(consolidated.value)
    (ckpt / "latest").write_text("step_00000002\n")
    assert resolve_tag(ckpt, "latest") == "step_00000002"


def test_non_empty_out_dir_is_refused_without_force(run_text_own, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "open_clip_config.json").write_text("mine")
    (out / "notes.txt").write_text("keep me")
    assert _export(run_text_own, out) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "open_clip_config.json").read_text() == "mine" and sorted(p.name for p in out.iterdir()) == [
        "notes.txt", "open_clip_config.json"]

    assert _export(run_text_own, out, "--force") == 0
    assert json.loads((out / "open_clip_config.json").read_text())["dime_ds"]["run"] == "demo"
    assert (out / "notes.txt").read_text() == "keep me"  # --force replaces the model files only


def test_student_borrowing_the_text_tower_takes_the_teachers_activation(tiny_teacher_dir, quickgelu_teacher_dir):
    student_cfg = OmegaConf.structured(StudentConfig(arch="tiny", model_cfg=tiny_model_cfg(16, 24), text="teacher"))
    for teacher_dir, quick in ((quickgelu_teacher_dir, True), (tiny_teacher_dir, False)):
        teacher_cfg = TeacherConfig(arch=f"local-dir:{teacher_dir}", pretrained=None, precision="fp32")
        assert teacher_quick_gelu(teacher_cfg) is quick
        assert uses_quick_gelu(load_teacher(teacher_cfg, CPU).model) is quick
        assert uses_quick_gelu(build_run_student(student_cfg, teacher_cfg, 32)) is quick
        own = OmegaConf.structured(StudentConfig(arch="tiny", model_cfg=tiny_model_cfg(16, 24), text="own"))
        assert not uses_quick_gelu(build_run_student(own, teacher_cfg, 32))
    # OpenAI's weights were trained with QuickGELU; open_clip's ViT-L-14 config alone says GELU.
    assert teacher_quick_gelu(TeacherConfig(arch="ViT-L-14", pretrained="openai"))
    assert not teacher_quick_gelu(TeacherConfig(arch="ViT-L-14", pretrained="laion2b_s32b_b82k"))
    explicit = OmegaConf.structured(StudentConfig(arch="tiny",
                                                  model_cfg={**tiny_model_cfg(16, 24), "quick_gelu": False}))
    with pytest.raises(StudentConfigError, match="quick_gelu"):
        build_student(explicit, 32, quick_gelu=True)


@pytest.mark.parametrize("custom_text", [False, True])
def test_teacher_text_tower_state_fits_a_custom_text_clip(tmp_path, custom_text):
    """Plain CLIP keeps its text tower at the top level, CustomTextCLIP under `text.`: both export."""
    teacher_dir = _teacher_dir(tmp_path, custom_text=True) if custom_text else _teacher_dir(tmp_path)
    teacher = load_teacher(TeacherConfig(arch=f"local-dir:{teacher_dir}", pretrained=None, precision="fp32"), CPU)
    assert isinstance(teacher.model, open_clip.CustomTextCLIP) is custom_text
    state, text_cfg = teacher.text_tower_state()
    custom = open_clip.CustomTextCLIP(embed_dim=32, vision_cfg=tiny_model_cfg()["vision_cfg"], text_cfg=text_cfg)
    custom.text.load_state_dict(state, strict=True)
    tokens = teacher.tokenizer(TEXTS)
    with torch.no_grad():
        torch.testing.assert_close(custom.encode_text(tokens), teacher.encode_text(tokens))


def test_eval_of_a_run_equals_eval_of_its_export(run_text_teacher, tiny_world, tmp_path, capsys):
    """`python -m dime_ds.eval` on the run (student from its ZeRO checkpoint, teacher beside it) and on
    the exported directory give the same figures: the export is the model that was evaluated."""
    from dime_ds.eval.__main__ import main as eval_main

    out = tmp_path / "exported"
    assert _export(run_text_teacher, out) == 0
    common = [f"data.root={tiny_world}", "log.progress=false", "eval.workers=0", f"work_dir={tmp_path}"]
    assert run_entry(eval_main, [f"model={run_text_teacher}", "suite=synthetic", *common]) == 0
    table = capsys.readouterr().out
    assert "teacher" in table and "student" in table and "zero-shot top-1" in table
    from_run = json.loads((run_text_teacher / "eval" / "synthetic.json").read_text())["results"]
    assert set(from_run) == {"teacher", "student"}
    assert run_entry(eval_main, [f"model={out}", "suite=synthetic", f"eval.out_dir={tmp_path / 'ev'}", *common]) == 0
    from_export = json.loads((tmp_path / "ev" / "synthetic.json").read_text())["results"]["model"]
    for name, metrics in from_run["student"].items():
        if metrics["task"] == "linear_probe":  # an L-BFGS fit may turn on 1e-7 feature differences
            continue
        for key in ("top1", "top5", "image_to_text_R@1", "text_to_image_R@5"):
            if key in metrics:
                assert from_export[name][key] == pytest.approx(metrics[key], abs=1e-6), (name, key)
    assert from_run["student"]["shape"]["n"] == 32 and from_run["student"]["captions"]["texts"] == 64


class _Payload:
    """Unpickling this runs code: what a tampered checkpoint would carry."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_tampered_checkpoint_is_refused_without_running_its_code(run_text_own, tmp_path):
    import shutil

    ckpt = tmp_path / "checkpoints"
    shutil.copytree(run_text_own / "checkpoints", ckpt)
    tag = (ckpt / "latest").read_text().strip()
    states = sorted((ckpt / tag).glob("*model_states.pt"))[0]
    from dime_ds.engine.checkpoint import weights_only_reads

    with weights_only_reads(states):
        sd = torch.load(states, map_location="cpu", weights_only=True)
    sd["payload"] = _Payload(str(tmp_path / "ran"))
    torch.save(sd, states)
    with pytest.raises(UserError, match="refused to load"):
        load_student(ckpt)
    assert run_entry(export_main, [str(ckpt), str(tmp_path / "out")]) == 2
    assert not (tmp_path / "ran").exists()
