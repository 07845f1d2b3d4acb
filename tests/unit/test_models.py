"""Teacher loading (local files, model directories, no network), half precision, student widths."""
from __future__ import annotations

import json

import open_clip
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from dime_ds.config.schema import StudentConfig, TeacherConfig
from dime_ds.models import Student, TeacherWeightsError, build_student, load_teacher, save_openclip_dir
from dime_ds.models.student import student_preprocess_cfg
from tests.conftest import tiny_model_cfg

CPU = torch.device("cpu")


class NotAWeight:
    """Anything a pickle could smuggle in; weights_only loading must refuse it."""


@pytest.fixture(scope="module")
def tiny_arch(tmp_path_factory):
    """A tiny architecture registered with open_clip under a name, like ViT-L-14 is."""
    d = tmp_path_factory.mktemp("arch")
    (d / "dime-tiny-test.json").write_text(json.dumps(tiny_model_cfg()))
    open_clip.add_model_config(d)
    torch.manual_seed(0)
    model = open_clip.create_model("dime-tiny-test")
    return "dime-tiny-test", model


def _teacher_cfg(**kw):
    return OmegaConf.structured(TeacherConfig(**kw))


def _images(n=4):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_teacher_from_local_checkpoint_file(tmp_path, tiny_arch):
    name, model = tiny_arch
    for path in (tmp_path / "w.pt", tmp_path / "w.safetensors"):
        if path.suffix == ".pt":
            torch.save(model.state_dict(), path)
        else:
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        teacher = load_teacher(_teacher_cfg(arch=name, pretrained=str(path), precision="fp32"), CPU)
        with torch.no_grad():
            expected = model.encode_image(_images())
        torch.testing.assert_close(teacher.encode_image(_images()), expected)


def test_checkpoint_with_pickled_objects_is_refused(tmp_path, tiny_arch):
    name, model = tiny_arch
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": model.state_dict(), "payload": NotAWeight()}, path)
    with pytest.raises(TeacherWeightsError, match="weights_only|Unsupported|WeightsUnpickler"):
        load_teacher(_teacher_cfg(arch=name, pretrained=str(path)), CPU)


def test_teacher_from_openclip_model_directory(tmp_path, tiny_arch):
    _, model = tiny_arch
    save_openclip_dir(model.state_dict(), tiny_model_cfg(), student_preprocess_cfg(tiny_model_cfg()), tmp_path)
    teacher = load_teacher(_teacher_cfg(arch=f"local-dir:{tmp_path}", pretrained=None, precision="fp32"), CPU)
    assert teacher.embed_dim == 32 and tuple(teacher.preprocess_cfg["size"]) == (32, 32)
    torch.testing.assert_close(teacher.encode_image(_images()), model.encode_image(_images()).detach())


def test_half_precision_teacher_is_frozen_and_close_to_fp32(tmp_path, tiny_arch):
    name, model = tiny_arch
    torch.save(model.state_dict(), tmp_path / "w.pt")
    teacher = load_teacher(_teacher_cfg(arch=name, pretrained=str(tmp_path / "w.pt"), precision="bf16"), CPU)
    assert teacher.dtype == torch.bfloat16  # what auto is on CPUs with native bf16 (fp16 on CUDA)
    assert teacher.model.visual.conv1.weight.dtype == torch.bfloat16
    teacher.train()
    assert not teacher.model.training
    tokens = teacher.tokenizer(["a red circle", "a blue star"])
    with torch.enable_grad():  # frozen even where the caller records gradients
        img, txt = teacher.encode_image(_images()), teacher.encode_text(tokens)
    assert not img.requires_grad and not txt.requires_grad
    assert img.dtype == txt.dtype == torch.float32
    with torch.no_grad():
        ref_img, ref_txt = model.encode_image(_images()), model.encode_text(tokens)
    for got, ref in ((img, ref_img), (txt, ref_txt)):
        cos = torch.nn.functional.cosine_similarity(got, ref, dim=-1)
        assert cos.min() > 0.99, cos


@pytest.mark.parametrize("kw, words", [
    (dict(arch="ViT-B-32", pretrained="openai"), "teacher.pretrained=/path"),  # hub tag, no network
    (dict(arch="ViT-B-32", pretrained=None), "random"),
    (dict(arch="ViT-B-32", pretrained="/nowhere/w.pt"), "no such weights file"),
    (dict(arch="local-dir:/nowhere", pretrained=None), "open_clip_config.json"),
])
def test_missing_weights_give_a_clear_error(kw, words):
    with pytest.raises(TeacherWeightsError, match=words):
        load_teacher(_teacher_cfg(**kw), CPU)


def test_model_directory_without_weights_is_refused(tmp_path):
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": tiny_model_cfg()}))
    with pytest.raises(TeacherWeightsError, match="no weights file"):
        load_teacher(_teacher_cfg(arch=f"local-dir:{tmp_path}", pretrained=None), CPU)


def _student(text="teacher", embed_dim=16, target=32):
    cfg = OmegaConf.structured(StudentConfig(arch="tiny", model_cfg=tiny_model_cfg(embed_dim, 24), text=text))
    return build_student(cfg, target_dim=target)


def test_student_narrower_than_teacher_gets_a_projection():
    student = _student(embed_dim=16, target=32)
    assert student.image_proj is not None and student.image_proj.weight.shape == (32, 16)
    assert student.encode_image(_images()).shape == (4, 32)
    assert student.text is None and not any("text" in n for n, _ in student.named_parameters())
    assert _student(embed_dim=32, target=32).image_proj is None


def test_student_text_own_is_projected_too():
    student = _student(text="own", embed_dim=16, target=32)
    tokens = open_clip.SimpleTokenizer(context_length=16)(["a red circle"])
    assert student.encode_text(tokens).shape == (1, 32)
    assert student.logit_scale.shape == (1,)  # not 0-dim: DeepSpeed cannot broadcast those


def test_student_named_arch_and_unknown_arch():
    assert isinstance(build_student(OmegaConf.structured(StudentConfig(arch="ViT-B-32")), 768), Student)
    with pytest.raises(ValueError, match="not an OpenCLIP architecture"):
        build_student(OmegaConf.structured(StudentConfig(arch="ViT-Nope")))


def test_projection_folds_into_an_openclip_model(tmp_path):
    """A student with a width mismatch exports to plain OpenCLIP with identical embeddings."""
    student = _student(text="own", embed_dim=16, target=32).eval()
    state, model_cfg = student.openclip_state()
    save_openclip_dir(state, model_cfg, student_preprocess_cfg(model_cfg), tmp_path)
    plain = open_clip.create_model(f"local-dir:{tmp_path}").eval()
    tokens = open_clip.SimpleTokenizer(context_length=16)(["a red circle", "two stars"])
    with torch.no_grad():
        torch.testing.assert_close(plain.encode_image(_images()), student.encode_image(_images()),
                                   rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(plain.encode_text(tokens), student.encode_text(tokens), rtol=1e-4, atol=1e-5)
