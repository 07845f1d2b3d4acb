"""Teacher and student factories on open_clip, projection heads, OpenCLIP model directories.
Nothing here communicates across ranks."""
from dime_ds.models.openclip_dir import read_openclip_dir, save_openclip_dir
from dime_ds.models.precision import compute_dtype, resolve_device
from dime_ds.models.student import (Student, build_run_student, build_student, student_preprocess_cfg,
                                    student_tokenizer)
from dime_ds.models.teacher import Teacher, TeacherWeightsError, load_teacher, teacher_quick_gelu, uses_quick_gelu

__all__ = [
    "Student", "Teacher", "student_preprocess_cfg", "student_tokenizer", "TeacherWeightsError", "build_run_student",
    "build_student", "compute_dtype", "load_teacher", "read_openclip_dir", "resolve_device", "save_openclip_dir",
    "teacher_quick_gelu", "uses_quick_gelu",
]
