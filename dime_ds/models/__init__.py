"""Teacher and student factories on open_clip, projection heads, OpenCLIP model directories.
Nothing here communicates across ranks."""
from dime_ds.models.openclip_dir import read_openclip_dir, save_openclip_dir
from dime_ds.models.precision import PRECISIONS, Precision, precision_for
from dime_ds.models.student import (Student, StudentOutput, build_run_student, build_student, student_preprocess_cfg,
                                    student_tokenizer)
from dime_ds.models.teacher import Teacher, TeacherWeightsError, load_teacher, teacher_quick_gelu, uses_quick_gelu

__all__ = [
    "Student", "StudentOutput", "Teacher", "student_preprocess_cfg", "student_tokenizer", "TeacherWeightsError",
    "build_run_student", "build_student", "load_teacher", "PRECISIONS", "Precision", "precision_for",
    "read_openclip_dir", "save_openclip_dir", "teacher_quick_gelu", "uses_quick_gelu",
]
