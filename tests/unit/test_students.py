"""Students of any shape OpenCLIP builds without a download: named architectures, inline configs and
model-config files, timm towers (MobileCLIP's MCi, ConvNeXt, MobileNet), OpenCLIP's ResNet with
BatchNorm; the projection folded for export; the image tower started from local weights."""
from __future__ import annotations

import json

import open_clip
import pytest
import torch
from omegaconf import OmegaConf

from dime_ds.config.schema import StudentConfig, TeacherConfig
from dime_ds.models import build_run_student, build_student
from dime_ds.models.init_weights import InitWeightsError
from dime_ds.models.student import StudentConfigError, student_model_cfg

TEXT = {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}
TARGET = 24  # the teacher's width: every student below is narrower and needs a projection
TOWERS = {
    "vit": {"image_size": 32, "patch_size": 16, "width": 32, "layers": 1, "head_width": 16},
    "resnet_bn": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "head_width": 8},
    "mobilenet_bn": {"timm_model_name": "mobilenetv3_small_050", "timm_pool": "avg", "timm_proj": None,
                     "image_size": 32},
    "convnext": {"timm_model_name": "convnext_atto", "timm_pool": "avg", "timm_proj": None, "image_size": 32},
    "mci": {"timm_model_name": "fastvit_mci0", "timm_pool": "avg", "timm_proj": None, "image_size": 32},
}


def _student_cfg(tower: str, **more) -> StudentConfig:
    return OmegaConf.structured(StudentConfig(arch=f"test-{tower}", text="teacher", **more,
                                              model_cfg={"embed_dim": 16, "vision_cfg": TOWERS[tower],
                                                         "text_cfg": TEXT}))


@pytest.mark.parametrize("tower", list(TOWERS))
def test_every_tower_exports_as_a_plain_openclip_model_with_the_projection_folded(tower):
    torch.manual_seed(0)
    student = build_student(_student_cfg(tower), TARGET).eval()
    teacher_text = open_clip.CustomTextCLIP(embed_dim=TARGET, vision_cfg=TOWERS["vit"], text_cfg=TEXT).text
    state, cfg = student.openclip_state(teacher_text.state_dict(), TEXT)
    plain = open_clip.CustomTextCLIP(**{k: v for k, v in cfg.items() if k != "custom_text"})
    plain.load_state_dict(state)  # strict: every parameter and buffer (BatchNorm statistics) accounted for
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ours, theirs = student.encode_image(images), plain.eval().encode_image(images)
    assert theirs.shape == (3, TARGET)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)


def test_named_timm_architecture_builds_from_timm_code_without_pretrained_weights():
    cfg = student_model_cfg(OmegaConf.structured(StudentConfig(arch="MobileCLIP2-S0", text="teacher")))
    assert cfg["vision_cfg"]["timm_model_name"] == "fastvit_mci0"
    assert cfg["vision_cfg"]["timm_model_pretrained"] is False
    assert cfg["text_cfg"]["no_causal_mask"] is True  # MobileCLIP's text tower, for student.text=own


def test_a_model_config_file_is_a_student(tmp_path):
    path = tmp_path / "my_student.json"
    path.write_text(json.dumps({"embed_dim": 16, "vision_cfg": TOWERS["convnext"], "text_cfg": TEXT}))
    student = build_student(OmegaConf.structured(StudentConfig(arch=str(path))), TARGET)
    assert type(student.visual).__name__ == "TimmModel" and student.image_proj.out_features == TARGET


@pytest.mark.parametrize("arch, words", [
    ("ViT-Nope", "is not an OpenCLIP architecture"),
    ("/no/such/student.json", "no such model-config file"),
])
def test_unknown_architectures_are_named(arch, words):
    with pytest.raises(StudentConfigError, match=words):
        build_student(OmegaConf.structured(StudentConfig(arch=arch)))


def test_an_unknown_timm_tower_lists_the_near_names():
    bad = {**TOWERS["convnext"], "timm_model_name": "convnext_atoo"}
    cfg = OmegaConf.structured(StudentConfig(model_cfg={"embed_dim": 16, "vision_cfg": bad, "text_cfg": TEXT}))
    with pytest.raises(StudentConfigError, match=r"timm knows no model 'convnext_atoo' .*convnext_atto"):
        build_student(cfg)


def test_an_hf_text_tower_is_only_built_from_a_local_directory(tmp_path):
    hf = {"hf_model_name": "some-org/some-text-model", "hf_tokenizer_name": "some-org/some-text-model"}
    own = OmegaConf.structured(StudentConfig(text="own", model_cfg={"embed_dim": 16, "vision_cfg": TOWERS["vit"],
                                                                      "text_cfg": hf}))
    with pytest.raises(StudentConfigError, match="would be downloaded: point text_cfg.hf_model_name at a local copy"):
        build_student(own)
    image_only = OmegaConf.merge(own, {"text": "teacher"})  # its text tower is never built then
    assert build_student(image_only, TARGET).text is None


def test_the_image_tower_starts_from_local_timm_or_openclip_weights(tmp_path, caplog):
    from safetensors.torch import save_file

    import timm

    trunk = timm.create_model("convnext_atto", num_classes=16)
    torch.save(trunk.state_dict(), tmp_path / "timm.pt")  # a timm state dict: the tower's trunk
    teacher = OmegaConf.structured(TeacherConfig(arch="ViT-B-32", pretrained=None))
    cfg = _student_cfg("convnext", init_image=str(tmp_path / "timm.pt"))
    with caplog.at_level("INFO"):
        student = build_run_student(cfg, teacher, TARGET)
    assert "timm model (trunk.)" in caplog.text
    for key, value in trunk.state_dict().items():
        torch.testing.assert_close(student.visual.trunk.state_dict()[key], value)

    donor = build_student(_student_cfg("convnext"), TARGET)  # an OpenCLIP model's state: visual.*
    save_file({f"visual.{k}": v.contiguous() for k, v in donor.visual.state_dict().items()},
              str(tmp_path / "oc.safetensors"))
    again = build_run_student(_student_cfg("convnext", init_image=str(tmp_path / "oc.safetensors")), teacher, TARGET)
    for key, value in donor.visual.state_dict().items():
        torch.testing.assert_close(again.visual.state_dict()[key], value)

    torch.save({"unrelated.weight": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(InitWeightsError, match="none of its 1 tensors fits the image tower"):
        build_run_student(_student_cfg("convnext", init_image=str(tmp_path / "other.pt")), teacher, TARGET)
    with pytest.raises(InitWeightsError, match="no such file"):
        build_run_student(_student_cfg("convnext", init_image=str(tmp_path / "none.pt")), teacher, TARGET)
